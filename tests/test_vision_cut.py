"""The in-tower vision cut (graphs/vision_cut.py): transformers' blocks with the cut, the exported graph, and a
brute-force oracle that runs every block over all patches with dense boolean masks (no gathers, no varlen, no
padded layout) must agree on which tokens are kept and on their features."""

import json
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from halfv_export.base.data import Sample
from halfv_export.base.errors import BadInput
from halfv_export.graphs import get_adapter
from halfv_export.graphs.adapter import Processing
from halfv_export.graphs.lint import lint_file
from halfv_export.graphs.specs import vision_spec
from halfv_export.graphs.qwen2_5_vl import QwenVisionBucket
from halfv_export.graphs.pruning import PruneSchedule, VisionCut
from halfv_export.graphs.vision_cut import eager_cut_vision
from halfv_export.host.inputs import PAD_MULTIPLE
from halfv_export.tasks.digits import task_set


@pytest.fixture(scope="module")
def qwen():
    adapter = get_adapter("qwen2.5-vl")
    loaded = adapter.load(None)  # the embedded default: 4 blocks, full attention at 1 and 3, 112-px windows
    return adapter, loaded, Processing(loaded.tokenizer, loaded.image_processor, loaded.config)


def _pixels(adapter, processing, size, count=1, seed=1):
    samples = task_set(count, seed=seed, sizes=[size], task="page")
    host = adapter.host_inputs(processing, [s.image for s in samples], ["x"] * count)
    return host.pixel_values, adapter._grid(processing.image_processor, host.bucket)


def dense_oracle(visual, pixels, grid_thw, cut):
    """Every block over all P patches (window order); who attends to whom is a dense [P, P] mask: the original
    windows before the cut, after it only kept patches, windowed blocks within runs of 64 kept patches. Selection:
    Python's stable sort of the groups' received attention, computed from the full softmax."""
    grid = torch.tensor([grid_thw])
    unit, window = visual.spatial_merge_unit, (visual.window_size // visual.patch_size) ** 2
    window_index, cu = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                               window_size=visual.window_size, patch_size=visual.patch_size, kwargs={})
    p = int(grid.prod())
    window_of = torch.bucketize(torch.arange(p), cu[1:].long(), right=True)
    h = visual.patch_embed(pixels).reshape(p // unit, unit, -1)[window_index].reshape(p, -1)
    cos, sin = (t.reshape(p // unit, unit, -1)[window_index].reshape(p, -1)
                for t in visual.rotary_pos_emb(h, get_vision_position_ids(grid, visual.spatial_merge_size, kwargs={})))
    same_window = window_of[:, None] == window_of[None, :]
    everyone = torch.ones(p, p, dtype=torch.bool)
    kept_groups = None
    for i, block in enumerate(visual.blocks):
        full = i in visual.fullatt_block_indexes
        mask = everyone if full else same_window
        if kept_groups is not None:
            rows = torch.tensor([g * unit + j for g in kept_groups for j in range(unit)])
            kept = torch.zeros(p, dtype=torch.bool)
            kept[rows] = True
            packed = torch.full((p,), -1)
            packed[rows] = torch.arange(len(rows)) // window
            pair = kept[:, None] & kept[None, :]
            mask = pair if full else pair & (packed[:, None] == packed[None, :])
            mask = mask | torch.eye(p, dtype=torch.bool)  # dropped rows attend to themselves; nobody reads them
        attn = block.attn
        q, k, v = attn.qkv(block.norm1(h)).reshape(p, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        scores = torch.einsum("qhd,khd->hqk", q, k) * attn.scaling
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        if i == cut.block:
            received = weights.mean(dim=(0, 1)).reshape(-1, unit).sum(-1).tolist()
            kept_groups = sorted(sorted(range(len(received)), key=lambda g: -received[g])[:cut.tokens(len(received))])
        h = h + attn.proj(torch.einsum("hqk,khd->qhd", weights, v).reshape(p, -1))
        h = h + block.mlp(block.norm2(h))
    merged = visual.merger(h)  # [N, D]: groups of 4 consecutive rows
    order = sorted(kept_groups, key=lambda g: int(window_index[g]))
    return merged[order], torch.tensor([int(window_index[g]) for g in order])


@pytest.mark.parametrize("size", [(448, 448), (392, 504)], ids=["square", "border-windows"])
@torch.no_grad()
def test_eager_cut_and_graph_module_match_the_dense_oracle(qwen, size):
    adapter, loaded, processing = qwen
    visual = loaded.model.model.visual
    [pixels], grid = _pixels(adapter, processing, size)
    cut = VisionCut(block=1, keep=0.25)
    want_feats, want_tokens = dense_oracle(visual, pixels, grid, cut)
    n = grid[1] * grid[2] // 4
    assert want_tokens.shape == (cut.tokens(n),) and len(set(want_tokens.tolist())) == cut.tokens(n)
    for feats, tokens in (eager_cut_vision(visual, pixels, grid, cut)[:2], QwenVisionBucket(visual, grid, cut)(pixels)):
        assert torch.equal(tokens, want_tokens)
        torch.testing.assert_close(feats, want_feats, atol=2e-5, rtol=1e-4)
    # the cut changes what the kept tokens say (the uncut tower's features there differ): it is not a gather at the end
    uncut = adapter.eager_vision(loaded, pixels, size)  # [N, D] raster order
    assert (uncut[want_tokens] - want_feats).abs().max() > 1e-3


def test_exported_cut_is_tensorrt_clean_and_equals_eager(qwen, tmp_path):
    adapter, loaded, processing = qwen
    visual = loaded.model.model.visual
    pixel_values, grid = _pixels(adapter, processing, (392, 504), count=3, seed=4)
    cut = VisionCut(block=1, keep=0.3)
    spec = vision_spec(QwenVisionBucket(visual, grid, cut).eval(), pixel_values[0], (392, 504))
    assert spec.output_names == ["visual_features", "visual_tokens"]
    spec.export(tmp_path)
    path = tmp_path / spec.file
    assert lint_file(path) == []
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["visual_features", "visual_tokens"]
    for pixels in pixel_values:  # other pages than the one traced: the selection is computed, not baked in
        feats, tokens = session.run(None, {"pixel_values": pixels.numpy()})
        want_feats, want_tokens, _ = eager_cut_vision(visual, pixels, grid, cut)
        assert np.array_equal(tokens, want_tokens.numpy())
        np.testing.assert_allclose(feats, want_feats.numpy(), atol=2e-5, rtol=1e-4)


def test_a_cut_the_tower_cannot_make_is_refused_in_one_line(qwen):
    adapter, loaded, processing = qwen
    visual = loaded.model.model.visual  # full attention at blocks 1 and 3 of 0..3
    [pixels], grid = _pixels(adapter, processing, (448, 448))
    for cut, problem in ((VisionCut(0, 0.25), r"after block 0: .* pick one of \[1\]"),
                         (VisionCut(3, 0.25), r"after block 3: .* pick one of \[1\]"),  # nothing left to save
                         (VisionCut(1, 1.0), "keep 1.0: keep a share")):
        with pytest.raises(BadInput, match=problem) as eager:
            eager_cut_vision(visual, pixels, grid, cut)
        with pytest.raises(BadInput, match=problem) as graph:
            QwenVisionBucket(visual, grid, cut)
        assert "\n" not in str(eager.value) and str(eager.value) == str(graph.value)


@torch.no_grad()
def test_a_cut_prompt_keeps_the_kept_rows_at_their_original_positions(qwen):
    """The eager path with a cut (prepare(..., cut)): the prompt loses the dropped image rows, the kept rows keep
    the uncut prompt's positions, transformers' own language model reads the cut prompt as the reference does, and
    the runtime's numpy step (host/inputs.keep_visual_rows) cuts the same rows."""
    from halfv_export.graphs.halfv import HalfVReference
    from halfv_export.host.inputs import HostArrays, keep_visual_rows

    adapter, loaded, processing = qwen
    samples = task_set(2, seed=3, sizes=[(448, 448)], task="page")
    images = [s.image for s in samples]
    prompts = ["x", samples[1].prompt + " Answer with the digits only, in the order they are written."]  # padded
    cut = VisionCut(block=1, keep=0.25)
    full = adapter.prepare(loaded, images, prompts)
    ours = adapter.prepare(loaded, images, prompts, cut)
    n, k = full.num_visual, ours.num_visual
    extra = ours.seq_len - (full.seq_len - n + k)  # re-aligned to PAD_MULTIPLE by more left padding
    assert (n, k) == (256, 64) and ours.seq_len % PAD_MULTIPLE == 0 and 0 <= extra < PAD_MULTIPLE
    assert not ours.attention_mask[:, :extra].any() and torch.equal(ours.visual_start, full.visual_start + extra)
    assert full.visual_start[0] > full.visual_start[1] and full.attention_mask[0, 0] == 0  # left padding
    for b, pixels in enumerate(adapter.host_inputs(processing, images, prompts).pixel_values):
        feats, tokens, _ = eager_cut_vision(loaded.model.model.visual, pixels, (1, 32, 32), cut)
        assert torch.equal(ours.visual_tokens[b], tokens)
        s = int(full.visual_start[b])
        rows = list(range(s)) + [s + int(t) for t in tokens] + list(range(s + n, full.seq_len))
        assert torch.equal(ours.positions[:, b, extra:], full.positions[:, b, rows])
        assert torch.equal(ours.input_ids[b, extra:], full.input_ids[b, rows])
        assert torch.equal(ours.embeds[b, extra + s:extra + s + k], feats)
    assert torch.equal(ours.next_positions, full.next_positions)  # generation continues where the uncut would
    stack = adapter.text_stack(loaded)
    language = loaded.model.model.language_model  # transformers' M-RoPE over the cut positions
    theirs = loaded.model.lm_head(language(inputs_embeds=ours.embeds, position_ids=ours.positions,
                                           attention_mask=ours.attention_mask).last_hidden_state[:, -1])
    torch.testing.assert_close(HalfVReference(stack, None).prefill(ours).logits, theirs, atol=1e-5, rtol=1e-5)
    host = adapter.host_inputs(processing, images, prompts)
    arrays = HostArrays(host.input_ids.numpy(), host.attention_mask.numpy(), host.positions.numpy(),
                        host.visual_start.numpy(), host.num_visual, host.next_positions.numpy(), [], host.bucket)
    cut = keep_visual_rows(arrays, ours.visual_tokens.numpy())
    assert cut.num_visual == k and np.array_equal(cut.input_ids, ours.input_ids[:, extra:].numpy())
    assert np.array_equal(cut.visual_start, arrays.visual_start)
    assert np.array_equal(cut.next_positions, arrays.next_positions)
    assert np.array_equal(cut.positions, ours.positions[..., extra:].numpy())
    assert np.array_equal(cut.attention_mask, ours.attention_mask[:, extra:].numpy())


def test_backbones_without_a_vision_cut_refuse_it_in_one_line():
    adapter = get_adapter("llava-1.5")
    loaded = adapter.load(None)
    with pytest.raises(BadInput, match="llava-1.5 has no vision cut yet"):
        adapter.prepare(loaded, [task_set(1, sizes=[(336, 336)])[0].image], ["x"], VisionCut(5, 0.25))


@torch.no_grad()
def test_the_references_score_is_the_same_in_query_chunks(qwen):
    """received_attention over chunks of queries equals one pass over all of them (the dense oracle above scores
    in one pass at these sizes, so the chunked path is checked here)."""
    from halfv_export.graphs.vision_cut import received_attention

    _, loaded, _ = qwen
    block = loaded.model.model.visual.blocks[1]
    x = torch.randn(300, block.attn.qkv.in_features, generator=torch.Generator().manual_seed(0))
    cos, sin = torch.randn(300, 8).cos().repeat(1, 2), torch.randn(300, 8).sin().repeat(1, 2)
    whole = received_attention(block.attn, x, cos, sin, rows=300)
    torch.testing.assert_close(received_attention(block.attn, x, cos, sin, rows=64), whole, atol=1e-7, rtol=1e-5)
    assert whole.sum().item() == pytest.approx(1.0, abs=1e-5)  # each query's weights sum to 1: the mean sums to 1


@torch.no_grad()
def test_a_forced_vision_selection_is_kept_and_its_shortfall_measured(qwen):
    # validate's near-tie path: forcing the rule's own tokens changes nothing (shortfall 0); forcing a set with the
    # lowest-index kept token swapped for the lowest-index dropped one keeps exactly that set and reports that it
    # falls short (the oracle keeps the rule's own set)
    adapter, loaded, processing = qwen
    visual = loaded.model.model.visual
    [pixels], grid = _pixels(adapter, processing, (448, 448), seed=6)
    cut = VisionCut(block=1, keep=0.25)
    own = eager_cut_vision(visual, pixels, grid, cut)
    same = eager_cut_vision(visual, pixels, grid, cut, force=own.tokens)
    assert torch.equal(same.tokens, own.tokens) and torch.equal(same.features, own.features) and same.shortfall == 0
    _, oracle_tokens = dense_oracle(visual, pixels, grid, cut)
    dropped = sorted(set(range(grid[1] * grid[2] // 4)) - set(own.tokens.tolist()))
    swapped = torch.tensor(sorted(own.tokens.tolist()[1:] + [dropped[0]]))
    forced = eager_cut_vision(visual, pixels, grid, cut, force=swapped)
    assert torch.equal(forced.tokens, swapped) and torch.equal(own.tokens, oracle_tokens)
    assert forced.shortfall > 1e-3  # a real difference, far above the tie tolerance


def test_schedule_vision_cut_is_read_strictly(tmp_path):
    from halfv_export.calibration.schedule import read_vision_cut

    assert read_vision_cut({}) is None and read_vision_cut({"vision_cut": None}) is None
    assert read_vision_cut({"vision_cut": {"block": 1, "keep": 0.5}}) == VisionCut(1, 0.5)
    for raw in ({"block": "1", "keep": 0.5}, {"block": 1, "keep": 1}, {"block": 1}, [1, 0.5], {"block": True, "keep": 0.5}):
        with pytest.raises(BadInput, match="vision_cut=.* must be .* or re-run calibrate with --vision-cut") as err:
            read_vision_cut({"vision_cut": raw})
        assert "\n" not in str(err.value)


def test_calibrate_refuses_a_cut_it_cannot_build_in_one_line(run_cli, tmp_path):
    cases = [(["--backbone", "llava-1.5", "--vision-cut", "5:0.25"], "llava-1.5 has no vision cut yet"),
             (["--backbone", "qwen2.5-vl", "--vision-cut", "0:0.25"], r"after block 0: .* pick one of \[1\]"),
             (["--backbone", "qwen2.5-vl", "--vision-cut", "half"], "write BLOCK:KEEP")]
    for args, message in cases:
        out = tmp_path / "out"
        result = run_cli("calibrate", *args, "--paper-values", "--out", out)
        assert result.exit_code != 0 and re.search(message, result.output), result.output
        assert len(result.output.strip().splitlines()) == 1 and not (out / "schedule.json").exists()
    result = run_cli("calibrate", "--backbone", "qwen2.5-vl", "--vision-cut", "1:0.5", "--paper-values", "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "schedule.json").read_text())["vision_cut"] == {"block": 1, "keep": 0.5}


def test_compare_runs_every_method_on_the_cut_and_counts_the_tower(qwen, run_cli, tmp_path):
    # compare with the cut a schedule file carries: the unpruned model answers as without one, every method prunes
    # inside the LLM from the cut's K rows, and the TTFT fraction adds each side's tower (the cut one for the methods)
    from halfv_export.measure.flops import LMShape, prefill_flops
    from halfv_export.measure.report import baselines_markdown
    from halfv_export.measure.vision_flops import vision_flops
    from halfv_export.stages.compare import compare
    from halfv_export.stages.data import default_samples

    adapter, loaded, _ = qwen
    for name, extra in (("plain", []), ("cut", ["--vision-cut", "1:0.5"])):
        result = run_cli("calibrate", "--backbone", "qwen2.5-vl", "--paper-values", *extra, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
    plain = compare("qwen2.5-vl", tmp_path / "cmp-plain", schedule=tmp_path / "plain" / "schedule.json", samples=4,
                    keep_ratios=[0.25])
    cutting = compare("qwen2.5-vl", tmp_path / "cmp-cut", schedule=tmp_path / "cut" / "schedule.json", samples=4,
                      keep_ratios=[0.25])
    assert cutting["full"] == plain["full"] and plain["vision_cut"] is None
    n = 64  # 224 / 28 merged tokens a side
    assert cutting["vision_cut"] == {"block": 1, "keep": 0.5, "kept": {"64": 32}}
    halfv, random = cutting["points"][0]["methods"]["halfv"], cutting["points"][0]["methods"]["random"]
    assert halfv["kept"] == {"64": 8} and plain["points"][0]["methods"]["halfv"]["kept"] == {"64": 16}  # K / 4, N / 4
    config, shape = loaded.config.to_dict(), LMShape.from_config(loaded.config.to_dict())
    samples = default_samples(loaded, 4, 1000, split="eval")  # the questions compare drew
    mask = adapter.prepare(loaded, [x.image for x in samples], [x.prompt for x in samples]).attention_mask
    text = round(float(mask.sum(dim=1).float().mean()) - n)  # compare counts the batch's mean text rows
    schedule = PruneSchedule(**adapter.paper.at_depth(adapter.text_stack(loaded).num_layers))
    full = vision_flops(config, shape.hidden, n).total + prefill_flops(shape, n, text, None).full
    pruned = vision_flops(config, shape.hidden, n, cut=VisionCut(1, 0.5)).total + prefill_flops(
        shape, 32, text, schedule).halfv
    assert halfv["ttft_flops_fraction"] == pytest.approx(pruned / full)
    assert halfv["flops_fraction"] == pytest.approx(prefill_flops(shape, 32, text, schedule).halfv
                                                    / prefill_flops(shape, n, text, None).full)
    assert random["ttft_flops_fraction"] == pytest.approx(halfv["ttft_flops_fraction"], abs=0.02)  # matched on K
    md = (tmp_path / "cmp-cut" / "compare.md").read_text()
    assert "vision cut after tower block 1 keeping 0.5 of the tokens (64 -> 32)" in md and "TTFT FLOPs fraction" in md
    # validate --baselines' table names the cut and counts each method's rows out of the cut's K
    table = "\n".join(baselines_markdown({"layer": 1, "methods": cutting["points"][0]["methods"],
                                          "vision_cut": cutting["vision_cut"]}))
    assert "| HalfV (IVR + SSR) | 8 of 32 (N 64) |" in table and "cuts the vision tower (after block 1" in table
    # a backbone without a cut is refused in one line, nothing written
    result = run_cli("compare", "--backbone", "llava-1.5", "--vision-cut", "5:0.5", "--out", tmp_path / "no")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "llava-1.5 has no vision cut yet" in result.output and not (tmp_path / "no").exists()


@pytest.mark.slow
def test_a_cut_build_runs_the_cut_with_exact_parity_and_full_runs_the_uncut_tower(qwen, tmp_path):
    # build --vision-cut end to end on the embedded default: the engine keeps the tokens the eager cut keeps, its
    # HalfV prefill runs K rows, --full runs the uncut tower and equals transformers' own unpruned model, parity
    # gates pass with the cut's tokens among the compared sets, and the graphs stay TensorRT-clean
    from halfv_export.engines.api import open_pipeline
    from halfv_export.engines.trt_plan import PlanOptions, make_plan
    from halfv_export.serving.triton import write_repository
    from halfv_export.stages.build import build
    from halfv_export.stages.export import lint

    adapter, loaded, processing = qwen
    out = tmp_path / "build"
    result = build("qwen2.5-vl", out, paper_values=True, vision_cut=VisionCut(1, 0.5), latency_runs=1)
    meta, report = result.artifacts.meta, result.report.data
    [bucket] = meta["buckets"]
    assert (bucket["num_visual"], bucket["kept_visual"], meta["vision_cut"]) == (64, 32, {"block": 1, "keep": 0.5})
    assert bucket["vision_full"] == "vision_full_224x224.onnx" and bucket["vision_full"] in meta["graphs"]
    assert report["parity"]["kept_pairs"] == 3 * report["samples"] and report["parity"]["kept_indices_match"] == 1.0
    assert report["parity"]["greedy_tokens_match"] == 1.0 and not result.report.failures
    assert report["flops"]["kept_visual"] == 32 and report["flops"]["vision_halfv"] < report["flops"]["vision"]
    assert lint(out)[1] == []
    plan = {g.graph: g for g in make_plan(out).graphs}
    options = PlanOptions()
    embeds = plan["prefill_224x224.onnx"].profiles[0]["embeds"]  # K rows + text, + 15 for the cut rows' alignment
    assert "vision_full_224x224.onnx" in plan and [shape[1] for shape in embeds] == [
        32 + options.min_text, 32 + options.opt_text, 32 + options.max_text + PAD_MULTIPLE - 1]

    pipeline = open_pipeline(out, "onnxruntime")
    samples = task_set(2, seed=9, sizes=[(224, 224)])
    images, prompts = [s.image for s in samples], [s.prompt for s in samples]
    host = pipeline.host(images, prompts)
    state = pipeline.prefill(host, halfv=True)
    for b, pixels in enumerate(adapter.host_inputs(processing, images, prompts).pixel_values):
        _, tokens, _ = eager_cut_vision(loaded.model.model.visual, pixels, (1, 16, 16), VisionCut(1, 0.5))
        assert np.array_equal(pipeline.to_host(state.kept["vision"])[b], tokens.numpy())
    assert pipeline.prompt(host).host.num_visual == 32 and pipeline.prompt(host, halfv=False).host.num_visual == 64
    full = pipeline.prefill(host, halfv=False)
    inputs = adapter.prepare(loaded, images, prompts)  # transformers' own tower and language model, unpruned
    with torch.no_grad():
        hidden = loaded.model.model.language_model(inputs_embeds=inputs.embeds, position_ids=inputs.positions,
                                                   attention_mask=inputs.attention_mask).last_hidden_state
        want = loaded.model.lm_head(hidden[:, -1]).numpy()
    np.testing.assert_allclose(pipeline.to_host(full.logits), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(BadInput, match="vision cut.*Triton orchestrator does not cut rows yet"):
        write_repository(out, tmp_path / "triton")
    assert not (tmp_path / "triton").exists()

    # an engine whose tower kept a token the rule would not (first sample only) fails the parity gate: the eager
    # side, forced to keep the engine's tokens, finds them far from any set its rule could pick
    from halfv_export.engines.pipeline import EnginePipeline
    from halfv_export.measure.report import run_validation

    real_towers = EnginePipeline.towers

    def one_token_moved(self, host, halfv=True):
        outs = real_towers(self, host, halfv)
        if halfv:
            tokens = np.array(self.to_host(outs[0]["visual_tokens"]))
            dropped = sorted(set(range(host.num_visual)) - set(tokens.tolist()))
            outs[0] = {**outs[0], "visual_tokens": np.sort(np.append(tokens[1:], dropped[0]))}
        return outs

    EnginePipeline.towers = one_token_moved
    try:
        tampered = run_validation(pipeline, loaded, [Sample(f"s{i}", im, p) for i, (im, p) in
                                                     enumerate(zip(images, prompts))],
                                  PruneSchedule(**meta["schedule"]), "trained")["parity"]
    finally:
        EnginePipeline.towers = real_towers
    assert tampered["selection_differs"] == 1 and tampered["selection_valid"] < 1
    assert tampered["selection_shortfall_max"] > 1e-3


@torch.no_grad()
def test_calibration_measures_the_towers_token_entropy_per_block(qwen):
    # beyond the paper: calibrate records the TME of the tower's token rows after every block, for choosing a cut;
    # the last block's value equals the TME of what the merger receives (captured at the merger, not the blocks)
    from halfv_export.calibration.rules import measure_probes
    from halfv_export.graphs.tme import truncated_entropy

    adapter, loaded, _ = qwen
    samples = task_set(2, seed=8, sizes=[(448, 448)], task="page")
    merged_inputs = []
    hook = loaded.model.model.visual.merger.register_forward_pre_hook(lambda m, args: merged_inputs.append(args[0]))
    try:
        curves = measure_probes(adapter, loaded, samples, kl_probe=False)
    finally:
        hook.remove()
    assert curves["tower_cut_blocks"] == [1] and len(curves["tower"]) == len(loaded.model.model.visual.blocks)
    want = np.mean([truncated_entropy(h.reshape(-1, h.shape[-1])) for h in merged_inputs])
    assert curves["tower"][-1] == pytest.approx(want, rel=1e-9)
    assert len(set(round(v, 6) for v in curves["tower"])) == len(curves["tower"])  # one value per block
    llava = get_adapter("llava-1.5")
    assert llava.tower_blocks(llava.load(None)) is None
