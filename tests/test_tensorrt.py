"""TensorRT stage without TensorRT: the readiness lint (passes on real graphs, catches planted violations), the
build plan as data, the one-sentence refusal when TensorRT or a GPU is missing, and the builder applying the plan
(checked against a recording stand-in for the tensorrt module, since the real one cannot be installed here)."""

import ctypes
import enum
import functools
import json
import shlex
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper

from halfv_export.base.errors import BadInput, RuntimeFailure
from halfv_export.base.manifest import sha256_file, write_manifest
from halfv_export.engines import EngineOptions, EnginePipeline
from halfv_export.engines import trt as trt_module
from halfv_export.engines.ort import OrtRunner
from halfv_export.engines.trt import TrtRunner
from halfv_export.engines.trt_plan import PlanOptions, make_plan, trtexec_command
from halfv_export.stages.engine import engine as run_engine
from halfv_export.graphs.lint import lint_model

from tests.conftest import make_image


def tiny_graph(nodes, inputs, outputs, initializers=(), opset=20, value_info=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers), value_info=list(value_info))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def scores_input():
    return helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 5000])


def topk_model(k=16, sorted_=1, k_from_input=False):
    k_name = "k_in" if k_from_input else "k"
    inputs = [scores_input()] + ([helper.make_tensor_value_info("k_in", TensorProto.INT64, [1])] if k_from_input else [])
    inits = [] if k_from_input else [helper.make_tensor("k", TensorProto.INT64, [1], [k])]
    node = helper.make_node("TopK", ["scores", k_name], ["values", "indices"], sorted=sorted_, name="topk")
    outs = [helper.make_tensor_value_info("values", TensorProto.FLOAT, ["batch", k]),
            helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", k])]
    return tiny_graph([node], inputs, outs, inits)


def rules(model):
    return {f.rule for f in lint_model(model, "planted.onnx")}


def test_lint_accepts_a_clean_topk():
    assert rules(topk_model(16)) == set()


@pytest.mark.parametrize("model,rule", [
    (lambda: topk_model(k=4000), "topk"),
    (lambda: topk_model(sorted_=0), "topk"),
    (lambda: topk_model(k_from_input=True), "topk"),
    (lambda: tiny_graph([helper.make_node("NonZero", ["scores"], ["nz"])], [scores_input()],
                        [helper.make_tensor_value_info("nz", TensorProto.INT64, [2, "u0"])]), "dds"),
    (lambda: tiny_graph([helper.make_node("Unique", ["scores"], ["u"])], [scores_input()],
                        [helper.make_tensor_value_info("u", TensorProto.FLOAT, ["u1"])]), "op-supported"),
    (lambda: tiny_graph([helper.make_node("Unsqueeze", ["scores", "axes"], ["out"])],
                        [scores_input(), helper.make_tensor_value_info("axes", TensorProto.INT64, [1])],
                        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 1, 5000])]), "constant-axes"),
    (lambda: tiny_graph([helper.make_node("Relu", ["scores"], ["out"])], [scores_input()],
                        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 5000])], opset=23), "opset"),
])
def test_lint_catches_planted_violations(model, rule):
    assert rule in rules(model())


def test_lint_cli_on_exported_graphs_and_on_a_planted_one(exported, run_cli, tmp_path):
    ok = run_cli("lint", "--artifacts", exported)
    assert ok.exit_code == 0 and "TensorRT-ready" in ok.output
    onnx.save(topk_model(k=4000), str(tmp_path / "bad.onnx"))
    (tmp_path / "artifacts.json").write_text(json.dumps({"graphs": ["bad.onnx"]}))
    bad = run_cli("lint", "--artifacts", tmp_path)
    assert bad.exit_code == 1 and "K = 4000 exceeds TensorRT's limit of 3840" in bad.output


def test_build_plan_profiles_follow_buckets_and_cache_groups(exported):
    options = PlanOptions(max_batch=2, min_text=4, opt_text=32, max_text=100, max_new_tokens=50)
    plan = make_plan(exported, options)
    by_graph = {g.graph: g for g in plan.graphs}
    meta = json.loads((exported / "artifacts.json").read_text())
    assert set(by_graph) == set(meta["graphs"]) and plan.precision == "fp32"
    assert by_graph["vision_448x448.onnx"].profiles == []  # static shapes need no profile
    for bucket in meta["buckets"]:
        (profile,) = by_graph[bucket["prefill"]].profiles
        n = bucket["num_visual"]
        assert profile["embeds"] == [[1, n + 4, 128], [1, n + 32, 128], [2, n + 100, 128]]
        assert profile["positions"][2] == [3, 2, n + 100]
    decode = by_graph["decode.onnx"].profiles
    assert len(decode) == 2  # one per bucket
    b0 = meta["buckets"][0]
    assert decode[0]["past_key_0"][0][2] == b0["num_visual"] + 4  # group 0: N + T
    assert decode[0]["past_key_2"][2][2] == b0["k1"] + 100 + 50  # group 1 (layer 2 >= L1): K1 + T + new tokens
    assert decode[0]["past_key_7"][1][2] == b0["k2"] + 32  # group 2 (layer 7 >= L2): K2 + T
    assert decode[0]["cache_valid_1"][2][1] == b0["k1"] + 150 + 1
    assert len(by_graph["prefill_full.onnx"].profiles) == 3  # two buckets + text-only
    line = trtexec_command(plan, by_graph["decode.onnx"])
    # two profiles: two --profile=N blocks (test_trtexec_lines_follow_trtexec_grammar reads them as trtexec does)
    assert line.count("--profile=") == 2 and "--stronglyTyped" in line and "--fp16" not in line
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["trtexec"]["prefill_448x448.onnx"].startswith("trtexec --onnx=prefill_448x448.onnx")
    with pytest.raises(BadInput, match="min"):
        make_plan(exported, PlanOptions(min_text=64, opt_text=32))


def test_without_tensorrt_engine_says_so_and_exits_2(exported, run_cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails, as on every machine here
    result = run_cli("engine", "--artifacts", exported, "--target", "tensorrt")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["Error: " + trt_module.NO_TENSORRT]


def _tree(folder):
    """Every file under a folder -> its bytes' sha256 (what "untouched" means)."""
    return {str(p.relative_to(folder)): sha256_file(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_failed_engine_stage_keeps_the_previous_build(tiny_qwen_dir, tiny_qwen_build, run_cli, tmp_path,
                                                      monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = tmp_path / "prod"
    shutil.copytree(tiny_qwen_build, out)  # the previous good, validated build
    before = _tree(out)
    result = run_cli("build", "--backbone", "qwen2.5-vl", "--model", tiny_qwen_dir, "--image-size", "252x336",
                     "--paper-values", "--target", "tensorrt", "--out", out)
    assert result.exit_code == 2
    assert _tree(out) == before  # not one byte of the previous build changed
    aside = tmp_path / "prod.export-only"
    assert f"{out} is unchanged" in result.output and str(aside) in result.output
    assert (aside / "prefill_252x336.onnx").exists() and not (aside / "report.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prod", "prod.export-only"]  # no partial left behind
    # ... and the export left aside is usable by ONNX Runtime
    assert run_cli("engine", "--artifacts", aside, "--target", "onnxruntime").exit_code == 0
    assert run_cli("run", "--artifacts", aside, "--prompt", "hello", "--max-new-tokens", 2).exit_code == 0


# ------------------------------------------------------------------------------------------------ the stand-in
# TensorRT DataType members (pyFoundationalTypes.cpp) and how the stand-in reads / writes each in host memory
TRT_TYPES = ["FLOAT", "HALF", "BF16", "INT8", "INT32", "INT64", "BOOL", "UINT8", "FP8", "INT4", "FP4"]
HOST_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "BF16": np.uint16, "INT8": np.int8, "INT32": np.int32,
              "INT64": np.int64, "BOOL": np.bool_, "UINT8": np.uint8}
ONNX_TYPES = {TensorProto.FLOAT: "FLOAT", TensorProto.FLOAT16: "HALF", TensorProto.BFLOAT16: "BF16",
              TensorProto.INT64: "INT64", TensorProto.INT32: "INT32", TensorProto.BOOL: "BOOL"}


def _memory(address: int, shape, kind: str) -> np.ndarray:
    """The buffer at `address` as a writable numpy view (the addresses are torch CPU tensors' data_ptr here)."""
    dtype = np.dtype(HOST_TYPES[kind])
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.empty(shape, dtype)
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(address)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _read(address, shape, kind):
    data = _memory(address, shape, kind).copy()
    if kind == "BF16":  # bf16 is the top half of an fp32
        return (data.astype(np.uint32) << 16).view(np.float32)
    return data


def _write(address, kind, value: np.ndarray):
    if kind == "BF16":
        value = torch.from_numpy(np.ascontiguousarray(value, np.float32)).to(torch.bfloat16).view(torch.int16)
        value = value.numpy().view(np.uint16)
    _memory(address, value.shape, kind)[...] = value


class _StandInEngine:
    """io: [(name, "INPUT"/"OUTPUT", DataType name, shape with -1 for dynamic dims)]; profiles: per profile, input
    name -> (min, opt, max); compute: host inputs -> host outputs (fp32 for BF16 tensors)."""

    def __init__(self, fake, graph, io, profiles, compute):
        self.fake, self.graph, self.io, self.profiles, self.compute = fake, graph, io, profiles, compute
        self.by_name = {name: (mode, kind, shape) for name, mode, kind, shape in io}
        self.num_io_tensors = len(io)
        self.num_optimization_profiles = max(1, len(profiles))

    def get_tensor_name(self, index):
        return self.io[index][0]

    def get_tensor_mode(self, name):
        return getattr(self.fake.TensorIOMode, self.by_name[name][0])

    def get_tensor_dtype(self, name):
        return self.fake.DataType[self.by_name[name][1]]

    def get_tensor_shape(self, name):
        return list(self.by_name[name][2])

    def get_tensor_profile_shape(self, name, index):
        if -1 not in self.by_name[name][2]:
            raise RuntimeError("not a dynamic input")  # what the real one does for static inputs, roughly
        return [list(s) for s in self.profiles[index][name]]

    def create_execution_context(self, strategy=None):  # None: the binding's default (STATIC where it exists)
        self.fake.calls.append(("context", self.graph, strategy))
        return _StandInContext(self)


class _StandInContext:
    """Holds TensorRT's rules for enqueueV3: shapes inside the active profile, set again after a profile switch,
    every I/O tensor bound, outputs sized as get_tensor_shape says."""

    def __init__(self, engine):
        self.engine, self.fake = engine, engine.fake
        self.active_optimization_profile = 0  # the first context of an engine gets profile 0
        self.shapes, self.addresses, self.results = {}, {}, None

    def _log(self, *call):
        self.fake.calls.append((call[0], self.engine.graph, *call[1:]))

    def set_optimization_profile_async(self, index, stream):
        self._log("switch", index, stream)
        if not 0 <= index < self.engine.num_optimization_profiles:
            raise RuntimeError("Error in set optimization profile async.")
        self.active_optimization_profile = index
        self.shapes = {}  # input shapes must be given again for the new profile
        return True

    def set_input_shape(self, name, shape):
        self._log("shape", name, tuple(shape))
        mode, _, declared = self.engine.by_name[name]
        shape = tuple(shape)
        if mode != "INPUT" or len(shape) != len(declared):
            return False
        if -1 in declared:
            lo, _, hi = self.engine.profiles[self.active_optimization_profile][name]
            if not all(a <= v <= b for v, a, b in zip(shape, lo, hi)):
                return False
        elif shape != tuple(declared):
            return False
        self.shapes[name] = shape
        self.results = None
        return True

    def set_tensor_address(self, name, address):
        self._log("address", name)
        assert isinstance(address, int) and address != 0
        self.addresses[name] = address
        return True

    def _inputs(self):
        return {name: _read(self.addresses[name], self.shapes[name], kind)
                for name, (mode, kind, _) in self.engine.by_name.items() if mode == "INPUT"}

    def get_tensor_shape(self, name):
        mode, kind, declared = self.engine.by_name[name]
        if mode == "INPUT":
            return list(self.shapes.get(name, declared))
        inputs = [n for n, (m, _, _) in self.engine.by_name.items() if m == "INPUT"]
        if not all(n in self.shapes and n in self.addresses for n in inputs):
            return [-1] * len(declared)
        if self.results is None:  # the stand-in infers output shapes by running the graph
            self.results = self.engine.compute(self._inputs())
        return list(self.results[name].shape)

    def execute_async_v3(self, stream):
        self._log("execute", stream)
        if self.fake.fail_execute:
            return False
        names = self.engine.by_name
        if any(m == "INPUT" and n not in self.shapes for n, (m, _, _) in names.items()):
            return False  # a shape not given since the last profile switch
        if set(self.addresses) != set(names):
            return False
        results = self.engine.compute(self._inputs())  # from the input buffers as they are now
        for name, (mode, kind, _) in names.items():
            if mode == "OUTPUT":
                _write(self.addresses[name], kind, np.asarray(results[name]))
        return True


class _FakeTrt(types.ModuleType):
    """A recording stand-in for the tensorrt module (10.x/11.x API surface, pyCore.cpp): the builder's calls are
    recorded; a built "plan" is JSON naming its ONNX file and profiles; its engine runs that ONNX file with ONNX
    Runtime on the memory behind the addresses it is given (torch CPU tensors in these tests), declaring its
    floating tensors as `float_as` (BF16 emulates a bf16 engine: bf16 buffers in and out, fp32 inside)."""

    def __init__(self):
        super().__init__("tensorrt")
        self.__version__ = "10.99.0-fake"
        self.calls = []
        self.float_as = None
        self.fail_execute = False
        self.refuse_cache = lambda data: False  # set_timing_cache returns False for such data
        self.reject_profile = None  # add_optimization_profile returns -1 for this index
        self.specs = {}  # synthetic engines: key -> (io, profiles, compute)
        calls, fake = self.calls, self
        self.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})
        self.BuilderFlag = enum.IntEnum("BuilderFlag", {"DEBUG": 0, "REFIT": 1})
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.DataType = enum.Enum("DataType", TRT_TYPES)
        self.TensorIOMode = enum.Enum("TensorIOMode", ["NONE", "INPUT", "OUTPUT"])
        self.ExecutionContextAllocationStrategy = enum.IntEnum(
            "ExecutionContextAllocationStrategy", {"STATIC": 0, "ON_PROFILE_CHANGE": 1, "USER_MANAGED": 2})

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                calls.append(("set_shape", name, list(lo), list(opt), list(hi)))
                self.shapes[name] = [list(lo), list(opt), list(hi)]

        class Cache:
            def __init__(self, data=b"timing-cache"):
                self.data = data

            def serialize(self):
                return b"timing-cache"

        class Config:
            def __init__(self):
                self.profiles = []

            def set_memory_pool_limit(self, pool, size):
                calls.append(("pool", pool, size))

            def create_timing_cache(self, data):
                calls.append(("cache_in", data))
                return Cache(data)

            def set_timing_cache(self, cache, ignore):
                calls.append(("cache_set", cache.data))
                return not fake.refuse_cache(cache.data)

            def set_flag(self, flag):
                calls.append(("flag", flag))

            def add_optimization_profile(self, profile):
                calls.append(("profile",))
                if len(self.profiles) == fake.reject_profile:
                    return -1
                self.profiles.append(profile.shapes)
                return len(self.profiles) - 1

            def get_timing_cache(self):
                return Cache()

        class Network:
            onnx = None

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                calls.append(("network", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return json.dumps({"onnx": network.onnx, "profiles": config.profiles}).encode()

        class OnnxParser:
            def __init__(self, network, logger):
                self.network, self.num_errors = network, 0

            def parse_from_file(self, path):
                calls.append(("parse", path.rsplit("/", 1)[-1]))
                self.network.onnx = path
                return True

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, blob):
                doc = json.loads(bytes(blob))
                if "spec" in doc:
                    io, profiles, compute = fake.specs[doc["spec"]]
                    return _StandInEngine(fake, doc["spec"], io, profiles, compute)
                return fake.onnx_engine(doc["onnx"], doc["profiles"])

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = Logger, Builder, OnnxParser, Runtime

    def onnx_engine(self, path, profiles):
        from halfv_export.engines.ort import session_options

        model = onnx.load(path, load_external_data=False)

        def declared(value, mode):
            kind = ONNX_TYPES[value.type.tensor_type.elem_type]
            if self.float_as and kind in ("FLOAT", "HALF", "BF16"):
                kind = self.float_as
            return (value.name, mode, kind, [d.dim_value if d.HasField("dim_value") else -1
                                             for d in value.type.tensor_type.shape.dim])

        io = [declared(v, "INPUT") for v in model.graph.input] + [declared(v, "OUTPUT") for v in model.graph.output]
        session = onnxruntime.InferenceSession(path, session_options(), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]

        def compute(inputs):  # the same session options as OrtRunner, so the numbers are OrtRunner's
            return dict(zip(names, session.run(names, inputs)))

        profiles = [{name: [tuple(s) for s in shapes] for name, shapes in p.items()} for p in profiles]
        return _StandInEngine(self, Path(path).name, io, profiles, compute)


@pytest.fixture
def fake_trt(monkeypatch):
    """The stand-in as `tensorrt`, and a GPU as far as the builder asks (runners get device="cpu")."""
    fake = _FakeTrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    cuda = types.SimpleNamespace(get_device_capability=lambda: (9, 0), get_device_name=lambda: "Fake H100",
                                 is_available=lambda: True, current_device=lambda: 0)
    monkeypatch.setattr(trt_module, "require_gpu", lambda: types.SimpleNamespace(cuda=cuda, device=torch.device))
    return fake


def _copy_artifacts(exported, where: Path) -> Path:
    """The exported folder without engines another test may have built into it."""
    shutil.copytree(exported, where, ignore=shutil.ignore_patterns("ort", "trt"))
    write_manifest(where)
    return where


def test_builder_applies_the_plan(exported, fake_trt, tmp_path):
    art = _copy_artifacts(exported, tmp_path / "art")
    fake = fake_trt
    plan = make_plan(art, PlanOptions(workspace_mib=1024))
    plan.graphs[0].flags = ["REFIT"]
    info = trt_module.build_trt_engines(art, plan, log=lambda m: None)
    parsed = [c[1] for c in fake.calls if c[0] == "parse"]
    assert parsed == [g.graph for g in plan.graphs]
    assert all(c == ("network", 1 << 1) for c in fake.calls if c[0] == "network")  # STRONGLY_TYPED, by name
    shapes = [c for c in fake.calls if c[0] == "set_shape"]
    assert len(shapes) == sum(len(p) for g in plan.graphs for p in g.profiles)
    assert ("flag", fake.BuilderFlag.REFIT) in fake.calls and ("pool", "workspace", 1024 << 20) in fake.calls
    assert [c[1] for c in fake.calls if c[0] == "cache_in"][1] == b"timing-cache"  # reused across builds
    assert (art / "trt" / "timing.cache").read_bytes() == b"timing-cache"
    built = json.loads((art / "trt" / "decode.plan").read_text())
    assert built["onnx"].endswith("decode.onnx") and len(built["profiles"]) == len(by_name(plan)["decode.onnx"].profiles)
    meta = json.loads((art / "trt" / "engine.json").read_text())
    assert meta["compute_capability"] == "9.0" and meta["tensorrt"] == "10.99.0-fake"
    assert meta["plan"]["graphs"][2]["onnx_sha256"] == plan.graphs[2].onnx_sha256 and info["gpu"] == "Fake H100"
    plan.graphs[0].flags = ["FP16"]  # removed in TensorRT 11: refused by name, never guessed as an integer
    with pytest.raises(BadInput, match="no builder flag FP16"):
        trt_module.build_trt_engines(art, plan, log=lambda m: None)


def by_name(plan):
    return {g.graph: g for g in plan.graphs}


def test_builder_checks_what_tensorrt_returns(exported, fake_trt, tmp_path):
    """set_timing_cache False: warn, build without that cache, replace it; add_optimization_profile -1: one line
    naming the profile; set_shape raising (min > max): one line naming the input."""
    art = _copy_artifacts(exported, tmp_path / "art")
    plan = make_plan(art, PlanOptions())
    (art / "trt").mkdir()
    (art / "trt" / "timing.cache").write_bytes(b"from-another-gpu")
    fake_trt.refuse_cache = lambda data: data == b"from-another-gpu"
    messages = []
    trt_module.build_trt_engines(art, plan, log=messages.append)
    warnings = [m for m in messages if m.startswith("warning")]
    assert len(warnings) == 1 and "refused the timing cache trt/timing.cache" in warnings[0]
    assert [c[1] for c in fake_trt.calls if c[0] == "cache_set"][:3] == [b"from-another-gpu", b"", b"timing-cache"]
    assert (art / "trt" / "timing.cache").read_bytes() == b"timing-cache"  # a cache for this GPU replaces it
    assert all((art / g.engine).exists() for g in plan.graphs)

    fake_trt.refuse_cache = lambda data: True  # not even an empty cache: still builds, without one
    (art / "trt" / "timing.cache").unlink()
    messages.clear()
    trt_module.build_trt_engines(art, plan, log=messages.append)
    assert any("building without one" in m for m in messages) and not (art / "trt" / "timing.cache").exists()

    fake_trt.refuse_cache = lambda data: False
    fake_trt.reject_profile = 2
    with pytest.raises(RuntimeFailure, match=r"^TensorRT rejected optimisation profile 2 of prefill_full.onnx \("):
        trt_module.build_trt_engines(art, plan, log=lambda m: None)
    fake_trt.reject_profile = None
    broken = by_name(plan)["decode.onnx"]
    first = next(iter(broken.profiles[0]))
    broken.profiles[0][first] = broken.profiles[0][first][::-1]  # min and max swapped

    class Strict:  # the real binding raises from set_shape when min <= opt <= max does not hold
        def __init__(self, real):
            self.real = real

        def set_shape(self, name, lo, opt, hi):
            if any(a > b for a, b in zip(lo, hi)):
                raise RuntimeError("Shape provided for max is inconsistent with other shapes.")
            self.real.set_shape(name, lo, opt, hi)

        @property
        def shapes(self):
            return self.real.shapes

    builder_class = fake_trt.Builder
    real_profile = builder_class.create_optimization_profile
    builder_class.create_optimization_profile = lambda self: Strict(real_profile(self))
    with pytest.raises(RuntimeFailure, match=f"profile 0 of decode.onnx for input {first} "):
        trt_module.build_trt_engines(art, plan, log=lambda m: None)


# ------------------------------------------------------------------------------------------------ trtexec grammar
def trtexec_profiles(line: str) -> list[dict]:
    """Build profiles as trtexec 10.8-11.1 reads them from its command line (samples/common/sampleOptions.cpp:
    argsToArgumentsMap, getOptimizationProfiles, BuildOptions::parse). Arguments are (option, value, position);
    each --profile=N takes the shape options directly behind it (positions N+1, N+2, N+3; --minShapes, --optShapes
    and --maxShapes at most once each, any order; a missing one is filled from the others); indices must be
    distinct and cover 0..max; without any --profile, the first --minShapes/--optShapes/--maxShapes form the one
    profile; a shape option left over is refused. Returns per profile: input -> [min, opt, max]."""
    args = []
    for position, token in enumerate(shlex.split(line)[1:], start=1):
        option, _, value = token.partition("=")
        args.append((option, value, position))

    def take(option, position=None):
        for arg in args:
            if arg[0] == option and (position is None or arg[2] == position):
                args.remove(arg)
                return arg
        return None

    def shapes(spec: str, which: int, into: dict):
        for item in spec.split(","):
            name, _, dims = item.rpartition(":")
            into.setdefault(name, [None, None, None])[which] = [int(d) for d in dims.split("x")]

    def filled(profile: dict, given: set) -> dict:
        source = {0: 0 if 0 in given else (1 if 1 in given else 2), 1: 1 if 1 in given else (2 if 2 in given else 0),
                  2: 2 if 2 in given else (1 if 1 in given else 0)}
        return {name: [triple[source[w]] for w in range(3)] for name, triple in profile.items()}

    flags = {"--minShapes": 0, "--optShapes": 1, "--maxShapes": 2}
    profiles = {}
    while (found := take("--profile")) is not None:
        index, position, profile, given = int(found[1]), found[2], {}, set()
        for _ in range(3):
            behind = next((take(f, position + 1) for f in ("--minShapes", "--maxShapes", "--optShapes")
                           if flags[f] not in given and any(a[0] == f and a[2] == position + 1 for a in args)), None)
            if behind is None:
                break
            given.add(flags[behind[0]])
            shapes(behind[1], flags[behind[0]], profile)
            position += 1
        if index in profiles:
            raise ValueError("Optimization profile index cannot be the same.")
        profiles[index] = filled(profile, given)
    if not profiles:
        profile, given = {}, set()
        for flag, which in flags.items():
            if (arg := take(flag)) is not None:
                given.add(which)
                shapes(arg[1], which, profile)
        if given:
            profiles[0] = filled(profile, given)
    if any(a[0] in flags for a in args):
        raise ValueError("Multiple --minShapes/--optShapes/--maxShapes without --profile are not allowed.")
    for index in range(len(profiles)):
        if not profiles.get(index):
            raise ValueError(f"Found invalid or missing shape spec at profile index {index}.")
    return [profiles[i] for i in range(len(profiles))]


def test_trtexec_lines_follow_trtexec_grammar(exported):
    plan = make_plan(exported, PlanOptions(max_batch=2, min_text=4, opt_text=32, max_text=100, max_new_tokens=50))
    manifest = json.loads((exported / "manifest.json").read_text())["trtexec"]
    default = make_plan(exported, PlanOptions())
    for graph in plan.graphs:
        line = trtexec_command(plan, graph)
        assert trtexec_profiles(line) == graph.profiles, graph.graph
        assert trtexec_profiles(manifest[graph.graph]) == by_name(default)[graph.graph].profiles  # what export wrote
        assert ("--profile=" in line) == (len(graph.profiles) > 1)
    decode = by_name(plan)["decode.onnx"]
    assert len(decode.profiles) == 2
    # the parser is trtexec's, not ours: the form recorded before (no --profile) is refused as trtexec refuses it
    broken = trtexec_command(plan, decode).replace("--profile=0 ", "").replace("--profile=1 ", "")
    with pytest.raises(ValueError, match="without --profile are not allowed"):
        trtexec_profiles(broken)
    with pytest.raises(ValueError, match="missing shape spec at profile index 0"):
        trtexec_profiles(trtexec_command(plan, decode).replace("--profile=0 ", "--profile=2 "))


# ------------------------------------------------------------------------------------------------ TrtRunner
def synthetic(root: Path, fake, io, profiles, compute, graph="g.onnx") -> Path:
    """An artifacts folder with one graph and its stand-in plan, as `engine --target tensorrt` would leave it."""
    (root / "trt").mkdir(parents=True)
    (root / graph).write_bytes(b"graph as exported first")
    (root / "artifacts.json").write_text(json.dumps({"graphs": [graph]}))
    fake.specs[graph] = (io, profiles, compute)
    engine = f"trt/{Path(graph).stem}.plan"
    (root / engine).write_text(json.dumps({"spec": graph}))
    info = {"target": "tensorrt", "tensorrt": fake.__version__, "gpu": "Fake H100", "compute_capability": "9.0",
            "plan": {"graphs": [{"graph": graph, "engine": engine, "onnx_sha256": sha256_file(root / graph),
                                 "profiles": []}]}}
    (root / "trt" / "engine.json").write_text(json.dumps(info))
    write_manifest(root)
    return root


def two_profiles(fake, tmp_path):
    io = [("x", "INPUT", "FLOAT", [-1, 4]), ("y", "OUTPUT", "FLOAT", [-1, 4])]
    profiles = [{"x": [(1, 4), (2, 4), (4, 4)]}, {"x": [(5, 4), (6, 4), (8, 4)]}]
    return synthetic(tmp_path / "art", fake, io, profiles, lambda d: {"y": d["x"] * 2})


def test_trt_runner_one_context_per_engine_switching_profiles(fake_trt, tmp_path):
    runner = TrtRunner(two_profiles(fake_trt, tmp_path), device="cpu")
    for rows in (2, 6, 7, 3, 4):
        x = np.arange(rows * 4, dtype=np.float32).reshape(rows, 4)
        y = runner.run("g.onnx", {"x": x})["y"]
        assert isinstance(y, torch.Tensor) and np.array_equal(y.numpy(), x * 2)
    calls = fake_trt.calls
    strategy = fake_trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE
    assert [c for c in calls if c[0] == "context"] == [("context", "g.onnx", strategy)]
    # profile 0 is active from the start; 6 rows need profile 1, 7 still fit it, 3 need profile 0 again
    assert [c[2] for c in calls if c[0] == "switch"] == [1, 0]
    order = [c[0] for c in calls if c[0] in ("switch", "shape", "execute")]
    for i, call in enumerate(order):
        if call == "switch":
            assert order[i + 1] == "shape"  # shapes are set after the switch, before execution
    with pytest.raises(BadInput, match="fit no optimisation profile of g.onnx"):
        runner.run("g.onnx", {"x": np.zeros((9, 4), np.float32)})

    del fake_trt.ExecutionContextAllocationStrategy  # a TensorRT without allocation strategies
    fallback = TrtRunner(tmp_path / "art", device="cpu")
    fallback.run("g.onnx", {"x": np.ones((2, 4), np.float32)})
    assert calls[-1][0] == "execute" and [c for c in calls if c[0] == "context"][-1] == ("context", "g.onnx", None)


def test_trt_runner_checks_what_tensorrt_returns(fake_trt, tmp_path, monkeypatch):
    runner = TrtRunner(two_profiles(fake_trt, tmp_path), device="cpu")
    x = np.ones((2, 4), np.float32)
    with monkeypatch.context() as patch:
        patch.setattr(_StandInContext, "set_input_shape", lambda self, name, shape: False)
        with pytest.raises(RuntimeFailure, match=r"^TensorRT refused shape \(2, 4\) for input x of g.onnx"):
            runner.run("g.onnx", {"x": x})
    with monkeypatch.context() as patch:
        patch.setattr(_StandInContext, "set_tensor_address", lambda self, name, address: False)
        with pytest.raises(RuntimeFailure, match="^TensorRT refused the buffer of input x of g.onnx"):
            runner.run("g.onnx", {"x": x})
    fake_trt.fail_execute = True
    with pytest.raises(RuntimeFailure, match="^TensorRT execution of g.onnx failed"):
        runner.run("g.onnx", {"x": x})
    fake_trt.fail_execute = False
    np.testing.assert_array_equal(runner.run("g.onnx", {"x": x})["y"].numpy(), x * 2)  # nothing left broken
    with pytest.raises(RuntimeFailure, match=r"could not switch g.onnx to optimisation profile 1 \(Error in set"):
        with monkeypatch.context() as patch:  # the binding raises instead of returning False
            patch.setattr(_StandInContext, "set_optimization_profile_async",
                          lambda self, index, stream: (_ for _ in ()).throw(
                              RuntimeError("Error in set optimization profile async.")))
            runner.run("g.onnx", {"x": np.ones((6, 4), np.float32)})


def test_trt_runner_refuses_mismatched_dtypes(fake_trt, tmp_path):
    io = [("x", "INPUT", "FLOAT", [-1, 4]), ("ids", "INPUT", "INT64", [-1]), ("small", "INPUT", "INT32", [-1]),
          ("y", "OUTPUT", "FLOAT", [-1, 4]), ("total", "OUTPUT", "INT64", [-1])]
    profiles = [{"x": [(1, 4), (2, 4), (8, 4)], "ids": [(1,), (2,), (8,)], "small": [(1,), (2,), (8,)]}]
    art = synthetic(tmp_path / "art", fake_trt, io, profiles,
                    lambda d: {"y": d["x"] * 2, "total": d["ids"] + d["small"]})
    runner = TrtRunner(art, device="cpu")
    x = np.ones((2, 4), np.float32)
    # integers are cast where no value changes: int32 ids into an int64 input, int64 values that fit int32
    out = runner.run("g.onnx", {"x": x, "ids": np.array([1, 2], np.int32), "small": np.array([3, 4], np.int64)})
    assert out["total"].dtype == torch.int64 and out["total"].tolist() == [4, 6]
    executed = sum(c[0] == "execute" for c in fake_trt.calls)
    refusals = [
        ({"x": x.astype(np.float64)}, "g.onnx: input x is float64, but its TensorRT engine takes float32"),
        ({"x": torch.ones(2, 4, dtype=torch.float16)}, "g.onnx: input x is float16, but its TensorRT engine takes "
                                                        "float32"),
        ({"small": np.array([1, 2 ** 40])}, "g.onnx: input small is int64, but its TensorRT engine takes int32"),
        ({"ids": np.array([1.0, 2.0])}, "g.onnx: input ids is float64, but its TensorRT engine takes int64"),
    ]
    for change, message in refusals:
        feeds = {"x": x, "ids": np.array([1, 2]), "small": np.array([3, 4], np.int32), **change}
        with pytest.raises(BadInput, match=f"^{message}") as refused:
            runner.run("g.onnx", feeds)
        assert "\n" not in str(refused.value)
    assert sum(c[0] == "execute" for c in fake_trt.calls) == executed  # nothing ran on reinterpreted bytes
    with pytest.raises(BadInput, match="g.onnx needs input small, which was not fed"):
        runner.run("g.onnx", {"x": x, "ids": np.array([1, 2])})


def test_trt_runner_bf16_buffers(fake_trt, tmp_path):
    io = [("x", "INPUT", "BF16", [-1, 3]), ("y", "OUTPUT", "BF16", [-1, 3]), ("z", "OUTPUT", "FLOAT", [-1, 3])]
    profiles = [{"x": [(1, 3), (2, 3), (4, 3)]}]
    art = synthetic(tmp_path / "art", fake_trt, io, profiles, lambda d: {"y": d["x"] * 2 + 1, "z": d["x"] / 3})
    runner = TrtRunner(art, device="cpu")
    x = torch.tensor([[0.5, -1.25, 3.0], [1e-3, 7.0, -2.0]], dtype=torch.bfloat16)
    out = runner.run("g.onnx", {"x": x})
    assert out["y"].dtype == torch.bfloat16 and out["z"].dtype == torch.float32
    torch.testing.assert_close(out["y"], (x.float() * 2 + 1).to(torch.bfloat16))
    torch.testing.assert_close(out["z"], x.float() / 3)
    host = runner.arrays.to_host(out["y"])  # numpy has no bf16: widened exactly
    assert host.dtype == np.float32 and np.array_equal(host, out["y"].float().numpy())
    with pytest.raises(BadInput, match="input x is float32, but its TensorRT engine takes bfloat16"):
        runner.run("g.onnx", {"x": x.float()})
    fake_trt.specs["h.onnx"] = ([("x", "INPUT", "FP4", [2])], [], lambda d: {})
    (art / "trt" / "h.plan").write_text(json.dumps({"spec": "h.onnx"}))
    runner.plans["h.onnx"] = {"graph": "h.onnx", "engine": "trt/h.plan", "onnx_sha256": ""}
    runner._unverified.discard("h.onnx")
    with pytest.raises(RuntimeFailure, match="h.onnx: tensor x is FP4 in the TensorRT engine, which torch cannot"):
        runner.run("h.onnx", {"x": np.zeros(2)})


def test_trt_runner_refuses_stale_plans(fake_trt, tmp_path, run_cli, monkeypatch):
    art = two_profiles(fake_trt, tmp_path)
    TrtRunner(art, device="cpu").run("g.onnx", {"x": np.ones((2, 4), np.float32)})  # current: runs
    (art / "g.onnx").write_bytes(b"graph exported again")  # a re-export outside this tool, manifest rewritten
    write_manifest(art)
    stale = (r"^trt/g.plan was built from another g.onnx than the one in .* \(exported again since\); rebuild the "
             r"plans with `halfv-export engine --artifacts .* --target tensorrt`$")
    with pytest.raises(BadInput, match=stale):
        TrtRunner(art, device="cpu")  # refused on opening, before any graph runs
    # through the CLI: one line, exit 2 (a CUDA device as far as the runner asks; the refusal comes first)
    monkeypatch.setattr(trt_module, "require_gpu", lambda: types.SimpleNamespace(
        cuda=types.SimpleNamespace(current_device=lambda: 0), device=torch.device))
    result = run_cli("run", "--artifacts", art, "--prompt", "hi", "--target", "tensorrt")
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "was built from another g.onnx" in result.output
    # without a manifest entry the graph is hashed when its plan first loads
    (art / "manifest.json").unlink()
    runner = TrtRunner(art, device="cpu")
    with pytest.raises(BadInput, match=stale):
        runner.run("g.onnx", {"x": np.ones((2, 4), np.float32)})
    # a graph exported after the plans were built has no plan
    (art / "artifacts.json").write_text(json.dumps({"graphs": ["g.onnx", "h.onnx"]}))
    with pytest.raises(BadInput, match="trt/ has no plan for h.onnx"):
        TrtRunner(art, device="cpu")


@pytest.fixture(scope="module")
def built(exported, tmp_path_factory):
    """The exported graphs with stand-in plans built by the engine stage (stages.engine.engine, as the CLI calls it)."""
    art = _copy_artifacts(exported, tmp_path_factory.mktemp("trt") / "art")
    with pytest.MonkeyPatch.context() as patch:
        fake = _FakeTrt()
        patch.setitem(sys.modules, "tensorrt", fake)
        cuda = types.SimpleNamespace(get_device_capability=lambda: (9, 0), get_device_name=lambda: "Fake H100",
                                     is_available=lambda: True)
        patch.setattr(trt_module, "require_gpu", lambda: types.SimpleNamespace(cuda=cuda))
        options = EngineOptions(plan=PlanOptions(max_batch=2, min_text=4, opt_text=32, max_text=128,
                                                 max_new_tokens=16))
        run_engine(art, "tensorrt", options)
    return art


def _traced(runner):
    seen = []
    run = runner.run

    def spy(graph, feeds):
        out = run(graph, feeds)
        seen.append((graph, feeds, out))
        return out

    runner.run = spy
    return seen


def test_trt_runner_runs_the_pipeline_on_device_buffers(built, fake_trt):
    """EnginePipeline over TrtRunner (stand-in engines running the same ONNX files) gives OrtRunner's numbers while
    every tensor between graphs stays a runner tensor: decode feeds the previous step's K/V tensors themselves."""
    runner = TrtRunner(built, device="cpu")
    seen = _traced(runner)
    trt_pipe, ort_pipe = EnginePipeline(built, runner), EnginePipeline(built, OrtRunner(built))
    cases = [([make_image(448, 448, 4), make_image(448, 448, 5)], ["Count the shapes.", "What is written here?"]),
             ([make_image(504, 336, 2)], ["Describe it."]),
             ([None], ["Tell me a short story."])]
    for images, prompts in cases:
        ours = trt_pipe.prefill(trt_pipe.host(images, prompts))
        reference = ort_pipe.prefill(ort_pipe.host(images, prompts))
        # the stand-in's sessions and OrtRunner's (shared weights, prepacking off) may order float sums differently:
        # a few fp32 ulps of the logit, and one ulp at |logit| ~ 14 is already 1.9e-6, so the bound scales with it
        np.testing.assert_allclose(trt_pipe.to_host(ours.logits), reference.logits, rtol=4e-6, atol=1e-5)
        assert ours.kept.keys() == reference.kept.keys()
        for stage in ours.kept:
            np.testing.assert_array_equal(trt_pipe.to_host(ours.kept[stage]), reference.kept[stage])
        np.testing.assert_array_equal(trt_pipe.generate(images, prompts, 4, stop_at_eos=False),
                                      ort_pipe.generate(images, prompts, 4, stop_at_eos=False))
    calls = fake_trt.calls
    contexts = [c for c in calls if c[0] == "context"]
    strategy = fake_trt.ExecutionContextAllocationStrategy.ON_PROFILE_CHANGE
    assert len(contexts) == len({c[1] for c in contexts}) and all(c[2] == strategy for c in contexts)
    buckets = [tuple(b["size"]) for b in json.loads((built / "artifacts.json").read_text())["buckets"]]
    wide = buckets.index((336, 504))
    assert [c[2] for c in calls if c[:2] == ("switch", "decode.onnx")] == ([wide] if wide else [])
    assert [c[2] for c in calls if c[:2] == ("switch", "prefill_full.onnx")] == [len(buckets)]  # text-only
    decodes = 0
    for (_, _, before), (graph, feeds, _) in zip(seen, seen[1:]):
        if graph in ("decode.onnx", "decode_full.onnx"):
            decodes += 1
            assert all(isinstance(v, torch.Tensor) for v in feeds.values())
            assert feeds["past_key_0"] is before["present_key_0"] and feeds["past_value_5"] is before["present_value_5"]
    assert decodes == 3 * len(cases)


def test_trt_runner_bf16_artifacts_through_the_pipeline(built, fake_trt, tmp_path):
    """bf16 engines (the stand-in declares every float tensor BF16, computing in fp32 inside): pixels go in as bf16,
    embeds and the K/V cache stay bf16 tensors, logits reach the host widened to fp32."""
    art = tmp_path / "bf16"
    art.mkdir()
    for item in built.iterdir():
        if item.name not in ("artifacts.json", "manifest.json"):
            (art / item.name).symlink_to(item)
    meta = json.loads((built / "artifacts.json").read_text())
    (art / "artifacts.json").write_text(json.dumps({**meta, "precision": "bf16"}))
    fake_trt.float_as = "BF16"
    with pytest.raises(BadInput, match="bf16"):
        EnginePipeline(art, OrtRunner(art))
    runner = TrtRunner(art, device="cpu")
    seen = _traced(runner)
    pipe = EnginePipeline(art, runner)
    images, prompts = [make_image(448, 448, 4)], ["Count the shapes."]
    state = pipe.prefill(pipe.host(images, prompts))
    vision = next(feeds for graph, feeds, _ in seen if graph.startswith("vision_"))
    assert vision["pixel_values"].dtype == torch.bfloat16
    assert state.logits.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in state.past)
    logits = pipe.to_host(state.logits)
    reference = EnginePipeline(built, OrtRunner(built))
    fp32 = reference.prefill(reference.host(images, prompts)).logits
    cosine = (logits * fp32).sum() / np.linalg.norm(logits) / np.linalg.norm(fp32)
    assert logits.dtype == np.float32 and cosine > 0.99  # bf16 rounding of a random-weight model, not parity
    tokens = pipe.generate(images, prompts, 3, stop_at_eos=False)
    assert tokens.shape == (1, 3) and tokens.dtype == np.int64
    host = pipe.host(images, prompts)  # the image processor's fp32 pixels, as fed before this was fixed
    vision = json.loads((art / "artifacts.json").read_text())["buckets"][0]["vision"]
    with pytest.raises(BadInput, match=f"^{vision}: input pixel_values is float32, but its TensorRT engine takes bf"):
        runner.run(vision, {"pixel_values": host.pixel_values[0]})


def test_run_cli_with_tensorrt_target(built, fake_trt, run_cli, monkeypatch):
    monkeypatch.setattr(trt_module, "TrtRunner", functools.partial(TrtRunner, device="cpu"))
    ours = run_cli("run", "--artifacts", built, "--prompt", "hello there", "--max-new-tokens", 3, "--target",
                   "tensorrt")
    reference = run_cli("run", "--artifacts", built, "--prompt", "hello there", "--max-new-tokens", 3)
    assert ours.exit_code == 0 and ours.output == reference.output


def test_export_drops_engines_of_the_previous_graphs(qwen, tmp_path, monkeypatch):
    """Fast tier (the slow fp16 test re-exports for real): export's commit moves trt/ and ort/ out with the old
    graphs, says so, and a failed export leaves them (and the previous graphs) alone."""
    from halfv_export.stages.export import export_artifacts
    from halfv_export.graphs.pruning import PruneSchedule
    from halfv_export.graphs.specs import GraphSpec

    adapter, loaded, _ = qwen
    schedule = PruneSchedule(ivr_layer=2, keep_ratio=0.25, anchor_ratio=0.1, ssr_layer=6, ssr_mode="topk",
                             ssr_ratio=0.05)
    out = tmp_path / "art"
    for engines in ("trt", "ort"):
        (out / engines).mkdir(parents=True)
        (out / engines / "engine.json").write_text("{}")
    monkeypatch.setattr(GraphSpec, "export", lambda self, directory, **kw: (Path(directory) / self.file).write_bytes(b"g"))

    def export(log):
        return export_artifacts(adapter, loaded, schedule, {"schedule": {}}, [(448, 448)], out, log=log)

    placeholder = GraphSpec.export
    monkeypatch.setattr(GraphSpec, "export", lambda self, directory, **kw: (_ for _ in ()).throw(BadInput("trace failed")))
    with pytest.raises(BadInput):
        export(lambda message: None)
    assert (out / "trt" / "engine.json").exists() and (out / "ort" / "engine.json").exists()
    monkeypatch.setattr(GraphSpec, "export", placeholder)
    messages = []
    meta = export(messages.append)
    assert not (out / "trt").exists() and not (out / "ort").exists() and (out / meta["graphs"][0]).exists()
    assert len(messages) == 1 and messages[0].startswith("removed ort/ and trt/ (engines built from the previous")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no staging or trash left


@pytest.mark.slow
def test_fp16_export_keeps_selection_in_fp32(tiny_qwen_dir, run_cli, tmp_path):
    out = tmp_path / "fp16"
    assert run_cli("calibrate", "--backbone", "qwen2.5-vl", "--model", tiny_qwen_dir, "--paper-values",
                   "--out", out).exit_code == 0
    for engines in ("trt", "ort"):  # engines a previous export's graphs were built into, listed in its manifest
        (out / engines).mkdir()
        (out / engines / "engine.json").write_text("{}")
    write_manifest(out)
    result = run_cli("export", "--schedule", out / "schedule.json", "--model", tiny_qwen_dir, "--image-size",
                     "252x336", "--precision", "fp16", "--out", out)
    assert result.exit_code == 0, result.output
    # re-export never leaves plans of the old graphs valid: the engine folders go, and with them their hashes
    assert not (out / "trt").exists() and not (out / "ort").exists() and "removed ort/ and trt/" in result.output
    listed = json.loads((out / "manifest.json").read_text())["files"]
    assert not [f for f in listed if f.startswith(("trt/", "ort/"))] and "prefill_252x336.onnx" in listed
    model = onnx.load(str(out / "prefill_252x336.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    # the score softmax, the FPS similarity and the TopK inputs are fp32
    inferred = onnx.shape_inference.infer_shapes(model)
    types_ = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    topk_inputs = [types_.get(n.input[0]) for n in model.graph.node if n.op_type == "TopK"]
    argmax_inputs = [types_.get(n.input[0]) for n in model.graph.node if n.op_type == "ArgMax"]
    assert set(topk_inputs) <= {TensorProto.FLOAT, TensorProto.INT64} and set(argmax_inputs) == {TensorProto.FLOAT}
    assert run_cli("lint", "--artifacts", out).exit_code == 0
    report = run_cli("validate", "--artifacts", out)
    assert report.exit_code == 0, report.output
    data = json.loads((out / "report.json").read_text())
    assert data["parity"]["logits_max_abs_diff"] < 0.05 and data["parity"]["logits_cosine_min"] > 0.999


@pytest.mark.parametrize("bits", [4, 8])
def test_lint_names_ort_weight_only_quantised_matmuls_for_tensorrt(bits):
    """ORT's MatMulNBits quantiser output (the int4/int8 weight-only graphs ORT GenAI ships) must not pass the
    TensorRT lint silently."""
    import numpy as np
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    rng = np.random.default_rng(0)
    weight = helper.make_tensor("w", TensorProto.FLOAT, [64, 32], rng.standard_normal((64, 32)).astype(np.float32)
                                .reshape(-1).tolist())
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    assert lint_model(model, "float.onnx") == []
    quantiser = MatMulNBitsQuantizer(model, block_size=32, is_symmetric=True, bits=bits)
    quantiser.process()
    quantised = quantiser.model.model
    assert "MatMulNBits" in {n.op_type for n in quantised.graph.node}
    findings = [str(f) for f in lint_model(quantised, "q.onnx")]
    assert any("com.microsoft::MatMulNBits is an ONNX Runtime-only op" in f for f in findings), findings
