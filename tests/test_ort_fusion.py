"""The onnxruntime engine's fused causal attention (engines/ort_fusion.py): which sites it rewrites, that the fused
graph computes what the exported one does, and that the engine stage records and honours the choice."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from halfv_export.engines import ort as ort_module
from halfv_export.engines.ort import OrtRunner, build_ort_engines
from halfv_export.engines.ort_fusion import HIERARCHY, fuse_causal_attention
from halfv_export.graphs import get_adapter
from halfv_export.graphs.pruning import PruneSchedule
from halfv_export.graphs.specs import decode_spec, prefill_example, prefill_spec
from halfv_export.benchmarks.bench import BenchShape, bench_model

from .conftest import copy_build

SHAPE = BenchShape(layers=6, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=500)
NAMES = ["embeds", "attention_mask", "positions", "visual_start"]


def _prefill(tmp_path, backbone: str, n: int = 64):
    adapter = get_adapter(backbone)
    _, _, stack = bench_model(adapter, SHAPE)
    schedule = PruneSchedule(**adapter.paper.at_depth(SHAPE.layers))
    path = prefill_spec(stack, schedule, n, label="t").export(tmp_path)
    feeds = dict(zip(NAMES, (t.numpy() for t in prefill_example(stack, n))))  # sample 1 is left-padded
    return stack, schedule, path, feeds


def _session(model_or_path):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _ops(model: onnx.ModelProto, op: str) -> int:
    return sum(node.op_type == op for node in model.graph.node)


@pytest.mark.parametrize("backbone, fused_layers", [("qwen2.5-vl", 6), ("llava-1.5", 3)])
def test_fused_prefill_matches_the_exported_graph(tmp_path, backbone, fused_layers):
    """Qwen (SSR topk): every layer's attention fuses. LLaVA (SSR freeze from layer 3 at depth 6): the frozen
    layers' attention (queries are the non-visual rows only) is not causal self-attention and stays plain."""
    _, schedule, path, feeds = _prefill(tmp_path, backbone)
    model = onnx.load(str(path))
    softmax_before = _ops(model, "Softmax")
    assert fuse_causal_attention(model) == fused_layers
    if backbone == "llava-1.5":
        assert schedule.ssr_mode == "freeze" and schedule.ssr_layer == fused_layers
    assert _ops(model, "GroupQueryAttention") == fused_layers
    assert _ops(model, "Softmax") == softmax_before - fused_layers  # the selection's softmaxes remain
    onnx.checker.check_model(model)
    plain, fused = _session(path), _session(model)
    names = [o.name for o in plain.get_outputs()]
    for name, want, got in zip(names, plain.run(names, feeds), fused.run(names, feeds)):
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=name)
        else:  # kept indices and cache validity: the same tokens survive both cuts
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_unmarked_and_non_causal_graphs_are_left_alone(tmp_path):
    """A prefill exported before the mark existed (metadata stripped) and a decode step (one query over the cache)
    keep their plain attention."""
    stack, schedule, path, _ = _prefill(tmp_path, "qwen2.5-vl")
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key != HIERARCHY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    assert fuse_causal_attention(model) == 0 and _ops(model, "GroupQueryAttention") == 0
    decode = decode_spec(stack, schedule.cache_groups(SHAPE.layers), pruned=True).export(tmp_path)
    assert fuse_causal_attention(onnx.load(str(decode), load_external_data=False)) == 0


def test_engine_stage_records_fusion_and_runs_follow_it(tmp_path, exported, monkeypatch):
    """The embedded default's export: the engine stage fuses every prefill layer (8) of both buckets and of
    prefill_full, nothing in vision / embed / decode, and writes those graphs to ort/, which a later runner opens
    as they are (no rewrite, so no onnx package); with --no-fuse-attention a later runner stays unfused."""
    artifacts = copy_build(exported, tmp_path / "a")
    layers = json.loads((artifacts / "config.json").read_text())["text_config"]["num_hidden_layers"]
    info = build_ort_engines(artifacts)
    fused = info["fused_attention"]
    prefill = {g for g in fused if g.startswith("prefill")}
    assert prefill == {"prefill_448x448.onnx", "prefill_336x504.onnx", "prefill_full.onnx"}
    assert all(fused[g] == layers for g in prefill) and not any(fused[g] for g in set(fused) - prefill)
    assert json.loads((artifacts / "ort" / "engine.json").read_text())["fuse_attention"] is True
    assert sorted(p.name for p in (artifacts / "ort").glob("*.onnx")) == sorted(prefill)
    with monkeypatch.context() as patched:
        patched.setattr(ort_module, "fused_graph", lambda *a, **k: pytest.fail("a runner rewrote a fused graph"))
        runner = OrtRunner(artifacts)
        runner.session("prefill_448x448.onnx")
        assert runner.fused == {"prefill_448x448.onnx": layers}
    info = build_ort_engines(artifacts, fuse_attention=False)
    assert info["fuse_attention"] is False and not any(info["fused_attention"].values())
    assert not list((artifacts / "ort").glob("*.onnx"))  # the previous stage's fused graphs are gone
    runner = OrtRunner(artifacts)  # follows engine.json
    runner.session("prefill_448x448.onnx")
    assert runner.fused == {"prefill_448x448.onnx": 0}


def test_a_refused_fusion_is_one_warning_and_recorded(tmp_path, exported, monkeypatch, caplog):
    """An ONNX Runtime that refuses the fused graph (here: a GroupQueryAttention attribute it does not know, as an
    older runtime would refuse `causal`) runs the graph as exported, says why in one warning line per graph, and
    engine.json records it; nothing falls back silently."""
    import halfv_export.engines.ort_fusion as fusion

    real = fusion.fuse_causal_attention

    def fuse_then_break(model):
        sites = real(model)
        for node in model.graph.node:
            if node.op_type == "GroupQueryAttention":
                node.attribute.append(onnx.helper.make_attribute("not_an_attribute", 1))
        return sites

    monkeypatch.setattr(fusion, "fuse_causal_attention", fuse_then_break)
    artifacts = copy_build(exported, tmp_path / "a")
    with caplog.at_level("WARNING", logger="halfv_export"):
        info = build_ort_engines(artifacts)
    prefill = {"prefill_448x448.onnx", "prefill_336x504.onnx", "prefill_full.onnx"}
    assert set(info["fusion_refused"]) == prefill and not any(info["fused_attention"][g] for g in prefill)
    assert all("not_an_attribute" in why for why in info["fusion_refused"].values())  # ORT's own reason
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == len(prefill) and all("\n" not in w and "refused the fused attention" in w for w in warned)
    assert json.loads((artifacts / "ort" / "engine.json").read_text())["fusion_refused"] == info["fusion_refused"]
    assert not info["fused_graphs"] and not list((artifacts / "ort").glob("*.onnx"))  # nothing refused is kept


def test_describe_names_the_provider_the_sessions_run(exported):
    runner = OrtRunner(exported)
    runner.session("embed.onnx")
    assert runner.ran_on == {"embed.onnx": ["CPUExecutionProvider"]}
    assert "CPU, ONNX Runtime" in runner.describe() and "CPUExecutionProvider" in runner.describe()
