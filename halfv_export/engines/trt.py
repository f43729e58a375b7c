"""TensorRT engines from the build plan, and a runner behind the same interface as OrtRunner.

TensorRT is imported lazily: everything else in halfv-export works without it. Written against the Python API of
TensorRT 10.x and 11.x: flags are looked up by name (EXPLICIT_BATCH is gone in 11, STRONGLY_TYPED is the default
there and absent or ignored), strongly typed networks keep the precision the ONNX graph spells out (scores, norms
and softmax in fp32), and `build_serialized_network` + a reused timing cache produce the plans.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..base.errors import BadInput, RuntimeFailure
from ..base.atomic import write_bytes_atomic, write_text_atomic
from .base import EngineOptions, EngineTarget, register_target
from .trt_plan import TRT_DIR, PlanOptions, TrtBuildPlan, make_plan, trtexec_command, trtexec_lines

NO_TENSORRT = ("TensorRT is not installed here (its pip packages fetch NVIDIA's libraries from NVIDIA's own index); "
               "build TensorRT engines on a GPU machine with TensorRT 10 or 11, or use --target onnxruntime")
NO_GPU = "no CUDA GPU is visible, and TensorRT builds engines on the GPU they will run on; use --target onnxruntime"


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BadInput(NO_TENSORRT) from None
    return trt


def require_gpu():
    import torch

    if not torch.cuda.is_available():
        raise BadInput(NO_GPU)
    return torch


def _network_flags(trt, strongly_typed: bool) -> int:
    flags = 0
    names = trt.NetworkDefinitionCreationFlag.__members__
    if strongly_typed and "STRONGLY_TYPED" in names:  # 10.x; 11.x types every network strongly anyway
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return flags


def build_trt_engines(artifacts: Path, plan: TrtBuildPlan, log=print) -> dict:
    trt = import_tensorrt()
    torch = require_gpu()
    artifacts = Path(artifacts)
    (artifacts / TRT_DIR).mkdir(exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except TypeError:  # "pybind11::init(): factory function returned nullptr": CUDA failed to initialise
        raise BadInput(NO_GPU) from None
    cache_path = artifacts / plan.timing_cache
    cache_bytes = cache_path.read_bytes() if cache_path.exists() else b""
    built = []
    for graph in plan.graphs:
        log(f"building {graph.engine}")
        started = time.perf_counter()
        network = builder.create_network(_network_flags(trt, graph.strongly_typed))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(artifacts / graph.graph)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise RuntimeFailure(f"TensorRT could not parse {graph.graph}: {errors[0] if errors else 'unknown error'}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, graph.workspace_mib << 20)
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, False)
        for flag in graph.flags:
            if flag not in trt.BuilderFlag.__members__:
                raise BadInput(f"TensorRT {trt.__version__} has no builder flag {flag}")
            config.set_flag(getattr(trt.BuilderFlag, flag))
        for profile in graph.profiles:
            p = builder.create_optimization_profile()
            for name, (lo, opt, hi) in profile.items():
                p.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(p)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise RuntimeFailure(f"TensorRT failed to build {graph.graph} (see the TensorRT log above)")
        write_bytes_atomic(artifacts / graph.engine, bytes(blob))
        cache_bytes = bytes(config.get_timing_cache().serialize())
        built.append({"graph": graph.graph, "engine": graph.engine, "seconds": round(time.perf_counter() - started, 1)})
    write_bytes_atomic(cache_path, cache_bytes)
    major, minor = torch.cuda.get_device_capability()
    info = {"target": "tensorrt", "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(),
            "compute_capability": f"{major}.{minor}", "plan": plan.to_dict(), "built": built,
            "trtexec": {g.graph: trtexec_command(plan, g) for g in plan.graphs}}
    write_text_atomic(artifacts / TRT_DIR / "engine.json", json.dumps(info, indent=2) + "\n")
    return info


def build_engines(artifacts: Path, options: EngineOptions, log=print) -> dict:
    """The engine stage for --target tensorrt: fail fast (no TensorRT / no GPU, one sentence) before planning."""
    import_tensorrt()
    require_gpu()
    plan = make_plan(artifacts, options.plan or PlanOptions())
    info = build_trt_engines(artifacts, plan, log=log)
    info["providers"] = [f"TensorRT {info['tensorrt']} on {info['gpu']}"]
    info["graphs"] = [g.graph for g in plan.graphs]
    return info


class TrtRunner:
    """Runs plans from trt/ on CUDA buffers owned by torch; picks the first profile whose ranges fit the feeds."""

    runs_bf16 = True

    def __init__(self, artifacts: Path):
        self.trt = import_tensorrt()
        self.torch = require_gpu()
        self.artifacts = Path(artifacts)
        info_path = self.artifacts / TRT_DIR / "engine.json"
        if not info_path.exists():
            raise BadInput(f"{self.artifacts} has no TensorRT engines; run `halfv-export engine --target tensorrt`")
        self.info = json.loads(info_path.read_text())
        self.plans = {g["graph"]: g for g in self.info["plan"]["graphs"]}
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.engines: dict = {}
        self.contexts: dict = {}
        self.stream = self.torch.cuda.Stream()

    def describe(self) -> str:
        return f"{self.info['gpu']} (sm {self.info['compute_capability']}), TensorRT {self.info['tensorrt']}"

    def _engine(self, graph: str):
        if graph not in self.engines:
            blob = (self.artifacts / self.plans[graph]["engine"]).read_bytes()
            self.engines[graph] = self.runtime.deserialize_cuda_engine(blob)
            if self.engines[graph] is None:
                raise RuntimeFailure(f"TensorRT could not load {self.plans[graph]['engine']} (built for another "
                                     "TensorRT version or GPU?); rebuild with `halfv-export engine --target tensorrt`")
        return self.engines[graph]

    def _profile_index(self, graph: str, feeds: dict[str, np.ndarray]) -> int:
        profiles = self.plans[graph]["profiles"]
        for index, profile in enumerate(profiles):
            if all(all(lo <= v <= hi for v, lo, hi in zip(feeds[name].shape, mins, maxs))
                   for name, (mins, _, maxs) in profile.items() if name in feeds):
                return index
        if not profiles:
            return 0
        raise BadInput(f"input shapes {({k: v.shape for k, v in feeds.items()})} fit no optimisation profile of "
                       f"{graph}; rebuild the engines with larger --max-text / --max-batch")

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, torch = self.trt, self.torch
        engine = self._engine(graph)
        index = self._profile_index(graph, feeds)
        key = (graph, index)
        if key not in self.contexts:
            context = engine.create_execution_context()
            context.set_optimization_profile_async(index, self.stream.cuda_stream)
            self.contexts[key] = context
        context = self.contexts[key]
        buffers, outputs = [], {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                tensor = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
                context.set_input_shape(name, tuple(tensor.shape))
                context.set_tensor_address(name, tensor.data_ptr())
                buffers.append(tensor)
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.OUTPUT:
                dtype = torch.from_numpy(np.empty(0, dtype=trt.nptype(engine.get_tensor_dtype(name)))).dtype
                tensor = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
                context.set_tensor_address(name, tensor.data_ptr())
                outputs[name] = tensor
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeFailure(f"TensorRT execution of {graph} failed")
        self.stream.synchronize()
        return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}


register_target(EngineTarget(
    name="tensorrt", engine_dir=TRT_DIR, build=build_engines,
    open=lambda artifacts, options: TrtRunner(artifacts),
    manifest_extra=lambda artifacts, options: trtexec_lines(artifacts, options.plan),
    summary="TensorRT plans in trt/, one optimisation profile per image bucket (needs TensorRT 10/11 and a GPU)"))
