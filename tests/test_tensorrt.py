"""TensorRT stage without TensorRT: the readiness lint (passes on real graphs, catches planted violations), the
build plan as data, the one-sentence refusal when TensorRT or a GPU is missing, and the builder applying the plan
(checked against a recording stand-in for the tensorrt module, since the real one cannot be installed here)."""

import enum
import json
import sys
import types

import onnx
import pytest
from onnx import TensorProto, helper

from halfv_export.engines import trt as trt_module
from halfv_export.engines.trt_plan import PlanOptions, make_plan, trtexec_command
from halfv_export.base.errors import BadInput
from halfv_export.graphs.lint import lint_model


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
    assert line.count("--minShapes=") == 2 and "--stronglyTyped" in line and "--fp16" not in line
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


@pytest.mark.slow
def test_build_with_tensorrt_target_stops_after_export(tiny_qwen_dir, run_cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    out = tmp_path / "b"
    result = run_cli("build", "--backbone", "qwen2.5-vl", "--model", tiny_qwen_dir, "--image-size", "252x336",
                     "--paper-values", "--target", "tensorrt", "--out", out)
    assert result.exit_code == 2 and "stopped after export" in result.output
    assert (out / "prefill_252x336.onnx").exists() and not (out / "report.json").exists()
    # ... and what is left is usable by ONNX Runtime
    assert run_cli("engine", "--artifacts", out, "--target", "onnxruntime").exit_code == 0
    assert run_cli("run", "--artifacts", out, "--prompt", "hello", "--max-new-tokens", 2).exit_code == 0


class _FakeTrt(types.ModuleType):
    """Records what the builder asks of TensorRT (10.x-style API surface)."""

    def __init__(self):
        super().__init__("tensorrt")
        self.__version__ = "10.99.0-fake"
        self.calls = []
        calls = self.calls
        self.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 1})
        self.BuilderFlag = enum.IntEnum("BuilderFlag", {"DEBUG": 0, "REFIT": 1})
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                calls.append(("set_shape", name, list(lo), list(opt), list(hi)))

        class Cache:
            def serialize(self):
                return b"timing-cache"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                calls.append(("pool", pool, size))

            def create_timing_cache(self, data):
                calls.append(("cache_in", data))
                return Cache()

            def set_timing_cache(self, cache, ignore):
                pass

            def set_flag(self, flag):
                calls.append(("flag", flag))

            def add_optimization_profile(self, profile):
                calls.append(("profile",))

            def get_timing_cache(self):
                return Cache()

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                calls.append(("network", flags))
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"plan"

        class OnnxParser:
            def __init__(self, network, logger):
                self.num_errors = 0

            def parse_from_file(self, path):
                calls.append(("parse", path.rsplit("/", 1)[-1]))
                return True

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser


def test_builder_applies_the_plan(exported, monkeypatch, tmp_path):
    import shutil

    art = tmp_path / "art"
    shutil.copytree(exported, art)
    fake = _FakeTrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    cuda = types.SimpleNamespace(get_device_capability=lambda: (9, 0), get_device_name=lambda: "Fake H100",
                                 is_available=lambda: True)
    monkeypatch.setattr(trt_module, "require_gpu", lambda: types.SimpleNamespace(cuda=cuda))
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
    assert (art / "trt" / "prefill_448x448.plan").read_bytes() == b"plan"
    meta = json.loads((art / "trt" / "engine.json").read_text())
    assert meta["compute_capability"] == "9.0" and meta["tensorrt"] == "10.99.0-fake"
    assert meta["plan"]["graphs"][2]["onnx_sha256"] == plan.graphs[2].onnx_sha256 and info["gpu"] == "Fake H100"
    plan.graphs[0].flags = ["FP16"]  # removed in TensorRT 11: refused by name, never guessed as an integer
    with pytest.raises(BadInput, match="no builder flag FP16"):
        trt_module.build_trt_engines(art, plan, log=lambda m: None)


@pytest.mark.slow
def test_fp16_export_keeps_selection_in_fp32(tiny_qwen_dir, run_cli, tmp_path):
    out = tmp_path / "fp16"
    assert run_cli("calibrate", "--backbone", "qwen2.5-vl", "--model", tiny_qwen_dir, "--paper-values",
                   "--out", out).exit_code == 0
    result = run_cli("export", "--schedule", out / "schedule.json", "--model", tiny_qwen_dir, "--image-size",
                     "252x336", "--precision", "fp16", "--out", out)
    assert result.exit_code == 0, result.output
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
