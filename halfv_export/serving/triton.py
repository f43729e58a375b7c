"""A Triton Inference Server model repository for one build (`halfv-export triton`).

    REPO/
      halfv/            the orchestrator (Python backend): image bytes + prompt (+ max_tokens, full) in, text out;
        config.pbtxt    dynamic batching; runs vision -> embed -> prefill (HalfV in-graph) -> decode through BLS
        1/model.py
        build/          the build's manifest-listed files, once (hard links where the file system allows, else
                        copies; manifest-checked at load); every graph model reads it
      halfv_stream/     the same orchestrator, decoupled: one response per decoded piece, then a final flag
      halfv_<graph>/    one model per graph (embed, vision_HxW, prefill_HxW, prefill_full, decode, decode_full):
        config.pbtxt    `--graph-backend onnxruntime` (default): Triton's onnxruntime backend over 1/model.onnx,
        1/...           a relative link to the exported graph in ../../halfv/build, with weights.bin linked beside
                        it; `--graph-backend python`: a Python model running the graph with ONNX Runtime in the
                        stub (what a Python-backend-only server, e.g. the nvidia-pytriton wheel's, can run);
                        `--graph-backend tensorrt`: Triton's tensorrt backend over 1/model.plan, a link to the
                        build's trt/ plan (`halfv-export engine --target tensorrt` built it on the serving GPU),
                        every optimisation profile offered to the instances

Graph models take max_batch_size 0: their batch axis is not always the first (positions are [P, B, S]), so
Triton must not add one; batching happens in the orchestrator, which groups the requests Triton's dynamic batcher
hands it by image bucket (engines/api.Model). Inputs, outputs, dtypes and dims come from the graphs themselves
(ONNX Runtime's session metadata; symbolic dims are -1). Links, not copies: the repository holds weights.bin once
and stays self-contained, so it can be mounted into a container as one folder. TensorRT plans are the exception to
weights held once: a plan is a compiled engine with its own copy of the weights its graph uses (TensorRT has no
external weights for a serialised plan), as `--target tensorrt` already stores them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..base.errors import BadInput
from ..base.manifest import MANIFEST, sha256_file, verify_manifest
from ..base.staging import staged_build

ORCHESTRATOR = "halfv"
STREAMING = "halfv_stream"
GRAPHS_FILE = "graphs.json"  # in the orchestrator's folder: graph -> its model, inputs and outputs (BLS calls)
BUILD_DIR = "build"  # inside the orchestrator's model folder (not a version number, so Triton ignores it)
GRAPH_BACKENDS = ("onnxruntime", "python", "tensorrt")
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}

# ONNX Runtime's element type names -> Triton's
TRITON_TYPES = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16", "tensor(bfloat16)": "TYPE_BF16",
                "tensor(int64)": "TYPE_INT64", "tensor(int32)": "TYPE_INT32", "tensor(bool)": "TYPE_BOOL",
                "tensor(int8)": "TYPE_INT8", "tensor(uint8)": "TYPE_UINT8", "tensor(double)": "TYPE_FP64"}

MODEL_PY = '''"""Triton Python backend entry point (written by `halfv-export triton`); the code is halfv_export's."""
from halfv_export.serving.triton_models import {cls} as TritonPythonModel  # noqa: F401
'''


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton's TYPE_*
    dims: tuple[int, ...]  # -1 where dynamic

    def pbtxt(self) -> str:
        dims = ", ".join(str(d) for d in self.dims)
        return f'  {{ name: "{self.name}" data_type: {self.data_type} dims: [ {dims} ] }}'


def model_name(graph: str, prefix: str = ORCHESTRATOR) -> str:
    """The Triton model of one graph file: embed.onnx -> halfv_embed."""
    return f"{prefix}_{Path(graph).stem}"


def graph_io(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """A graph's inputs and outputs as Triton tensors: from the ONNX file without its weights where the onnx
    package is installed (the toolchain), else from an ONNX Runtime session (the runtime install)."""
    try:
        import onnx
    except ImportError:
        onnx = None
    if onnx is not None:
        graph = onnx.load(str(path), load_external_data=False).graph
        initializers = {i.name for i in graph.initializer}

        def values(items):  # ONNX Runtime spells element types as tensor(<onnx's name, lower case>)
            return [(v.name, f"tensor({onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type).lower()})",
                     [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim])
                    for v in items if v.name not in initializers]

        ins, outs = values(graph.input), values(graph.output)
    else:
        import onnxruntime

        from ..engines.ort import session_options

        # a whole session (weights included) only to read names: the runtime install has nothing lighter
        options = session_options()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ins, outs = ([(a.name, a.type, a.shape) for a in args] for args in (session.get_inputs(),
                                                                           session.get_outputs()))

    def spec(name: str, kind: str, shape) -> TensorSpec:
        if kind not in TRITON_TYPES:
            raise BadInput(f"{path.name}: {name} has type {kind}, which has no Triton type here")
        return TensorSpec(name, TRITON_TYPES[kind], tuple(d if isinstance(d, int) else -1 for d in shape))

    return [spec(*a) for a in ins], [spec(*a) for a in outs]


def graph_config(name: str, graph: str, inputs: list[TensorSpec], outputs: list[TensorSpec], backend: str,
                 kind: str, instances: int, profiles: int = 0) -> str:
    lines = [f'name: "{name}"']
    group = f"count: {instances} kind: {KINDS[kind]}"
    if backend == "onnxruntime":
        lines += ['backend: "onnxruntime"', 'default_model_filename: "model.onnx"']
    elif backend == "tensorrt":
        lines += ['backend: "tensorrt"', 'default_model_filename: "model.plan"']
        if profiles > 1:  # Triton gives an instance the first profile only unless told: offer every one
            group += " profile: [ " + ", ".join(f'"{i}"' for i in range(profiles)) + " ]"
    else:
        lines += ['backend: "python"', f'parameters {{ key: "graph" value {{ string_value: "{graph}" }} }}',
                  f'parameters {{ key: "build" value {{ string_value: "../{ORCHESTRATOR}/{BUILD_DIR}" }} }}']
    lines += ["max_batch_size: 0  # batching is the orchestrator's: positions carry the batch on axis 1",
              "input [", ",\n".join(t.pbtxt() for t in inputs), "]",
              "output [", ",\n".join(t.pbtxt() for t in outputs), "]",
              f"instance_group [ {{ {group} }} ]"]
    return "\n".join(lines) + "\n"


def orchestrator_config(name: str, max_batch: int, queue_delay_us: int, decoupled: bool) -> str:
    return "\n".join([
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {max_batch}",
        "input [",
        '  { name: "prompt" data_type: TYPE_STRING dims: [ 1 ] },',
        '  { name: "image" data_type: TYPE_STRING dims: [ 1 ] optional: true },',
        '  { name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true },',
        '  { name: "full" data_type: TYPE_BOOL dims: [ 1 ] optional: true }',
        "]",
        "output [",
        '  { name: "text" data_type: TYPE_STRING dims: [ 1 ] },',
        '  { name: "finish_reason" data_type: TYPE_STRING dims: [ 1 ] }',
        "]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}",
        f"model_transaction_policy {{ decoupled: {'true' if decoupled else 'false'} }}",
        # one instance: it only waits on the graph models, and Triton's batcher hands it whole batches
        "instance_group [ { count: 1 kind: KIND_CPU } ]",
        f'parameters {{ key: "build" value {{ string_value: "../{ORCHESTRATOR}/{BUILD_DIR}" }} }}',
    ]) + "\n"


def _link(target: Path, link: Path) -> None:
    """A relative symlink, so the repository can be moved or mounted as one folder."""
    link.symlink_to(os.path.relpath(target, link.parent))


def _copy_build(build: Path, to: Path) -> None:
    """The build's manifest-listed files and the manifest, hard-linked where the file system allows (no second
    copy of weights.bin on disk), else copied; nothing else of the folder (no partial or stale files)."""
    listed = json.loads((build / MANIFEST).read_text())["files"]
    for name in [*listed, MANIFEST]:
        source, target = build / name, to / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)


@dataclass(frozen=True)
class TritonOptions:
    graph_backend: str = "onnxruntime"  # or "python", "tensorrt"
    kind: str | None = None  # graph models' instance kind; None: gpu for tensorrt, else cpu
    instances: int = 1  # instances of each graph model
    max_batch: int = 8  # requests the orchestrator takes at once (Triton's dynamic batcher fills it)
    queue_delay_us: int = 10_000  # how long the batcher waits for more requests


def write_repository(artifacts: Path, out: Path, options: TritonOptions = TritonOptions()) -> dict:
    """Write the model repository for the build in `artifacts` to `out` (staged: `out` appears whole or not at
    all, and a previous `out` stays until the new one is complete) -> a summary: models, their backends, files."""
    artifacts, out = Path(artifacts), Path(out)
    if options.graph_backend not in GRAPH_BACKENDS:
        raise BadInput(f"unknown graph backend '{options.graph_backend}'; choose one of {', '.join(GRAPH_BACKENDS)}")
    kind = options.kind or ("gpu" if options.graph_backend == "tensorrt" else "cpu")
    if kind not in KINDS:
        raise BadInput(f"unknown instance kind '{kind}'; choose cpu or gpu")
    if kind == "gpu" and options.graph_backend == "python":
        raise BadInput("--kind gpu needs --graph-backend onnxruntime or tensorrt (the Python graph models run ONNX "
                       "Runtime's CPU provider)")
    if kind == "cpu" and options.graph_backend == "tensorrt":
        raise BadInput("TensorRT plans run on the GPU they were built on; use --kind gpu, or --graph-backend "
                       "onnxruntime for CPU instances")
    meta_path = artifacts / "artifacts.json"
    if not meta_path.exists():
        raise BadInput(f"{artifacts} has no artifacts.json; pass the --out folder of `halfv-export build`")
    refuse_out(artifacts, out)
    verify_manifest(artifacts, full=False)
    meta = json.loads(meta_path.read_text())
    if meta.get("precision", "fp32") == "bf16":
        raise BadInput("these graphs are bf16, and the orchestrator's tensors cross Triton's Python backend as numpy, "
                       "which has no bfloat16; export with --precision fp16 or fp32")
    if meta.get("vision_cut"):
        raise BadInput("this build has a vision cut, whose prompt rows depend on the tower's output, and the Triton "
                       "orchestrator does not cut rows yet; serve it with `halfv-export serve`, or build without "
                       "--vision-cut for Triton")
    graphs = list(meta["graphs"])
    trt = tensorrt_plans(artifacts, graphs) if options.graph_backend == "tensorrt" else None
    plans = trt["graphs"] if trt else {}
    models, calls = {}, {}
    with staged_build(out) as stage:
        build = stage / ORCHESTRATOR / BUILD_DIR
        _copy_build(artifacts, build)
        for name, decoupled in ((ORCHESTRATOR, False), (STREAMING, True)):
            folder = stage / name
            (folder / "1").mkdir(parents=True, exist_ok=True)
            (folder / "config.pbtxt").write_text(orchestrator_config(name, options.max_batch, options.queue_delay_us,
                                                                     decoupled))
            (folder / "1" / "model.py").write_text(MODEL_PY.format(cls="Orchestrator"))
            models[name] = "python (orchestrator" + (", decoupled)" if decoupled else ")")
        for graph in graphs:
            name = model_name(graph)
            folder = stage / name
            (folder / "1").mkdir(parents=True)
            inputs, outputs = graph_io(artifacts / graph)
            calls[graph] = {"model": name, "inputs": [t.name for t in inputs], "outputs": [t.name for t in outputs]}
            (folder / "config.pbtxt").write_text(graph_config(name, graph, inputs, outputs, options.graph_backend,
                                                              kind, options.instances,
                                                              len(plans[graph]["profiles"]) if plans else 0))
            if options.graph_backend == "onnxruntime":
                _link(build / graph, folder / "1" / "model.onnx")
                for data in external_data(build):  # read relative to model.onnx, as ONNX external data is
                    _link(data, folder / "1" / data.name)
            elif options.graph_backend == "tensorrt":
                _link(build / plans[graph]["engine"], folder / "1" / "model.plan")
            else:
                (folder / "1" / "model.py").write_text(MODEL_PY.format(cls="GraphModel"))
            models[name] = options.graph_backend
        (stage / ORCHESTRATOR / GRAPHS_FILE).write_text(json.dumps(calls, indent=1) + "\n")
    summary = {"repository": str(out), "models": models, "graph_backend": options.graph_backend, "kind": kind,
               "backbone": meta["backbone"], "buckets": [b["size"] for b in meta["buckets"]]}
    if trt:
        info = trt["info"]
        summary["tensorrt"] = {"version": info["tensorrt"], "gpu": info["gpu"],
                               "compute_capability": info["compute_capability"]}
    return summary


def tensorrt_plans(artifacts: Path, graphs: list[str]) -> dict:
    """trt/engine.json ("info") and graph -> its plan entry ("graphs"), each plan checked now (present, in the
    manifest, built from this graph), since a server would only find out when it loads the model."""
    from ..engines.trt import read_plans, refuse_quantized, stale_plan

    refuse_quantized(artifacts)
    info, plans, unverified = read_plans(artifacts)
    listed = json.loads((artifacts / MANIFEST).read_text())["files"]  # what the repository's copy of the build holds
    for graph in graphs:
        if graph in unverified and sha256_file(artifacts / graph) != plans[graph]["onnx_sha256"]:
            raise stale_plan(artifacts, plans[graph], graph)
        if not (artifacts / plans[graph]["engine"]).is_file() or plans[graph]["engine"] not in listed:
            raise BadInput(f"{artifacts / plans[graph]['engine']} is missing or not in the manifest; rebuild the "
                           f"plans with `halfv-export engine --artifacts {artifacts} --target tensorrt`")
    return {"info": info, "graphs": {graph: plans[graph] for graph in graphs}}


def refuse_out(artifacts: Path, out: Path) -> None:
    """`out` is replaced whole (staged), so it must be a folder this command wrote, or new, and apart from the
    build."""
    a, o = artifacts.resolve(), out.resolve()
    if o == a or a in o.parents or o in a.parents:
        raise BadInput(f"--out {out} overlaps the build {artifacts}; write the repository to a folder of its own")
    if o.exists() and (not o.is_dir() or (any(o.iterdir()) and not (o / ORCHESTRATOR / GRAPHS_FILE).exists())):
        raise BadInput(f"--out {out} exists and is not a repository written by `halfv-export triton`; choose a new "
                       "folder or remove it")


def external_data(build: Path) -> list[Path]:
    """The files graphs read their external tensors from: weights.bin, and the packed weights of a quantised
    export (`*.data`)."""
    return sorted(p for p in build.iterdir() if p.is_file() and p.suffix in (".bin", ".data"))
