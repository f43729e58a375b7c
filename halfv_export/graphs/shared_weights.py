"""Weights stored once: every graph of an export reads its large initializers from one shared file.

Each graph is first saved by torch.onnx with its own external data (`<graph>.onnx.data`). `WeightStore.absorb`
then walks that graph's initializers one at a time (never the whole model in memory):

    key = (ONNX dtype, shape, sha256 of the raw little-endian bytes)
    new key      -> the bytes are appended to weights.bin at the next ALIGN-aligned offset
    known key    -> the graph's initializer points at the existing bytes (no second copy)

and rewrites the graph's initializer as an ONNX external-data reference (location weights.bin, offset, length) under
a canonical name that is the same in every graph: the model parameter's name when the bytes equal a parameter
(`param_names`, computed from the model at the export dtype), else `derived/<first name seen>` for tensors the
exporter computed from parameters (e.g. a constant-folded transpose) or constants. Graph-level renames are applied
to node inputs (subgraphs included) and graph outputs. Initializers under MIN_SHARED_BYTES stay inside the graph.

weights.json indexes the file: name -> dtype, shape, offset, length, sha256, and whether it equals a parameter.
Runners use it to hand ONNX Runtime one buffer per weight for all sessions (SessionOptions.add_initializer).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import torch

from ..base.atomic import write_text_atomic
from ..base.artifact_files import NUMPY_BY_ONNX, WEIGHTS_FILE, WEIGHTS_INDEX, read_index  # noqa: F401
from ..base.errors import RuntimeFailure

ALIGN = 4096  # page-aligned offsets: the file can be memory-mapped tensor by tensor
MIN_SHARED_BYTES = 1024
TRANSPOSED = "T:"
_CHUNK = 1 << 24


def tensor_key(data_type: int, dims, digest: str) -> str:
    return f"{data_type}:{'x'.join(str(int(d)) for d in dims)}:{digest}"


def parameter_names(module: torch.nn.Module, transposed: bool = True) -> dict[str, str]:
    """tensor_key -> parameter name for every parameter and buffer of `module` as it will be exported (its current
    dtype). Tied parameters appear once (the first name). With `transposed`, also TRANSPOSED + the key of each 2-D
    parameter's transpose, so that a constant-folded W^T is stored as W plus a Transpose node, not as a second copy."""
    from onnx.helper import np_dtype_to_tensor_dtype

    names: dict[str, str] = {}
    seen: set[int] = set()
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if tensor.data_ptr() in seen or tensor.numel() * tensor.element_size() < MIN_SHARED_BYTES:
            continue
        seen.add(tensor.data_ptr())
        t = tensor.detach().contiguous()
        if t.dtype == torch.bfloat16:
            data_type, raw = onnx.TensorProto.BFLOAT16, t.view(torch.int16).numpy()
        else:
            raw = t.numpy()
            data_type = np_dtype_to_tensor_dtype(raw.dtype)
        names.setdefault(tensor_key(data_type, t.shape, _digest(raw)), name)
        if transposed and raw.ndim == 2:  # what constant folding makes of Linear weights (MatMul by W^T)
            names.setdefault(TRANSPOSED + tensor_key(data_type, t.shape[::-1], _digest(raw.T.copy())), name)
    return names


def _digest(array) -> str:
    return hashlib.sha256(memoryview(array.reshape(-1)).cast("B")).hexdigest()


class WeightStore:
    """weights.bin + its index, written once per distinct tensor."""

    def __init__(self, directory: Path, param_names: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.path = self.directory / WEIGHTS_FILE
        self.param_names = param_names or {}
        self.entries: dict[str, dict] = {}  # canonical name -> index entry
        self._by_key: dict[str, str] = {}  # tensor_key -> canonical name
        self._file = open(self.path, "wb")
        self.bytes_absorbed = 0  # bytes the graphs referenced (with repeats)

    # -------------------------------------------------------------------------------------------- one tensor
    def _put(self, key: str, wanted: str, init: onnx.TensorProto, chunks) -> str:
        if key in self._by_key:
            for _ in chunks:  # consume (the caller's reader is lazy)
                pass
            return self._by_key[key]
        param = self.param_names.get(key)
        name = param or f"derived/{wanted}"
        while name in self.entries:  # a different tensor already took the name
            name = f"{name}~{key.rsplit(':', 1)[-1][:8]}"
        offset = -(-self._file.tell() // ALIGN) * ALIGN
        self._file.seek(offset)
        length = 0
        for chunk in chunks:
            self._file.write(chunk)
            length += len(chunk)
        self.entries[name] = {"dtype": int(init.data_type), "shape": [int(d) for d in init.dims], "offset": offset,
                              "length": length, "sha256": key.rsplit(":", 1)[-1], "parameter": param is not None}
        self._by_key[key] = name
        return name

    # -------------------------------------------------------------------------------------------- one graph
    def absorb(self, graph_path: Path) -> dict:
        """Move graph_path's large initializers into the store, rewrite the graph in place, delete its own external
        data file(s). Returns {"initializers": n, "shared": n_shared, "bytes": referenced bytes}."""
        graph_path = Path(graph_path)
        model = onnx.load(str(graph_path), load_external_data=False)
        renames: dict[str, str] = {}
        own_files: set[Path] = set()
        transposes: list[tuple[str, str]] = []  # (folded initializer, parameter it transposes)
        kept: set[str] = set()  # canonical names this graph already holds
        duplicates: set[int] = set()  # positions of initializers dropped for an equal one (same canonical name)
        shared = referenced = 0
        for position, init in enumerate(model.graph.initializer):
            external = _external_info(init)
            if external is not None:
                source = graph_path.parent / external["location"]
                own_files.add(source)
                length = external["length"]
                if length < MIN_SHARED_BYTES:  # small: inline it again
                    with open(source, "rb") as f:
                        f.seek(external["offset"])
                        init.raw_data = f.read(length)
                    del init.external_data[:]
                    init.data_location = onnx.TensorProto.DEFAULT
                    continue
                digest = _hash_file_range(source, external["offset"], length)
                chunks = _read_file_range(source, external["offset"], length)
            else:
                if init.data_location == onnx.TensorProto.EXTERNAL or not init.HasField("raw_data"):
                    # typed fields (float_data ...) only appear for tiny constants here
                    if init.ByteSize() < 4 * MIN_SHARED_BYTES:
                        continue
                    raw = onnx.numpy_helper.to_array(init).tobytes()
                else:
                    raw = init.raw_data
                if len(raw) < MIN_SHARED_BYTES:
                    continue
                length, digest, chunks = len(raw), hashlib.sha256(raw).hexdigest(), iter([raw])
            key = tensor_key(init.data_type, init.dims, digest)
            if key not in self._by_key and key not in self.param_names and TRANSPOSED + key in self.param_names:
                # a folded transpose of a parameter: reference the parameter and transpose in the graph
                param = self.param_names[TRANSPOSED + key]
                raw = b"".join(chunks)  # one tensor
                if param not in self.entries:  # no graph stored W itself yet: store it from W^T
                    flat = np.frombuffer(raw, dtype=NUMPY_BY_ONNX[init.data_type]).reshape(list(init.dims))
                    back = np.ascontiguousarray(flat.T)
                    back_key = tensor_key(init.data_type, back.shape, _digest(back))
                    proto = onnx.TensorProto(data_type=init.data_type, dims=list(back.shape))
                    param = self._put(back_key, param, proto, iter([back.tobytes()]))
                transposes.append((init.name, param))
                referenced += length
                continue
            name = self._put(key, init.name, init, chunks)
            entry = self.entries[name]
            if init.name != name:
                renames[init.name] = name
            if name in kept:  # equal bytes under two names in one graph (e.g. norm weights all ones): keep one
                duplicates.add(position)
                referenced += length
                continue
            kept.add(name)
            _point_at(init, name, entry)
            shared += 1
            referenced += length
        if duplicates:
            survivors = [i for n, i in enumerate(model.graph.initializer) if n not in duplicates]
            del model.graph.initializer[:]
            model.graph.initializer.extend(survivors)
        if renames:
            _rename_inputs(model.graph, renames)
        if transposes:
            _unfold_transposes(model.graph, transposes, self.entries)
        self._file.flush()
        tmp = graph_path.with_name(f".{graph_path.name}.tmp")
        onnx.save(model, str(tmp))
        os.replace(tmp, graph_path)
        for path in own_files:
            if path.resolve() != self.path.resolve():
                path.unlink(missing_ok=True)
        self.bytes_absorbed += referenced
        return {"initializers": len(model.graph.initializer), "shared": shared, "bytes": referenced}

    def close(self) -> dict:
        """Finish weights.bin and write weights.json; returns the index."""
        self._file.close()
        index = {"file": WEIGHTS_FILE, "align": ALIGN, "bytes": self.path.stat().st_size,
                 "tensors": self.entries}
        write_text_atomic(self.directory / WEIGHTS_INDEX, json.dumps(index, indent=1) + "\n")
        return index

    def abort(self) -> None:
        self._file.close()


# ------------------------------------------------------------------------------------------------ helpers
def _external_info(init: onnx.TensorProto) -> dict | None:
    if init.data_location != onnx.TensorProto.EXTERNAL:
        return None
    info = {e.key: e.value for e in init.external_data}
    if "location" not in info:
        raise RuntimeFailure(f"initializer {init.name} has external data without a location")
    return {"location": info["location"], "offset": int(info.get("offset", 0)),
            "length": int(info["length"]) if "length" in info else None}


def _read_file_range(path: Path, offset: int, length: int):
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left > 0:
            chunk = f.read(min(_CHUNK, left))
            if not chunk:
                raise RuntimeFailure(f"{path} ends before the {length} bytes its graph promises")
            left -= len(chunk)
            yield chunk


def _hash_file_range(path: Path, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    for chunk in _read_file_range(path, offset, length):
        digest.update(chunk)
    return digest.hexdigest()


def _point_at(init: onnx.TensorProto, name: str, entry: dict) -> None:
    init.name = name
    init.ClearField("raw_data")
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        init.ClearField(field)
    del init.external_data[:]
    init.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", WEIGHTS_FILE), ("offset", str(entry["offset"])),
                       ("length", str(entry["length"]))):
        item = init.external_data.add()
        item.key, item.value = key, value


def _unfold_transposes(graph: onnx.GraphProto, transposes: list[tuple[str, str]], entries: dict) -> None:
    """Replace each folded W^T initializer by Transpose(W) on the shared parameter (added once per graph)."""
    present = {init.name for init in graph.initializer}
    folded = {name for name, _ in transposes}
    kept = [init for init in graph.initializer if init.name not in folded]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = []
    for name, param in transposes:
        if param not in present:
            init = graph.initializer.add()
            entry = entries[param]
            init.data_type = entry["dtype"]
            init.dims.extend(entry["shape"])
            _point_at(init, param, entry)
            present.add(param)
        nodes.append(onnx.helper.make_node("Transpose", [param], [name], name=f"unfold/{name}", perm=[1, 0]))
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)


def _rename_inputs(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _rename_inputs(attr.g, renames)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    _rename_inputs(g, renames)
    for out in graph.output:
        if out.name in renames:
            out.name = renames[out.name]
    for info in graph.value_info:
        if info.name in renames:
            info.name = renames[info.name]


