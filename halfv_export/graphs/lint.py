"""TensorRT-readiness lint, without TensorRT: what the ONNX parser of TensorRT 10.x/11.x would refuse or build
badly, read off the graph (export-notes §1 and design rules).

Rules
  op-supported     every op is in the parser's supported set (onnx-tensorrt operators.md, 10.x); ONNX Runtime
                   contrib ops (com.microsoft::MatMulNBits, the int4/int8 weight-only MatMul) are named as ORT-only
  opset            the default-domain opset is one the TensorRT 10.0 parser reads (9..20)
  topk             TopK is sorted, its K a constant <= 3840 (the parser's limit)
  dds              no op with a data-dependent output shape (NonZero, Unique, Compress, NonMaxSuppression, ...), and
                   every symbolic dimension in the graph is an expression over the graph inputs' symbols
  constant-axes    axes / K / depth inputs that the parser needs at build time are initializers or Constants
  dtypes           CumSum only on floating types (the parser has no integer CumSum)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import onnx

TOPK_LIMIT = 3840
OPSET_RANGE = (9, 20)

SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add AffineGrid And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
BlackmanWindow Cast CastLike Ceil Celu CenterCropPad Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LpNormalization
LpPool LRN LSTM MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding Round ScaledTanh Scan
Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where
Xor
""".split())

DATA_DEPENDENT_OPS = frozenset({"NonZero", "Unique", "Compress", "NonMaxSuppression", "StringSplit"})
# (op, input index) pairs the parser needs as build-time constants
CONSTANT_INPUTS = {"Squeeze": (1,), "Unsqueeze": (1,), "ReduceMean": (1,), "ReduceSum": (1,), "ReduceMax": (1,),
                   "ReduceMin": (1,), "ReduceProd": (1,), "ReduceL1": (1,), "ReduceL2": (1,), "ReduceSumSquare": (1,),
                   "ReduceLogSum": (1,), "ReduceLogSumExp": (1,), "Slice": (3,), "TopK": (1,), "OneHot": (1,),
                   "CumSum": (1,)}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


@dataclass(frozen=True)
class Finding:
    graph: str
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"{self.graph}: [{self.rule}] {self.node}: {self.message}"


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def lint_model(model: onnx.ModelProto, name: str) -> list[Finding]:
    found: list[Finding] = []
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        found.append(Finding(name, "opset", "-", f"opset {opset} is outside {OPSET_RANGE[0]}..{OPSET_RANGE[1]}"))

    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = node.attribute[0].t if node.attribute and node.attribute[0].t else None
    dtypes = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.input)}

    for node in graph.node:
        label = node.name or node.op_type
        if node.domain == "com.microsoft":  # ORT contrib ops, e.g. MatMulNBits from ORT's weight-only quantiser
            found.append(Finding(name, "op-supported", label,
                                 f"{node.domain}::{node.op_type} is an ONNX Runtime-only op; TensorRT cannot parse it "
                                 "(build TensorRT engines from a float export)"))
        elif node.domain not in ("", "ai.onnx"):
            found.append(Finding(name, "op-supported", label, f"custom-domain op {node.domain}::{node.op_type}"))
        elif node.op_type not in SUPPORTED_OPS:
            found.append(Finding(name, "op-supported", label, f"{node.op_type} is not in TensorRT's ONNX parser"))
        if node.op_type in DATA_DEPENDENT_OPS:
            found.append(Finding(name, "dds", label, f"{node.op_type} has a data-dependent output shape"))
        for index in CONSTANT_INPUTS.get(node.op_type, ()):
            if index < len(node.input) and node.input[index] and node.input[index] not in constants:
                found.append(Finding(name, "constant-axes", label,
                                     f"input {index} ({node.input[index]}) of {node.op_type} is computed at run time"))
        if node.op_type == "TopK":
            found += _lint_topk(node, label, name, constants)
        if node.op_type == "CumSum" and dtypes.get(node.input[0]) not in _FLOATS | {None}:
            found.append(Finding(name, "dtypes", label, "CumSum on an integer tensor"))

    input_symbols = {d for v in graph.input for d in _dims(v) if isinstance(d, str)}
    for value in list(graph.value_info) + list(graph.output):
        for dim in _dims(value):
            if isinstance(dim, str) and not set(_IDENT.findall(dim)) <= input_symbols:
                found.append(Finding(name, "dds", value.name, f"dimension '{dim}' does not follow from the inputs"))
                break
    return found


def _lint_topk(node, label: str, name: str, constants: dict) -> list[Finding]:
    found = []
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("sorted", 1) != 1:
        found.append(Finding(name, "topk", label, "TopK must be sorted (sorted=1) for TensorRT"))
    k = constants.get(node.input[1])
    if k is not None:
        value = int(onnx.numpy_helper.to_array(k).reshape(-1)[0])
        if value > TOPK_LIMIT:
            found.append(Finding(name, "topk", label, f"K = {value} exceeds TensorRT's limit of {TOPK_LIMIT}"))
    elif node.input[1] not in constants:
        found.append(Finding(name, "topk", label, "K is computed at run time"))
    return found


def lint_file(path: Path) -> list[Finding]:
    return lint_model(onnx.load(str(path), load_external_data=False), Path(path).name)
