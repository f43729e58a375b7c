"""Exported graphs vs the eager reference, through real ONNX Runtime sessions."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from halfv_export.engines import EnginePipeline
from halfv_export.engines.ort import OrtRunner
from halfv_export.graphs.onnx_export import topk_values
from halfv_export.graphs.halfv import HalfVReference
from halfv_export.graphs.pruning import PruneSchedule
from halfv_export.graphs.lint import lint_model
from tests.conftest import EMBEDDED_KIND, copy_build, make_image

SCHEDULE = PruneSchedule(ivr_layer=2, keep_ratio=0.25, anchor_ratio=0.1, ssr_layer=6, ssr_mode="topk", ssr_ratio=0.05)


def test_artifacts_and_graph_hygiene(exported):
    meta = json.loads((exported / "artifacts.json").read_text())
    assert [b["size"] for b in meta["buckets"]] == [[448, 448], [336, 504]]
    assert (meta["buckets"][1]["num_visual"], meta["buckets"][1]["k1"], meta["buckets"][1]["k2"]) == (216, 54, 10)
    for graph in meta["graphs"]:
        model = onnx.load(str(exported / graph))
        onnx.checker.check_model(model)
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
        assert lint_model(model, graph) == [], graph  # TensorRT-ready: ops, TopK, shapes, constant axes
    # IVR anchors, K1 re-sort, SSR top-K2 and its re-sort: every K a constant, <= 3840, as planned
    ks = topk_values(exported / "prefill_448x448.onnx")
    assert sorted(set(ks)) == sorted({6, 64, 12})
    assert "TopK" not in {n.op_type for n in onnx.load(str(exported / "prefill_full.onnx")).graph.node}


def test_present_kv_shapes_show_the_cuts(exported):
    model = onnx.load(str(exported / "prefill_448x448.onnx"), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in inferred.graph.output}
    assert dims["kept_ivr"][1] == 64 and dims["kept_ssr"][1] == 12
    lengths = [dims[f"present_key_{i}"][2] for i in range(8)]
    assert lengths[0] == lengths[1] and len({lengths[1], lengths[2], lengths[6]}) == 3  # S, S-N+K1, S-N+K2


@pytest.mark.parametrize("batch", [
    [(448, 448, 1, "What is in this image?")],
    [(336, 504, 2, "Describe it."), (336, 504, 3, "Which colours, shapes and words can you see in the picture?")],
    [(448, 448, 4, "Count the shapes."), (448, 448, 5, "What is written here? Answer briefly please.")],
    [(None, None, 0, "Tell me a short story about a red circle.")],
], ids=["square-b1", "nonsquare-b2", "square-b2", "text-only"])
def test_engine_matches_eager(exported, qwen, batch):
    adapter, loaded, stack = qwen
    pipeline = EnginePipeline(exported, OrtRunner(exported))
    images = [None if h is None else make_image(w, h, seed) for h, w, seed, _ in batch]
    prompts = [p for *_, p in batch]
    host = pipeline.host(images, prompts)  # the rows every runtime runs; the eager reference gets the same ones
    state = pipeline.prefill(host)
    eager = HalfVReference(stack, SCHEDULE).prefill(adapter.embed_host(loaded, host))
    want = eager.logits.numpy()
    # ORT and torch order fp32 sums differently; a difference in the final hidden state shifts every logit of the row
    # by about the same amount (1.7e-4 across a row whose largest |logit| is 22, measured), so the bound scales with
    # the row's largest logit rather than with each small one
    np.testing.assert_allclose(state.logits, want, rtol=1e-4, atol=max(1e-4, 2e-5 * float(np.abs(want).max())))
    assert state.kept.keys() == eager.kept.keys()
    for stage in eager.kept:
        np.testing.assert_array_equal(state.kept[stage], eager.kept[stage].numpy())
    assert [p.shape[2] for p in state.past[::2]] == eager.cache.lengths()
    tokens = pipeline.generate(images, prompts, 16, stop_at_eos=False)
    np.testing.assert_array_equal(tokens, HalfVReference(stack, SCHEDULE).generate(
        adapter.embed_host(loaded, host), 16).numpy())


def test_unbucketed_image_is_fitted_to_the_nearest_bucket(exported):
    pipeline = EnginePipeline(exported, OrtRunner(exported))
    host = pipeline.host([make_image(700, 460, 6)], ["What is this?"])  # wide: the 336x504 bucket
    assert host.bucket == (336, 504)


def test_engine_stage_run_and_manifest(exported, run_cli, tmp_path):
    exported = copy_build(exported, tmp_path / "artifacts")  # the engine stage writes ort/ and the manifest
    result = run_cli("engine", "--artifacts", exported, "--target", "onnxruntime")
    assert result.exit_code == 0, result.output
    assert (exported / "ort" / "engine.json").exists()
    make_image(400, 300, 7).save(tmp_path / "photo.png")
    answer = run_cli("run", "--artifacts", exported, "--image", tmp_path / "photo.png", "--prompt", "What is this?",
                     "--max-new-tokens", 4)
    assert answer.exit_code == 0 and answer.output.strip(), answer.output
    manifest = json.loads((exported / "manifest.json").read_text())
    assert {"prefill_448x448.onnx", "ort/engine.json", "weights.bin", "schedule.json"} <= set(manifest["files"])
    # the engine stage's only graphs are the fused prefills (weights left in weights.bin: test_shared_weights.py)
    fused = json.loads((exported / "ort" / "engine.json").read_text())["fused_graphs"]
    assert sorted(f for f in manifest["files"] if f.startswith("ort/") and f.endswith(".onnx")) == sorted(
        fused.values()) == ["ort/prefill_336x504.onnx", "ort/prefill_448x448.onnx", "ort/prefill_full.onnx"]
    assert manifest["versions"]["onnxruntime"] and manifest["schedule"]["ssr_layer"] == 6


def test_tampered_artifact_is_refused(exported, run_cli, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    with open(copy / "decode.onnx", "ab") as f:
        f.write(b"\0")
    result = run_cli("run", "--artifacts", copy, "--prompt", "hi")
    assert result.exit_code == 2 and "does not match its sha256" in result.output


TIMINGS = {"eager_full_prefill", "eager_halfv_prefill", "engine_full_prefill", "engine_halfv_prefill",
           "engine_decode_step", "eager_embed_vision", "engine_embed_vision", "eager_full_ttft", "eager_halfv_ttft",
           "engine_full_ttft", "engine_halfv_ttft"}


def test_timed_reports_the_median_and_the_fastest_run_after_one_warm_up(monkeypatch):
    from halfv_export.measure import report

    clock, durations, calls = [0.0], [0.050, 0.005, 0.001, 0.003, 0.009], []  # seconds; the first is the warm-up

    def work():
        calls.append(1)
        clock[0] += durations[len(calls) - 1]

    monkeypatch.setattr(report, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    assert report.timed(work, runs=4) == {"median_ms": 4.0, "min_ms": 1.0, "runs": 4}  # median of 5, 1, 3, 9 ms
    assert len(calls) == 5


def test_validate_gates(exported, run_cli, tmp_path):
    exported = copy_build(exported, tmp_path / "artifacts")  # validate writes report.json and the manifest
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # not this box's core count: the report must record what the timings ran with
    try:
        ok = run_cli("validate", "--artifacts", exported, "--fail-under", "parity.kept_indices_match=1.0",
                     "--fail-over", "parity.logits_max_abs_diff=1e-3", "--latency-runs", 2)
    finally:
        torch.set_num_threads(threads)
    assert ok.exit_code == 0, ok.output
    report = json.loads((exported / "report.json").read_text())
    assert report["latency_ms"]["runs"] == 2 and report["latency_ms"]["torch_threads"] == 1
    assert report["parity"]["kept_indices_match"] == 1.0 and report["parity"]["greedy_tokens_match"] == 1.0
    assert report["parity"]["logits_max_abs_diff"] <= 1e-3 and report["fidelity"]["weights"] == EMBEDDED_KIND
    assert set(report["latency_ms"]["min_ms"]) == TIMINGS  # every timing has its fastest run beside its median
    assert all(report["latency_ms"][key] > 0 and report["latency_ms"]["min_ms"][key] > 0 for key in TIMINGS)
    # the vision tower is in both sides of the end-to-end ratio, so it sits between 1 and the prefill-only ratio
    assert report["flops"]["vision"] > 0 and 1 < report["flops"]["e2e_ratio"] < report["flops"]["ratio"]
    assert "time to first token" in (exported / "report.md").read_text()
    assert report["flops"]["ratio"] > 1 and (exported / "latency.png").stat().st_size > 10_000
    from halfv_export.measure.report import CUT_ONLY, METRICS, lookup, lookup_optional

    # the gate vocabulary is what reports carry (a build without a vision cut lacks the cut's own timings)
    assert all(lookup(report, key) is not None for key in METRICS if key not in CUT_ONLY)
    assert all(lookup_optional(report, key) is None for key in CUT_ONLY)
    before = (exported / "report.json").read_text()
    unknown = run_cli("validate", "--artifacts", exported, "--fail-under", "parity.nope=1")
    assert unknown.exit_code == 2 and "unknown metric 'parity.nope'" in unknown.output
    assert (exported / "report.json").read_text() == before  # refused before anything ran
    (tmp_path / "plain.jsonl").write_text(json.dumps({"image": None, "prompt": "hi"}) + "\n")
    no_answers = run_cli("validate", "--artifacts", exported, "--data", tmp_path / "plain.jsonl", "--baselines")
    assert no_answers.exit_code == 2 and "--baselines needs data with answers" in no_answers.output
    assert (exported / "report.json").read_text() == before


@pytest.mark.slow
def test_build_on_a_differently_shaped_checkpoint_with_a_non_square_bucket(tiny_qwen_build):
    out = tiny_qwen_build
    report = json.loads((out / "report.json").read_text())
    assert report["buckets"] == ["252x336"]
    assert report["parity"]["kept_indices_match"] == 1.0 and report["parity"]["greedy_tokens_match"] == 1.0
    assert report["parity"]["logits_max_abs_diff"] <= 1e-3
    meta = json.loads((out / "artifacts.json").read_text())
    assert meta["num_layers"] == 6 and meta["num_kv_heads"] == 1


def test_export_refuses_sizes_the_processor_never_produces(exported, run_cli, tmp_path):
    result = run_cli("export", "--schedule", exported / "schedule.json", "--image-size", "450x450",
                     "--out", tmp_path)
    assert result.exit_code == 2 and "use --image-size 448x448" in result.output


def test_a_gate_on_kept_indices_fails_when_nothing_was_compared(exported, run_cli, tmp_path):
    """Text-only data: no kept indices exist to compare, so the metric is absent and a gate on it fails (exit 1)
    instead of passing on a default."""
    artifacts = copy_build(exported, tmp_path / "artifacts")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"image": None, "prompt": "Tell me about circles."}) + "\n")
    result = run_cli("validate", "--artifacts", artifacts, "--data", tmp_path, "--fail-under",
                     "parity.kept_indices_match=1.0", "--fail-under", "parity.logits_cosine_min=2")
    assert result.exit_code == 1, result.output
    assert "parity.kept_indices_match was not measured" in result.output
    assert "parity.logits_cosine_min = " in result.output and "is under 2" in result.output  # a crossed gate
    report = json.loads((artifacts / "report.json").read_text())
    assert "kept_indices_match" not in report["parity"] and report["parity"]["kept_pairs"] == 0
    assert report["parity"]["greedy_tokens_match"] == 1.0


def test_a_selection_the_rule_would_never_make_fails_the_near_tie_gate(exported, run_cli, tmp_path, monkeypatch):
    """The gate forgives only near-ties: an engine whose IVR keeps a row the rule would not pick (one kept index
    moved to a dropped row) is caught through the forced eager replay, even though its logits are the real ones."""
    from halfv_export.engines.pipeline import EnginePipeline

    artifacts = copy_build(exported, tmp_path / "artifacts")
    real_prefill = EnginePipeline.prefill

    def moved_one_row(self, host, halfv=True, prompt=None):
        state = real_prefill(self, host, halfv, prompt)
        if "ivr" in state.kept:
            kept = np.array(self.to_host(state.kept["ivr"]))
            for b in range(kept.shape[0]):
                dropped = sorted(set(range(host.num_visual)) - set(kept[b].tolist()))
                kept[b, -1] = dropped[-1]
                kept[b] = np.sort(kept[b])
            state.kept["ivr"] = kept
        return state

    monkeypatch.setattr(EnginePipeline, "prefill", moved_one_row)
    result = run_cli("validate", "--artifacts", artifacts, "--fail-under", "parity.selection_valid=1",
                     "--latency-runs", 1)
    assert result.exit_code == 1 and "parity.selection_valid = " in result.output, result.output
    p = json.loads((artifacts / "report.json").read_text())["parity"]
    assert p["kept_indices_match"] < 1 and p["selection_valid"] < 1 and p["selection_differs"] == p["kept_pairs"] // 2
    assert p["selection_shortfall_max"] > 10 * p["selection_tolerance"]


def test_a_wide_timing_spread_is_flagged_in_the_report():
    from halfv_export.measure.report import NOISY_SPREAD, noisy_timing
    steady = {"eager_full_prefill": 30.0, "engine_full_prefill": 3.1, "min_ms": {"eager_full_prefill": 28.0,
                                                                                  "engine_full_prefill": 3.0}}
    assert noisy_timing(steady) is None and noisy_timing({"eager_full_prefill": 30.0}) is None
    # the loaded-box case seen in a LLaVA-NeXT validate: median 1,386 ms, fastest far below
    shared = dict(steady, eager_halfv_prefill=57.0, eager_full_prefill=1386.0,
                  min_ms=dict(steady["min_ms"], eager_halfv_prefill=50.0))
    key, spread = noisy_timing(shared)
    assert key == "eager_full_prefill" and spread == pytest.approx(1386 / 28) and spread > NOISY_SPREAD
