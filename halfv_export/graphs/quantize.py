"""Weight-only quantisation of an exported LLM graph's weight MatMuls, for ONNX Runtime (`export --quantize`).

    int4   com.microsoft::MatMulNBits, bits 4, blocks of INT4_BLOCK along K, symmetric (no zero-point tensor: the
           op's default 8). The packed B [N, K/block, block/2] and scales [N, K/block] are made by ORT's own kernel
           (`quantize_matmul_4bits`, what MatMulNBitsQuantizer calls), so the bytes are what ORT's quantiser
           produces. accuracy_level 4 (int8 activations in the CPU kernel): measured 7-10x faster than level 0 at
           decode shapes on this CPU, same cosine to the float product.
    int8   DequantizeLinear(int8 W [K, N], fp32 scale [N], axis=1) -> MatMul: per output channel, symmetric, plain
           ONNX. MatMulNBits cannot say per-channel (its CPU kernel takes blocks of 16..256 only); ONNX Runtime fuses
           the pair into MatMulNBits bits=8 when the session is created (DQMatMulToMatMulNBits; measured).

Which MatMuls: those whose B is a constant equal to a model parameter's transpose (torch.onnx folds W^T for Linear
layers) and Gemm(transB=1) on a parameter (the lm_head): exactly the LLM's Linear weights. Everything else (norms,
rotary tables, attention's activation MatMuls) stays float.

It runs on the graph torch.onnx just saved, whose weights are in `<graph>.onnx.data`, before WeightStore.absorb: each
quantised weight's float initializer is dropped from the graph, so it never reaches weights.bin, and its quantised
tensors are written to `<graph>.onnx.qdata` as external data, one weight at a time (peak memory: one float weight and
its quantised form, never the model). absorb then moves them into weights.bin keyed by content; the kernel is
deterministic, so the five LLM graphs quantise each weight to the same bytes and share one stored copy.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..base.errors import BadInput

SCHEMES = ("int4", "int8")
INT4_BLOCK = 32
INT4_ACCURACY_LEVEL = 4
CONTRIB_DOMAIN = "com.microsoft"
QDATA_SUFFIX = ".qdata"
TENSOR_SUFFIXES = (".int4", ".int4_scales", ".int8", ".int8_scales")  # how quantised tensors are named (base = param)
_TRANSPOSED = "T:"  # shared_weights.TRANSPOSED (kept literal: graphs modules import no private names)


@dataclass(frozen=True)
class QuantScheme:
    name: str
    bits: int
    block_size: int | None  # None: per output channel
    op: str

    def describe(self) -> dict:
        return {"scheme": self.name, "bits": self.bits, "symmetric": True, "op": self.op,
                "block_size": self.block_size, "granularity": "per output channel" if self.block_size is None
                else f"blocks of {self.block_size} along K",
                **({"accuracy_level": INT4_ACCURACY_LEVEL} if self.name == "int4" else {})}


def scheme_for(name: str | None) -> QuantScheme | None:
    if name is None:
        return None
    if name == "int4":
        return QuantScheme("int4", 4, INT4_BLOCK, f"{CONTRIB_DOMAIN}::MatMulNBits")
    if name == "int8":
        return QuantScheme("int8", 8, None, "DequantizeLinear + MatMul")
    raise BadInput(f"--quantize {name!r}: choose int4 or int8")


# ------------------------------------------------------------------------------------------------ the numbers
def quantize_int4(w: np.ndarray, block: int = INT4_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """w [K, N] fp32 -> (packed uint8 [N, ceil(K/block), block/2], scales fp32 [N, ceil(K/block)]) with ORT's
    kernel, symmetric (zero point 8)."""
    quantize_matmul_4bits = _ort_int4_kernel()
    k, n = w.shape
    blocks = -(-k // block)
    if blocks * block != k:
        w = np.pad(w, ((0, blocks * block - k), (0, 0)))
    packed = np.zeros((n, blocks, block // 2), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zero_points = np.zeros((n, (blocks + 1) // 2), dtype=np.uint8)  # unused when symmetric
    quantize_matmul_4bits(packed, np.ascontiguousarray(w, dtype=np.float32), scales, zero_points, block, n, k, True)
    return packed, scales


def _ort_int4_kernel():
    """ORT's block quantiser. Its Python module calls logging.basicConfig(level=INFO) when imported, which would switch
    on every library's INFO lines in this process, so the root logger is put back as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import quantize_matmul_4bits
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    return quantize_matmul_4bits


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [K, N] fp32 -> (int8 [K, N], scales fp32 [N]): symmetric per output channel, w ~ q * scale."""
    scales = (np.abs(w).max(axis=0) / 127.0).astype(np.float32)
    scales[scales == 0] = 1.0  # an all-zero column stays zero
    q = np.clip(np.rint(w / scales), -127, 127).astype(np.int8)
    return q, scales


def dequantize_int4(packed: np.ndarray, scales: np.ndarray, k: int) -> np.ndarray:
    """The [K, N] fp32 weight a MatMulNBits int4 node computes with (symmetric: zero point 8); for tests."""
    low, high = (packed & 0x0F).astype(np.int16), (packed >> 4).astype(np.int16)
    values = np.stack([low, high], axis=-1).reshape(packed.shape[0], packed.shape[1], -1)  # [N, blocks, block]
    w = (values - 8) * scales[..., None]
    return w.reshape(packed.shape[0], -1)[:, :k].T.astype(np.float32)


# ------------------------------------------------------------------------------------------------ one graph
def quantize_graph(path: Path, scheme: QuantScheme, param_names: dict[str, str] | None = None) -> dict:
    """Rewrite `path` in place: its weight MatMuls (see module doc) become `scheme`'s form. `param_names` is
    WeightStore's tensor_key -> parameter map: only weights equal to a parameter (or its transpose) are quantised;
    None quantises every 2-D float constant B. Returns {"matmuls": n, "float_bytes": n, "quantized_bytes": n}."""
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    qdata = Path(f"{path}{QDATA_SUFFIX}")
    new_nodes, sources, done = [], set(), 0
    float_bytes = quant_bytes = 0
    with open(qdata, "wb") as out:
        for node in graph.node:
            weight = _weight_of(node, inits, producers)
            if weight is None:
                new_nodes.append(node)
                continue
            init, transposed = weight
            array = _read(init, path.parent)
            w = array.T if transposed else array  # [K, N]
            param = _parameter(init, array, transposed, param_names)
            if param_names is not None and param is None:
                new_nodes.append(node)
                continue
            base = param or init.name
            w = np.ascontiguousarray(w, dtype=np.float32)
            if scheme.name == "int4":
                packed, scales = quantize_int4(w, scheme.block_size)
                tensors = [(f"{base}.int4", packed), (f"{base}.int4_scales", scales)]
            else:
                q, scales = quantize_int8(w)
                tensors = [(f"{base}.int8", q), (f"{base}.int8_scales", scales)]
            for name, value in tensors:
                if name not in inits:
                    inits[name] = _external_tensor(graph, name, value, out, qdata.name)
                    quant_bytes += value.nbytes
            new_nodes += _replacement(node, scheme, [t[0] for t in tensors], w.shape)
            if init.name not in sources:
                float_bytes += array.nbytes
            sources.add(init.name)
            done += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused(graph, sources)
    if scheme.name == "int4" and not any(o.domain == CONTRIB_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    tmp = path.with_name(f".{path.name}.tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    still = {e.value for init in graph.initializer for e in init.external_data if e.key == "location"}
    for extra in (Path(f"{path}.data"), qdata):  # a data file no initializer reads any more
        if extra.exists() and extra.name not in still:
            extra.unlink()
    return {"matmuls": done, "float_bytes": float_bytes, "quantized_bytes": quant_bytes}


def _weight_of(node: onnx.NodeProto, inits: dict, producers: dict) -> tuple[onnx.TensorProto, bool] | None:
    """(B initializer, whether it is stored [N, K]) for a MatMul / Gemm by a 2-D float constant, else None. A W^T
    that torch.onnx did not fold (a weight feeding two MatMuls, e.g. a layer's q_proj that the HalfV scores reuse)
    arrives as Transpose(W): that is W stored [N, K] too."""
    floats = (TensorProto.FLOAT,)
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
        init = inits.get(node.input[1])
        if init is not None and len(init.dims) == 2 and init.data_type in floats:
            return init, False
        source = producers.get(node.input[1])
        if source is not None and source.op_type == "Transpose":
            perm = [list(a.ints) for a in source.attribute if a.name == "perm"]
            init = inits.get(source.input[0])
            if perm in ([[1, 0]], []) and init is not None and len(init.dims) == 2 and init.data_type in floats:
                return init, True
    if node.op_type == "Gemm" and node.domain in ("", "ai.onnx"):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("transA", 0) == 0 and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        init = inits.get(node.input[1])
        if plain and attrs.get("transB", 0) == 1 and init is not None and len(init.dims) == 2 \
                and init.data_type in floats:
            return init, True
    return None


def _drop_unused(graph: onnx.GraphProto, sources: set[str]) -> None:
    """Remove the float weights that were quantised, and Transposes of them, once nothing reads them any more."""
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in sources
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name not in sources or init.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _parameter(init, array: np.ndarray, transposed: bool, param_names: dict | None) -> str | None:
    """The parameter `array` is ([N, K] as stored by Gemm) or is the transpose of (MatMul's folded W^T)."""
    if param_names is None:
        return None
    digest = hashlib.sha256(memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B")).hexdigest()
    key = f"{init.data_type}:{'x'.join(str(int(d)) for d in init.dims)}:{digest}"
    return param_names.get(key) if transposed else param_names.get(_TRANSPOSED + key)


def _read(init: onnx.TensorProto, directory: Path) -> np.ndarray:
    """One initializer as numpy, from the graph's own external data file or inline."""
    dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
    if init.data_location != TensorProto.EXTERNAL:
        return onnx.numpy_helper.to_array(init)
    info = {e.key: e.value for e in init.external_data}
    count = int(np.prod(init.dims))
    array = np.fromfile(directory / info["location"], dtype=dtype, count=count, offset=int(info.get("offset", 0)))
    return array.reshape(list(init.dims))


def _external_tensor(graph: onnx.GraphProto, name: str, value: np.ndarray, out, location: str) -> onnx.TensorProto:
    init = graph.initializer.add()
    init.name = name
    init.data_type = helper.np_dtype_to_tensor_dtype(value.dtype)
    init.dims.extend(value.shape)
    init.data_location = TensorProto.EXTERNAL
    offset = out.tell()
    out.write(value.tobytes())
    for key, text in (("location", location), ("offset", str(offset)), ("length", str(value.nbytes))):
        entry = init.external_data.add()
        entry.key, entry.value = key, text
    return init


def _replacement(node: onnx.NodeProto, scheme: QuantScheme, names: list[str], shape: tuple[int, int]) -> list:
    k, n = shape
    bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
    out = f"{node.output[0]}/unbiased" if bias else node.output[0]
    if scheme.name == "int4":
        nodes = [helper.make_node("MatMulNBits", [node.input[0], *names], [out], name=f"{node.name}/int4",
                                  domain=CONTRIB_DOMAIN, K=k, N=n, bits=4, block_size=scheme.block_size,
                                  accuracy_level=INT4_ACCURACY_LEVEL)]
    else:
        dequantized = f"{node.name or node.output[0]}/dequantized"  # one per node: a weight may feed two
        nodes = [helper.make_node("DequantizeLinear", names, [dequantized], name=f"{node.name}/dequantize", axis=1),
                 helper.make_node("MatMul", [node.input[0], dequantized], [out], name=f"{node.name}/int8")]
    if bias:
        nodes.append(helper.make_node("Add", [out, bias], [node.output[0]], name=f"{node.name}/bias"))
    return nodes
