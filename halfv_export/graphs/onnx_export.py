"""Trace the graph modules into ONNX with torch.onnx (dynamo) and check them.

Checks after every export: onnx.checker, shape inference, and the TensorRT-readiness lint (graphs/lint.py: supported
ops, sorted TopK with a constant K <= 3840, no data-dependent shapes, constant axes). Files over 2 GB get external data.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from ..base.errors import RuntimeFailure
from .lint import TOPK_LIMIT, lint_model  # noqa: F401  (TOPK_LIMIT re-exported)

EXTERNAL_DATA_BYTES = 1_800_000_000  # below protobuf's 2 GB cap, with room for the graph itself
OPSET = 20


def export_module(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                  dynamic_shapes, store=None, report=lambda phase, detail: None, quantize=None) -> Path:
    """torch.onnx.export(dynamo=True) -> path, then check_graph. Quiet unless it fails.

    With a `store` (shared_weights.WeightStore) the graph is saved with external data and its weights are moved into
    the store's shared file (written once across graphs). `report(phase, detail)` is told "tracing", "writing",
    "sharing" and "checking" as each starts, with the bytes written so far as detail where known.

    `quantize` (graphs/quantize.QuantScheme) rewrites the weight MatMuls after the checks (the TensorRT lint would
    name MatMulNBits, on purpose) and before the weights are shared, so float copies of them never reach the store."""
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    report("tracing", None)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(module, args, dynamo=True, input_names=input_names, output_names=output_names,
                                        dynamic_shapes=dynamic_shapes, opset_version=OPSET, optimize=True,
                                        verbose=False, report=False)
        except Exception as e:  # noqa: BLE001 - the exporter raises many types; one line names the graph
            first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:300]
            raise RuntimeFailure(f"exporting {path.name} failed: {first}") from e
    external = store is not None or params > EXTERNAL_DATA_BYTES
    data = Path(f"{path}.data")
    data.unlink(missing_ok=True)  # re-saving into an existing .data file appends
    report("writing", None)
    program.save(str(path), external_data=external)
    del program  # its folded constants are the only tensors it owns; the parameters stay with the module
    report("checking", file_size(path))
    check_graph(path)
    if quantize is not None:
        from .quantize import quantize_graph

        report("quantizing", file_size(path))
        quantize_graph(path, quantize, store.param_names if store is not None else None)
    if store is not None:
        report("sharing", file_size(path))
        store.absorb(path)
        onnx.checker.check_model(str(path), full_check=False)  # the rewritten references still resolve
    return path


def check_graph(path: Path) -> None:
    """onnx.checker + shape inference + the TensorRT-readiness lint; the first finding fails the export."""
    onnx.checker.check_model(str(path), full_check=False)
    model = onnx.load(str(path), load_external_data=False)
    onnx.shape_inference.infer_shapes(model, strict_mode=False)
    findings = lint_model(model, path.name)
    if findings:
        raise RuntimeFailure(f"{findings[0]} ({len(findings)} TensorRT-readiness finding(s))")


def topk_values(path: Path) -> list[int]:
    """The constant K of every TopK in a graph (for the K <= 3840 check and tests)."""
    model = onnx.load(str(path), load_external_data=False)
    values = {init.name: onnx.numpy_helper.to_array(init) for init in model.graph.initializer
              if init.data_location != onnx.TensorProto.EXTERNAL}  # K is a small inline constant; weights are not
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return [int(values[n.input[1]].reshape(-1)[0]) for n in model.graph.node if n.op_type == "TopK"]


def batch_dim() -> Dim:
    return Dim("batch", min=1, max=256)


def seq_dim(min_len: int, name: str = "seq") -> Dim:
    return Dim(name, min=max(2, min_len), max=32768)


def file_size(path: Path) -> int:
    extra = Path(f"{path}.data")
    return os.path.getsize(path) + (os.path.getsize(extra) if extra.exists() else 0)
