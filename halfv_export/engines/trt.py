"""TensorRT engines from the build plan, and a runner behind the same interface as OrtRunner.

TensorRT is imported lazily: everything else in halfv-export works without it. Written against the Python API of
TensorRT 10.x and 11.x: flags are looked up by name (EXPLICIT_BATCH is gone in 11, STRONGLY_TYPED is the default
there and absent or ignored), strongly typed networks keep the precision the ONNX graph spells out (scores, norms
and softmax in fp32), and `build_serialized_network` + a reused timing cache produce the plans.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from typing import TYPE_CHECKING

from ..base.artifact_files import TRT_DIR
from ..base.atomic import write_bytes_atomic, write_text_atomic
from ..base.errors import BadInput, RuntimeFailure
from ..base.manifest import MANIFEST, sha256_file
from .arrays import TorchArrays
from .base import EngineOptions, EngineTarget, register_target

if TYPE_CHECKING:  # trt_plan needs onnx and sympy (the toolchain): imported where a build uses it, so that the
    from .trt_plan import TrtBuildPlan  # runtime install can still list this target

NO_TENSORRT = ("TensorRT is not installed here (its pip packages fetch NVIDIA's libraries from NVIDIA's own index); "
               "build TensorRT engines on a GPU machine with TensorRT 10 or 11, or use --target onnxruntime")
NO_GPU = "no CUDA GPU is visible, and TensorRT builds engines on the GPU they will run on; use --target onnxruntime"


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BadInput(NO_TENSORRT) from None
    return trt


def refuse_quantized(artifacts: Path) -> None:
    """A --quantize export holds ONNX Runtime's weight-only forms; TensorRT takes int4/int8 weights only as Q/DQ
    of its own recipe, so say so before TensorRT or a GPU is even looked for."""
    meta_path = Path(artifacts) / "artifacts.json"
    quantize = json.loads(meta_path.read_text()).get("quantize") if meta_path.exists() else None
    if quantize:
        raise BadInput(f"{artifacts} is a --quantize {quantize['scheme']} export ({quantize['op']}, for ONNX Runtime); "
                       "TensorRT takes int4/int8 weights only as its own Q/DQ: export without --quantize for "
                       "--target tensorrt")


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


def _attach_timing_cache(config, data: bytes, where: str, log) -> bool:
    """Give the builder config a timing cache made from `data`. A cache TensorRT refuses (another GPU or TensorRT
    version: set_timing_cache returns False) costs build time, not correctness: warn and start a fresh one."""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, False):
        return True
    if data:
        log(f"warning: TensorRT refused the timing cache {where} (made on another GPU or TensorRT version?); "
            "building without it, and a fresh cache replaces it")
        cache = config.create_timing_cache(b"")
        if cache is not None and config.set_timing_cache(cache, False):
            return True
    log("warning: TensorRT refused an empty timing cache; building without one")
    return False


def _add_profiles(builder, config, graph) -> None:
    for index, profile in enumerate(graph.profiles):
        p = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            try:
                p.set_shape(name, lo, opt, hi)
            except RuntimeError as e:  # the bindings raise when min <= opt <= max does not hold
                raise RuntimeFailure(f"TensorRT rejected optimisation profile {index} of {graph.graph} for input "
                                     f"{name} (min {lo}, opt {opt}, max {hi}): {e}") from None
        if config.add_optimization_profile(p) < 0:
            shown = ", ".join(f"{name} {lo}..{hi}" for name, (lo, _, hi) in profile.items())
            raise RuntimeFailure(f"TensorRT rejected optimisation profile {index} of {graph.graph} ({shown}); "
                                 "see the TensorRT log above")


def build_trt_engines(artifacts: Path, plan: "TrtBuildPlan", log=print) -> dict:
    from .trt_plan import trtexec_command

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
        cached = _attach_timing_cache(config, cache_bytes, plan.timing_cache, log)
        if not cached:
            cache_bytes = b""
        for flag in graph.flags:
            if flag not in trt.BuilderFlag.__members__:
                raise BadInput(f"TensorRT {trt.__version__} has no builder flag {flag}")
            config.set_flag(getattr(trt.BuilderFlag, flag))
        _add_profiles(builder, config, graph)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise RuntimeFailure(f"TensorRT failed to build {graph.graph} (see the TensorRT log above)")
        write_bytes_atomic(artifacts / graph.engine, bytes(blob))
        if cached:  # the cache now also holds this graph's tactics; the next graph starts from it
            cache_bytes = bytes(config.get_timing_cache().serialize())
        built.append({"graph": graph.graph, "engine": graph.engine, "seconds": round(time.perf_counter() - started, 1)})
    if cache_bytes:
        write_bytes_atomic(cache_path, cache_bytes)
    major, minor = torch.cuda.get_device_capability()
    info = {"target": "tensorrt", "tensorrt": trt.__version__, "gpu": torch.cuda.get_device_name(),
            "compute_capability": f"{major}.{minor}", "plan": plan.to_dict(), "built": built,
            "trtexec": {g.graph: trtexec_command(plan, g) for g in plan.graphs}}
    write_text_atomic(artifacts / TRT_DIR / "engine.json", json.dumps(info, indent=2) + "\n")
    return info


def build_engines(artifacts: Path, options: EngineOptions, log=print) -> dict:
    """The engine stage for --target tensorrt: fail fast (a quantised export, no TensorRT, no GPU: one sentence)
    before planning."""
    from .trt_plan import PlanOptions, make_plan

    refuse_quantized(artifacts)
    import_tensorrt()
    require_gpu()
    plan = make_plan(artifacts, options.plan or PlanOptions())
    info = build_trt_engines(artifacts, plan, log=log)
    info["providers"] = [f"TensorRT {info['tensorrt']} on {info['gpu']}"]
    info["graphs"] = [g.graph for g in plan.graphs]
    return info


# TensorRT DataType member name -> torch dtype name. By name, not trt.nptype: numpy has no bfloat16 (nptype raises
# for BF16), and members differ across versions (FP4 / E8M0 are newer). INT4, FP4 and E8M0 have no torch dtype.
TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "FP8": "float8_e4m3fn", "INT8": "int8",
                "UINT8": "uint8", "INT32": "int32", "INT64": "int64", "BOOL": "bool"}
REBUILD = "halfv-export engine --artifacts {artifacts} --target tensorrt"


def trt_dtype_name(dtype) -> str:
    name = getattr(dtype, "name", None)  # pybind11 enums carry .name; str() reads "DataType.BF16"
    return name if isinstance(name, str) else str(dtype).rsplit(".", 1)[-1]


class _CudaStream:
    """TensorRT's own stream (the legacy default stream makes enqueueV3 synchronise internally). `before` orders it
    after the torch work that produced the inputs; `after` waits for it, so outputs are complete when `run` returns
    and its input buffers may be freed (one host sync per graph call: decode needs its token on the host anyway)."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        self.stream = torch.cuda.Stream(device=device)
        self.handle = self.stream.cuda_stream

    def before(self):
        self.stream.wait_stream(self.torch.cuda.current_stream(self.device))

    def after(self):
        self.stream.synchronize()


class _HostStream:
    """For a non-CUDA `device`, where only a stand-in for TensorRT can run (the tests): there is nothing to order."""

    handle = 0

    def before(self):
        pass

    def after(self):
        pass


@dataclass
class _EngineIO:
    inputs: dict  # name -> torch dtype
    outputs: dict  # name -> torch dtype
    profiles: list  # per optimisation profile: dynamic input name -> (min shape, max shape)


def stale_plan(artifacts: Path, plan: dict, graph: str) -> BadInput:
    return BadInput(f"{plan['engine']} was built from another {graph} than the one in {artifacts} (exported again "
                    f"since); rebuild the plans with `{REBUILD.format(artifacts=artifacts)}`")


def read_plans(artifacts: Path) -> tuple[dict, dict, set[str]]:
    """trt/engine.json, graph -> its plan entry, and the graphs whose plan is not yet checked against the graph.

    Refuses in one line when there are no plans, a graph has none (exported after the plans were built), or a plan
    was built from another graph than the one the manifest records; a graph the manifest does not list is left for
    the caller to hash (`stale_plan` when it differs)."""
    artifacts = Path(artifacts)
    rebuild = REBUILD.format(artifacts=artifacts)
    info_path = artifacts / TRT_DIR / "engine.json"
    if not info_path.exists():
        raise BadInput(f"{artifacts} has no TensorRT engines; run `{rebuild}`")
    info = json.loads(info_path.read_text())
    plans = {g["graph"]: g for g in info["plan"]["graphs"]}
    meta_path = artifacts / "artifacts.json"
    graphs = json.loads(meta_path.read_text())["graphs"] if meta_path.exists() else list(plans)
    manifest_path = artifacts / MANIFEST
    recorded = json.loads(manifest_path.read_text()).get("files", {}) if manifest_path.exists() else {}
    unverified = set()
    for graph in graphs:
        if graph not in plans:
            raise BadInput(f"trt/ has no plan for {graph} (exported after the plans were built); rebuild them with "
                           f"`{rebuild}`")
        if graph not in recorded:
            unverified.add(graph)
        elif recorded[graph] != plans[graph]["onnx_sha256"]:
            raise stale_plan(artifacts, plans[graph], graph)
    return info, plans, unverified


class TrtRunner:
    """Runs the plans in trt/ on torch-owned buffers of one device (CUDA; see `device`).

    Feeds are torch tensors on that device (used in place), other tensors or numpy arrays (copied there once);
    outputs are new torch tensors on the device, so one graph's outputs feed the next without a host round trip.
    Each feed must have the dtype the engine declares for it (`engine.get_tensor_dtype`): integer feeds are cast
    when every value fits (int32 ids into an int64 input), anything else is refused in one line, since TensorRT would
    read the bytes as the declared type.

    One execution context per engine, created with ON_PROFILE_CHANGE allocation (device memory for the active
    profile only, not the largest of all profiles); each call keeps the active profile when the feeds fit it, else
    switches to the first profile that fits, then sets the input shapes (shapes always follow the switch).

    Plans are refused when they were built from other graphs than the ones in the folder: engine.json records each
    ONNX file's sha256 at build time, compared with manifest.json's (which `run` / `validate` verify against the
    files before they open a runner); a graph the manifest does not list is hashed when its plan is first loaded.

    device: torch device of the buffers; None = the current CUDA device. Anything but CUDA only makes sense with a
    stand-in for the tensorrt module (tests), since TensorRT dereferences the addresses on the GPU."""

    runs_bf16 = True

    def __init__(self, artifacts: Path, device=None):
        refuse_quantized(artifacts)
        self.trt = import_tensorrt()
        if device is None:
            torch = require_gpu()
            device = torch.device("cuda", torch.cuda.current_device())
        import torch

        self.torch = torch
        self.arrays = TorchArrays(device)
        self.device = self.arrays.device
        self.artifacts = Path(artifacts)
        self.rebuild = REBUILD.format(artifacts=self.artifacts)
        self.info, self.plans, self._unverified = read_plans(self.artifacts)
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.stream = _CudaStream(torch, self.device) if self.device.type == "cuda" else _HostStream()
        self.engines: dict = {}
        self.io: dict[str, _EngineIO] = {}
        self.contexts: dict = {}  # graph -> its one execution context
        self.active: dict[str, int] = {}  # graph -> the profile its context has selected (-1: none yet)

    def describe(self) -> str:
        return f"{self.info['gpu']} (sm {self.info['compute_capability']}), TensorRT {self.info['tensorrt']}"

    # ------------------------------------------------------------------------------------------ plans
    def _stale(self, graph: str) -> BadInput:
        return stale_plan(self.artifacts, self.plans[graph], graph)

    def _engine(self, graph: str):
        if graph in self.engines:
            return self.engines[graph]
        if graph not in self.plans:
            raise BadInput(f"trt/ has no plan for {graph}; rebuild the plans with `{self.rebuild}`")
        if graph in self._unverified:
            if sha256_file(self.artifacts / graph) != self.plans[graph]["onnx_sha256"]:
                raise self._stale(graph)
            self._unverified.discard(graph)
        path = self.artifacts / self.plans[graph]["engine"]
        if not path.exists():
            raise BadInput(f"{path} is missing; rebuild the plans with `{self.rebuild}`")
        engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise RuntimeFailure(f"TensorRT could not load {self.plans[graph]['engine']} (built for another "
                                 f"TensorRT version or GPU?); rebuild with `{self.rebuild}`")
        self.engines[graph] = engine
        self.io[graph] = self._read_io(graph, engine)
        return engine

    def _torch_dtype(self, graph: str, name: str, dtype):
        label = trt_dtype_name(dtype)
        if label not in TORCH_DTYPES or not hasattr(self.torch, TORCH_DTYPES[label]):
            raise RuntimeFailure(f"{graph}: tensor {name} is {label} in the TensorRT engine, which torch cannot hold")
        return getattr(self.torch, TORCH_DTYPES[label])

    def _read_io(self, graph: str, engine) -> _EngineIO:
        trt = self.trt
        inputs, outputs = {}, {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = self._torch_dtype(graph, name, engine.get_tensor_dtype(name))
            (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs)[name] = dtype
        dynamic = [name for name in inputs if any(d < 0 for d in engine.get_tensor_shape(name))]
        profiles = []
        for index in range(engine.num_optimization_profiles):
            ranges = {}
            for name in dynamic:
                lo, _, hi = engine.get_tensor_profile_shape(name, index)
                ranges[name] = (tuple(lo), tuple(hi))
            profiles.append(ranges)
        return _EngineIO(inputs, outputs, profiles)

    # ------------------------------------------------------------------------------------------ contexts
    def _context(self, graph: str, engine):
        if graph not in self.contexts:
            strategies = getattr(self.trt, "ExecutionContextAllocationStrategy", None)
            if strategies is not None and "ON_PROFILE_CHANGE" in strategies.__members__:
                context = engine.create_execution_context(strategies.ON_PROFILE_CHANGE)
            else:  # a TensorRT without allocation strategies: one allocation sized for the largest profile
                context = engine.create_execution_context()
            if context is None:
                raise RuntimeFailure(f"TensorRT could not create an execution context for {graph} (out of GPU "
                                     "memory?)")
            self.contexts[graph] = context
            self.active[graph] = getattr(context, "active_optimization_profile", -1)
        return self.contexts[graph]

    def _profile_index(self, graph: str, inputs: dict) -> int:
        """The active profile when the feeds fit it (no switch mid-decode), else the first that fits."""
        profiles = self.io[graph].profiles

        def fits(ranges):
            return all(len(inputs[name].shape) == len(lo)
                       and all(a <= v <= b for v, a, b in zip(inputs[name].shape, lo, hi))
                       for name, (lo, hi) in ranges.items())

        active = self.active.get(graph, -1)
        if 0 <= active < len(profiles) and fits(profiles[active]):
            return active
        for index, ranges in enumerate(profiles):
            if fits(ranges):
                return index
        shapes = {name: tuple(t.shape) for name, t in inputs.items()}
        raise BadInput(f"input shapes {shapes} fit no optimisation profile of {graph}; rebuild the engines with "
                       "larger --max-text / --max-batch / --max-new-tokens")

    def _switch(self, graph: str, context, index: int) -> None:
        if self.active.get(graph) == index:
            return
        try:
            ok = context.set_optimization_profile_async(index, self.stream.handle)
        except RuntimeError as e:  # the bindings raise "Error in set optimization profile async."
            ok, why = False, str(e)
        else:
            why = "returned False"
        if not ok:
            raise RuntimeFailure(f"TensorRT could not switch {graph} to optimisation profile {index} ({why})")
        self.active[graph] = index

    # ------------------------------------------------------------------------------------------ buffers
    def _input(self, graph: str, name: str, value, want):
        """A feed as a contiguous tensor on the device with the engine's dtype; dtype checked before any copy."""
        torch = self.torch
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
        if tensor.dtype != want:
            integral = not tensor.dtype.is_floating_point and not want.is_floating_point
            integral = integral and torch.bool not in (tensor.dtype, want) and not tensor.dtype.is_complex
            if not (integral and self._fits(tensor, want)):
                given, expected = str(tensor.dtype).removeprefix("torch."), str(want).removeprefix("torch.")
                raise BadInput(f"{graph}: input {name} is {given}, but its TensorRT engine takes {expected}; feed "
                               f"{expected} (for floats: the precision the graphs were exported with)")
            tensor = tensor.to(want)
        return tensor.to(self.device).contiguous()

    def _fits(self, tensor, want) -> bool:
        if tensor.numel() == 0:
            return True
        info = self.torch.iinfo(want)
        return info.min <= int(tensor.min()) and int(tensor.max()) <= info.max

    def run(self, graph: str, feeds: dict) -> dict:
        engine = self._engine(graph)
        io = self.io[graph]
        missing = [name for name in io.inputs if name not in feeds]
        if missing:
            raise BadInput(f"{graph} needs input {missing[0]}, which was not fed")
        inputs = {name: self._input(graph, name, feeds[name], dtype) for name, dtype in io.inputs.items()}
        context = self._context(graph, engine)
        index = self._profile_index(graph, inputs)
        self._switch(graph, context, index)
        for name, tensor in inputs.items():  # after the switch: selecting a profile resets the input shapes
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise RuntimeFailure(f"TensorRT refused shape {tuple(tensor.shape)} for input {name} of {graph} "
                                     f"(optimisation profile {index})")
            if not context.set_tensor_address(name, tensor.data_ptr()):
                raise RuntimeFailure(f"TensorRT refused the buffer of input {name} of {graph}")
        outputs = {}
        for name, dtype in io.outputs.items():
            shape = tuple(context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeFailure(f"TensorRT could not infer the shape of output {name} of {graph} ({shape})")
            tensor = self.torch.empty(shape, dtype=dtype, device=self.device)
            if not context.set_tensor_address(name, tensor.data_ptr()):
                raise RuntimeFailure(f"TensorRT refused the buffer of output {name} of {graph}")
            outputs[name] = tensor
        self.stream.before()
        if not context.execute_async_v3(self.stream.handle):
            raise RuntimeFailure(f"TensorRT execution of {graph} failed (see the TensorRT log above)")
        self.stream.after()
        return outputs


def _quantized(artifacts: Path) -> bool:
    """No trtexec lines for a quantised export: TensorRT would refuse its graphs (refuse_quantized)."""
    try:
        refuse_quantized(artifacts)
    except BadInput:
        return True
    return False


def _trtexec_lines(artifacts: Path, plan) -> dict:
    from .trt_plan import trtexec_lines

    return trtexec_lines(artifacts, plan)


register_target(EngineTarget(
    name="tensorrt", engine_dir=TRT_DIR, build=build_engines,
    open=lambda artifacts, options: TrtRunner(artifacts),
    manifest_extra=lambda artifacts, options: {} if _quantized(artifacts) else _trtexec_lines(artifacts, options.plan),
    summary="TensorRT plans in trt/, one optimisation profile per image bucket (needs TensorRT 10/11 and a GPU)"))
