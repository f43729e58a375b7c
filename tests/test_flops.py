"""Analytic FLOPs vs torch's FlopCounterMode on real small models, and the published-config ratios."""

import json
from pathlib import Path

import pytest
from torch.utils.flop_counter import FlopCounterMode

from halfv_export.graphs import get_adapter
from halfv_export.graphs.halfv import HalfVReference
from halfv_export.graphs.pruning import PruneSchedule
from halfv_export.measure.flops import LMShape, layer_flops, prefill_flops
from tests.conftest import make_image

CONFIGS = Path(__file__).parent / "data" / "model-configs.json"  # copy of shared/reference/model-configs.json


def published(name: str) -> dict:
    models = {m["_model"]: m for m in json.loads(CONFIGS.read_text())["models"]}
    return models[name]


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("model", ["embedded", "tiny"])
@pytest.mark.parametrize("size", [(448, 336), (224, 224)])
def test_analytic_flops_match_flop_counter(model, size, tiny_qwen_dir):
    adapter = get_adapter("qwen2.5-vl")
    loaded = adapter.load(None if model == "embedded" else tiny_qwen_dir)
    loaded.model.set_attn_implementation("eager")  # explicit matmuls, which FlopCounterMode sees on CPU
    stack = adapter.text_stack(loaded)
    inputs = adapter.prepare(loaded, [make_image(*size)], ["What is in this picture?"])
    n, t = inputs.num_visual, inputs.seq_len - inputs.num_visual
    shape = LMShape.from_config(loaded.config.to_dict())
    depth = shape.layers
    schedule = PruneSchedule(2, 0.25, 0.1, depth - 2, "topk", 0.05)

    full = prefill_flops(shape, n, t, None)
    measured_full = counted(lambda: HalfVReference(stack, None).prefill(inputs))
    assert full.full == pytest.approx(measured_full, rel=0.02)

    halfv = prefill_flops(shape, n, t, schedule)
    measured_halfv = counted(lambda: HalfVReference(stack, schedule).prefill(inputs))
    assert halfv.halfv + halfv.overhead == pytest.approx(measured_halfv, rel=0.02)
    assert halfv.ratio > 1.5


def test_qwen7b_paper_schedule_ratios():
    shape = LMShape.from_config(published("Qwen/Qwen2.5-VL-7B-Instruct"))
    assert (shape.layers, shape.hidden, shape.kv_heads, shape.intermediate) == (28, 3584, 4, 18944)
    paper = PruneSchedule(2, 0.25, 0.1, 21, "topk", 0.05)
    assert 4.0 <= prefill_flops(shape, 4096, 64, paper).ratio <= 4.2
    assert 3.0 <= prefill_flops(shape, 576, 64, paper).ratio <= 3.4


def test_freeze_mode_pays_kv_for_frozen_rows():
    shape = LMShape.from_config(published("llava-hf/llava-1.5-7b-hf"))
    assert (shape.layers, shape.hidden, shape.kv_heads) == (32, 4096, 32)  # Llama defaults filled in
    freeze = PruneSchedule(3, 0.5, 0.2, 15, "freeze")
    f = prefill_flops(shape, 576, 64, freeze)
    assert f.rows_per_layer[15] == (64, 288 + 64) and f.rows_per_layer[14] == (352, 352)
    # a frozen layer costs exactly the text rows' work plus K/V projections of the 288 frozen rows and the text
    # queries' attention over them
    d, hd = shape.hidden, shape.head_dim
    extra = 2 * (2 * 288 * d * shape.kv_heads * hd) + 2 * 2 * 64 * 288 * shape.heads * hd
    assert layer_flops(shape, 64, 352) - layer_flops(shape, 64, 64) == extra
    assert 1.5 < f.ratio < 4


def test_flops_cli_prints_ratio_lines(run_cli, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(published("Qwen/Qwen2.5-VL-7B-Instruct")))
    result = run_cli("flops", "--config", config, "--visual-tokens", 4096, "--text-tokens", 64)
    assert result.exit_code == 0, result.output
    ratio = float([line for line in result.output.splitlines() if line.startswith("ratio:")][0].split()[1])
    assert 4.0 <= ratio <= 4.2
    sweep = run_cli("flops", "--config", config, "--visual-tokens", 576, "--visual-tokens", 16384)
    ratios = [float(line.split()[1]) for line in sweep.output.splitlines() if line.startswith("ratio:")]
    assert len(ratios) == 2 and ratios[0] < ratios[1]


def test_flops_cli_needs_a_schedule_for_unknown_backbones(run_cli, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(published("Qwen/Qwen2-VL-2B-Instruct")))  # qwen2_vl: no adapter registered
    result = run_cli("flops", "--config", config, "--visual-tokens", 1024)
    assert result.exit_code == 2 and "no paper schedule for model_type 'qwen2_vl'" in result.output
    ok = run_cli("flops", "--config", config, "--visual-tokens", 1024, "--ivr-layer", 2, "--keep-ratio", 0.5,
                 "--anchor-ratio", 0.1, "--ssr-layer", 16, "--ssr-mode", "freeze", "--json")
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.output)["rows"][0]["ratio"] > 1.5


# ------------------------------------------------------------------------------------------------ end to end
def test_windowed_vision_flops_by_hand_at_4096_tokens():
    """Published 7B tower at 64x64 merged tokens (1792x1792 px): 16384 patches, 256 full 64-patch windows."""
    from halfv_export.measure.vision_flops import vision_flops

    v = vision_flops(published("Qwen/Qwen2.5-VL-7B-Instruct"), 3584, 4096)
    p, c, m = 16384, 1280, 3420
    linear = 2 * p * (3 * c * c + c * c + 3 * c * m)
    windowed = 256 * 4 * 64 * 64 * c
    full = 4 * p * p * c
    embed = 2 * p * 1176 * c
    merger = 2 * 4096 * 5120 * 5120 + 2 * 4096 * 5120 * 3584
    assert v.grid == (64, 64)
    assert v.windowed_attention == 28 * windowed and v.full_attention == 4 * full
    assert v.total == 32 * linear + 28 * windowed + 4 * full + embed + merger
    assert round(v.total / 1e12, 2) == 26.70  # export notes §10


def test_border_windows_are_counted_as_they_run():
    from halfv_export.measure.vision_flops import window_lengths

    # 9 x 12 merged grid, 4 x 4 windows: rows cut 4, 4, 1; columns 4, 4, 4; 4 patches per merged token
    assert window_lengths(9, 12, 4, 4) == [64, 64, 64, 64, 64, 64, 16, 16, 16]


def test_vision_flops_match_flop_counter_on_the_tower(qwen):
    """The analytic count against FlopCounterMode on transformers' tower (eager attention, per-window matmuls) at
    a grid whose windows do not divide evenly."""
    import torch

    from halfv_export.measure.vision_flops import windowed_vision_flops

    adapter, loaded, _ = qwen
    loaded.model.set_attn_implementation("eager")
    try:
        bucket = (252, 336)  # 18 x 24 patches -> 9 x 12 merged
        pixels = torch.randn(18 * 24, 1176)
        with torch.no_grad():
            measured = counted(lambda: adapter.eager_vision(loaded, pixels, bucket))
    finally:
        loaded.model.set_attn_implementation("sdpa")
    config = loaded.config.to_dict()
    analytic = windowed_vision_flops(config["vision_config"], config["text_config"]["hidden_size"], (9, 12))
    assert analytic.total == pytest.approx(measured, rel=0.01)


def test_clip_vision_flops_by_hand():
    from halfv_export.measure.vision_flops import vision_flops

    v = vision_flops(published("llava-hf/llava-1.5-7b-hf"), 4096, 576)
    t, c, m = 577, 1024, 4096
    layer = 8 * t * c * c + 4 * t * c * m + 4 * t * t * c
    assert v.total == 24 * layer + 2 * 576 * 588 * c + 2 * 576 * c * 4096 + 2 * 576 * 4096 * 4096
    assert vision_flops(published("llava-hf/llava-1.5-7b-hf"), 4096, 2304).total == 4 * v.total  # 4 tiles


def test_flops_cli_end_to_end_prints_both_ratios(run_cli, tmp_path):
    from halfv_export.measure.flops import LMShape, prefill_flops
    from halfv_export.measure.vision_flops import vision_flops

    cfg = published("Qwen/Qwen2.5-VL-7B-Instruct")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg))
    result = run_cli("flops", "--config", config, "--visual-tokens", 4096, "--end-to-end")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    ratio = float([x for x in lines if x.startswith("ratio:")][0].split()[1])
    e2e = float([x for x in lines if x.startswith("end-to-end ratio:")][0].split()[2])
    llm = prefill_flops(LMShape.from_config(cfg), 4096, 64, PruneSchedule(2, 0.25, 0.1, 21, "topk", 0.05))
    vision = vision_flops(cfg, 3584, 4096).total
    assert e2e == pytest.approx((vision + llm.full) / (vision + llm.halfv), abs=1e-3)
    assert 2.0 < e2e < 2.2 < 4.0 < ratio  # export notes §10: 2.10 end to end vs 4.03 prefill-only


def test_flops_end_to_end_needs_a_vision_config(run_cli, tmp_path):
    cfg = dict(published("Qwen/Qwen2.5-VL-7B-Instruct"))
    del cfg["vision_config"]
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg))
    result = run_cli("flops", "--config", config, "--visual-tokens", 576, "--end-to-end")
    assert result.exit_code == 2 and "vision_config" in result.output and "Traceback" not in result.output


def test_matched_keep_spends_what_halfv_spends():
    from halfv_export.graphs.pruning import PruneSchedule
    from halfv_export.measure.flops import LMShape, matched_keep, prefill_flops, single_cut_flops

    shape = LMShape(hidden=128, intermediate=352, layers=8, heads=4, kv_heads=2, head_dim=32, vocab=1038)
    sched = PruneSchedule(1, 0.25, 0.1, 6, "topk", 0.05)
    budget = prefill_flops(shape, 64, 40, sched).halfv
    k = matched_keep(shape, 64, 40, 1, budget)
    costs = [single_cut_flops(shape, 64, 40, 1, j) for j in range(1, 65)]
    assert costs == sorted(costs) and costs[-1] == prefill_flops(shape, 64, 40, None).full  # K = N: unpruned
    assert abs(costs[k - 1] - budget) == min(abs(c - budget) for c in costs)
    assert 1 <= k < 16  # SSR saves compute after L2, so one cut at L1 must keep fewer than K1 = 16 rows


# ------------------------------------------------------------------------------------------------ vision cut
def test_cut_tower_flops_by_hand_at_4096_tokens():
    """Published 7B tower, 64x64 merged tokens, cut after block 7 keeping a quarter: blocks 0-7 on 16384 patches
    (7 windowed, 1 full), blocks 8-31 on 4096 kept patches (21 windowed in 64 dense 64-patch windows, 3 full), the
    merger on 1024 tokens."""
    from halfv_export.graphs.pruning import VisionCut
    from halfv_export.measure.vision_flops import vision_flops

    v = vision_flops(published("Qwen/Qwen2.5-VL-7B-Instruct"), 3584, 4096, cut=VisionCut(7, 0.25))
    c, m = 1280, 3420
    linear = lambda p: 2 * p * (3 * c * c + c * c + 3 * c * m)  # noqa: E731
    before = 8 * linear(16384) + 7 * 256 * 4 * 64 * 64 * c + 4 * 16384 ** 2 * c
    after = 24 * linear(4096) + 21 * 64 * 4 * 64 * 64 * c + 3 * 4 * 4096 ** 2 * c
    embed = 2 * 16384 * 1176 * c
    merger = 2 * 1024 * 5120 * 5120 + 2 * 1024 * 5120 * 3584
    assert v.kept == 1024 and v.total == before + after + embed + merger


def test_cut_flops_match_flop_counter_on_the_cut_graph(qwen):
    """The analytic count with a cut against FlopCounterMode on the graph module that runs it (448x448: every
    window full, the 256 kept patches four dense windows, so the graph pads nothing)."""
    import torch

    from halfv_export.graphs.pruning import VisionCut
    from halfv_export.graphs.qwen2_5_vl import QwenVisionBucket
    from halfv_export.measure.vision_flops import windowed_vision_flops

    _, loaded, _ = qwen
    cut = VisionCut(1, 0.25)
    module = QwenVisionBucket(loaded.model.model.visual, (1, 32, 32), cut).eval()
    with torch.no_grad():
        measured = counted(lambda: module(torch.randn(32 * 32, 1176)))
    config = loaded.config.to_dict()
    analytic = windowed_vision_flops(config["vision_config"], config["text_config"]["hidden_size"], (16, 16), cut)
    uncut = windowed_vision_flops(config["vision_config"], config["text_config"]["hidden_size"], (16, 16))
    assert analytic.kept == 64 and analytic.total == pytest.approx(measured, rel=0.01)
    assert analytic.total < 0.75 * uncut.total


def test_flops_cli_counts_the_vision_cut_and_refuses_a_bad_one(run_cli, tmp_path):
    from halfv_export.graphs.pruning import VisionCut
    from halfv_export.measure.flops import LMShape, prefill_flops
    from halfv_export.measure.vision_flops import vision_flops

    cfg = published("Qwen/Qwen2.5-VL-7B-Instruct")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg))
    result = run_cli("flops", "--config", config, "--visual-tokens", 1024, "--vision-cut", "7:0.25")
    assert result.exit_code == 0, result.output
    cut = float([x for x in result.output.splitlines() if x.startswith("end-to-end ratio with the vision cut:")][0]
                .split()[-1])
    paper = PruneSchedule(2, 0.25, 0.1, 21, "topk", 0.05)
    shape = LMShape.from_config(cfg)
    full = vision_flops(cfg, 3584, 1024).total + prefill_flops(shape, 1024, 64, None).full
    pruned = vision_flops(cfg, 3584, 1024, cut=VisionCut(7, 0.25)).total + prefill_flops(shape, 256, 64, paper).halfv
    assert cut == pytest.approx(full / pruned, abs=1e-3)
    for bad, problem in (("7", "write BLOCK:KEEP"), ("6:0.25", "pick one of [7, 15, 23]"), ("7:1.5", "keep 1.5")):
        for tokens in (1024, 0):  # refused whatever the token counts
            refused = run_cli("flops", "--config", config, "--visual-tokens", tokens, "--vision-cut", bad)
            assert refused.exit_code != 0 and problem in refused.output and "Traceback" not in refused.output
    shallow = dict(cfg, vision_config=dict(cfg["vision_config"], depth=8))  # full attention at 7 only: the last
    config.write_text(json.dumps(shallow))
    refused = run_cli("flops", "--config", config, "--visual-tokens", 1024, "--vision-cut", "7:0.25")
    assert refused.exit_code != 0 and "this tower has no full-attention block with blocks after it" in refused.output


def test_clip_cut_gives_the_llm_floor_n_times_keep_tokens():
    """CLIP runs one pass per 576 tokens; the cut keeps floor(N * keep) in all, each pass carrying its share."""
    from halfv_export.graphs.pruning import VisionCut
    from halfv_export.measure.vision_flops import vision_flops

    llava = published("llava-hf/llava-1.5-7b-hf")
    cut = VisionCut(11, 0.25)
    assert vision_flops(llava, 4096, 100, cut=cut).kept == 25  # fewer tokens than a pass holds
    one, four = vision_flops(llava, 4096, 576, cut=cut), vision_flops(llava, 4096, 2304, cut=cut)
    assert (one.kept, four.kept) == (144, 576)
    t, c, m = 577, 1024, 4096
    layer = lambda rows: 8 * rows * c * c + 4 * rows * c * m + 4 * rows * rows * c  # noqa: E731
    by_hand = 12 * layer(t) + 12 * layer(145) + 2 * 576 * 588 * c + 2 * 144 * c * 4096 + 2 * 144 * 4096 * 4096
    assert one.total == by_hand and four.total == 4 * by_hand
