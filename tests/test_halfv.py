"""The eager HalfV reference against HF's own forward and against itself across batch layouts."""

import pytest
import torch

from halfv_export.graphs.halfv import HalfVReference
from halfv_export.graphs.pruning import PruneSchedule
from tests.conftest import make_image

TOPK = PruneSchedule(ivr_layer=2, keep_ratio=0.25, anchor_ratio=0.1, ssr_layer=6, ssr_mode="topk", ssr_ratio=0.05)
FREEZE = PruneSchedule(ivr_layer=2, keep_ratio=0.5, anchor_ratio=0.2, ssr_layer=5, ssr_mode="freeze")


def hf_last_logits(loaded, inputs):
    with torch.no_grad():
        out = loaded.model.model.language_model(inputs_embeds=inputs.embeds, position_ids=inputs.positions,
                                                attention_mask=inputs.attention_mask)
        return loaded.model.lm_head(out.last_hidden_state[:, -1])


def test_unpruned_reference_equals_hf_forward_with_padding(qwen):
    adapter, loaded, stack = qwen
    inputs = adapter.prepare(loaded, [make_image(448, 336, 1), make_image(448, 336, 2)],
                             ["What is here?", "Describe every colour you can see in this picture."])
    assert int(inputs.attention_mask[0].sum()) < inputs.seq_len  # the first sample is left-padded
    ours = HalfVReference(stack, None).prefill(inputs).logits
    torch.testing.assert_close(ours, hf_last_logits(loaded, inputs), atol=1e-4, rtol=1e-4)


def test_keep_everything_schedule_is_the_unpruned_model(qwen):
    adapter, loaded, stack = qwen
    inputs = adapter.prepare(loaded, [make_image(336, 336, 3)], ["What is in the image?"])
    keep_all = PruneSchedule(2, 1.0, 0.1, 6, "topk", 1.0)
    result = HalfVReference(stack, keep_all).prefill(inputs)
    assert result.kept["ivr"].tolist() == [list(range(inputs.num_visual))]
    torch.testing.assert_close(result.logits, HalfVReference(stack, None).prefill(inputs).logits)


def test_cache_lengths_follow_the_three_layer_groups(qwen):
    adapter, loaded, stack = qwen
    inputs = adapter.prepare(loaded, [make_image(448, 448, 4)], ["Describe the image."])
    s, n = inputs.seq_len, inputs.num_visual
    result = HalfVReference(stack, TOPK).prefill(inputs)
    k1, k2 = result.budgets.k1, result.budgets.k2
    assert (n, k1, k2) == (256, 64, 12)
    assert result.cache.lengths() == [s] * 2 + [s - n + k1] * 4 + [s - n + k2] * 2
    assert set(result.kept["ssr"][0].tolist()) <= set(result.kept["ivr"][0].tolist())
    assert result.kept["ivr"].shape == (1, k1) and torch.all(result.kept["ivr"].diff() > 0)


@pytest.mark.parametrize("schedule", [TOPK, FREEZE], ids=["topk", "freeze"])
def test_batch_of_two_selects_like_two_batches_of_one(qwen, schedule):
    adapter, loaded, stack = qwen
    images = [make_image(392, 280, 5), make_image(392, 280, 6)]
    prompts = ["What is in this image?", "Please describe the shapes, the colours and the text in the picture."]
    ref = HalfVReference(stack, schedule)
    batch = ref.prefill(adapter.prepare(loaded, images, prompts))
    for i in range(2):
        single = ref.prefill(adapter.prepare(loaded, [images[i]], [prompts[i]]))
        for stage in ("ivr", "ssr"):
            assert batch.kept[stage][i].tolist() == single.kept[stage][0].tolist(), stage
        torch.testing.assert_close(batch.logits[i], single.logits[0], atol=1e-4, rtol=1e-4)


def test_text_only_prompt_is_the_identity(qwen):
    adapter, loaded, stack = qwen
    inputs = adapter.prepare(loaded, [None], ["Count from one to five."])
    assert inputs.num_visual == 0
    pruned = HalfVReference(stack, TOPK).prefill(inputs)
    assert pruned.kept == {} and pruned.cache.lengths() == [inputs.seq_len] * 8
    torch.testing.assert_close(pruned.logits, HalfVReference(stack, None).prefill(inputs).logits)


def test_freeze_keeps_visual_rows_constant_but_they_still_serve_as_keys(qwen):
    adapter, loaded, stack = qwen
    inputs = adapter.prepare(loaded, [make_image(336, 336, 7)], ["What do you see?"])
    captured = []
    result = HalfVReference(stack, FREEZE).prefill(inputs, capture=captured)
    h_l2, s, k1 = captured[FREEZE.ssr_layer]
    rows = slice(int(s[0]), int(s[0]) + k1)
    for h, _, _ in captured[FREEZE.ssr_layer + 1:]:
        assert torch.equal(h[:, rows], h_l2[:, rows])  # no update from L2 on
    # ... while text rows still change, and the frozen rows' K/V are in every frozen layer's cache
    assert not torch.equal(captured[-1][0][:, -1], h_l2[:, -1])
    assert result.cache.lengths()[FREEZE.ssr_layer:] == [inputs.seq_len - inputs.num_visual + k1] * 3
    # zeroing the frozen rows' values changes the text output: they really are attended to
    layer = stack.layers[FREEZE.ssr_layer]
    saved = layer.self_attn.v_proj.bias.data.clone()
    try:
        layer.self_attn.v_proj.bias.data += 5.0
        assert not torch.allclose(HalfVReference(stack, FREEZE).prefill(inputs).logits, result.logits)
    finally:
        layer.self_attn.v_proj.bias.data = saved


def test_decode_on_unpruned_cache_equals_hf_on_the_extended_prompt(qwen):
    adapter, loaded, stack = qwen
    inputs = adapter.prepare(loaded, [make_image(280, 280, 8)], ["Name the colours."])
    ref = HalfVReference(stack, None)
    first = ref.prefill(inputs)
    token = first.logits.argmax(-1)
    step_logits = ref.decode_step(token, first.cache)
    with torch.no_grad():
        embeds = torch.cat([inputs.embeds, stack.embed_tokens(token[:, None])], dim=1)
        positions = torch.cat([inputs.positions, inputs.next_positions[..., None]], dim=2)
        out = loaded.model.model.language_model(inputs_embeds=embeds, position_ids=positions)
        want = loaded.model.lm_head(out.last_hidden_state[:, -1])
    torch.testing.assert_close(step_logits, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("schedule", [TOPK, FREEZE], ids=["topk", "freeze"])
def test_pruned_prefill_then_greedy_decoding_runs(qwen, schedule):
    adapter, loaded, stack = qwen
    inputs = adapter.prepare(loaded, [make_image(448, 336, 9), make_image(448, 336, 10)],
                             ["What is this?", "Describe the picture in detail."])
    ref = HalfVReference(stack, schedule)
    tokens = ref.generate(inputs, max_new_tokens=6)
    assert tokens.shape == (2, 6)
    # greedy decoding is deterministic and matches a step-by-step replay on a fresh cache
    replay = ref.prefill(inputs)
    logits = replay.logits
    for step in range(6):
        assert torch.equal(logits.argmax(-1), tokens[:, step])
        logits = ref.decode_step(tokens[:, step], replay.cache)
    lengths = replay.cache.lengths()
    assert lengths[0] == inputs.seq_len + 6 and lengths[-1] < lengths[0]


def test_schedule_deeper_than_model_is_refused(qwen):
    from halfv_export.base.errors import BadInput

    _, _, stack = qwen
    with pytest.raises(BadInput, match="depth"):
        HalfVReference(stack, PruneSchedule(2, 0.25, 0.1, 21, "topk", 0.05))


# ------------------------------------------------------------------------------------------ ablation baselines
def test_ivr_baseline_at_k1_selects_what_halfv_selects(qwen):
    """IVR without SSR is HalfV's own first stage: at K = K1 it keeps exactly HalfV's IVR rows, then stops."""
    from halfv_export.graphs.pruning import SingleCut, budgets

    adapter, loaded, stack = qwen
    images = [make_image(336, 336, 11), make_image(336, 336, 12)]
    inputs = adapter.prepare(loaded, images, ["What is here?", "Which digits are in row 2, left to right?"])
    halfv = HalfVReference(stack, TOPK).prefill(inputs)
    k1 = budgets(inputs.num_visual, TOPK).k1
    cut = HalfVReference(stack, None, cut=SingleCut("ivr", TOPK.ivr_layer, k1, TOPK.anchor_ratio)).prefill(inputs)
    torch.testing.assert_close(cut.kept["cut"], halfv.kept["ivr"], rtol=0, atol=0)
    assert cut.cache.lengths()[-1] == inputs.seq_len - inputs.num_visual + k1  # no second stage


@torch.no_grad()
def paper_relevance(layer, h: torch.Tensor, start: int, n: int, heads: int, kv_heads: int) -> torch.Tensor:
    """The paper's IVR relevance, restated from the formula (method §4a) in float64 with plain loops: h [S, D] is the
    layer's input; x = RMSNorm(h); per head, softmax over the n visual keys of q(x[last]) . k(x[v]), with the head's
    GQA key head, no RoPE and no 1/sqrt(head_dim); mean over heads -> [n]."""
    norm, attn = layer.input_layernorm, layer.self_attn
    h = h.double()
    x = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.double()
    q = x[-1] @ attn.q_proj.weight.double().T + attn.q_proj.bias.double()  # [H * hd]
    hd = q.numel() // heads
    score = torch.zeros(n, dtype=torch.float64)
    for head in range(heads):
        g = head // (heads // kv_heads)
        wk, bk = attn.k_proj.weight.double()[g * hd:(g + 1) * hd], attn.k_proj.bias.double()[g * hd:(g + 1) * hd]
        logits = torch.stack([(x[start + v] @ wk.T + bk) @ q[head * hd:(head + 1) * hd] for v in range(n)])
        weights = torch.exp(logits - logits.max())
        score += weights / weights.sum() / heads
    return score


def test_attention_and_random_baselines(qwen):
    from halfv_export.graphs.pruning import SingleCut

    adapter, loaded, stack = qwen
    inputs = adapter.prepare(loaded, [make_image(336, 336, 13)], ["How many times does 7 appear?"])
    n, k = inputs.num_visual, 9
    attention = HalfVReference(stack, None, cut=SingleCut("attention", 2, k)).prefill(inputs)
    captured = []
    HalfVReference(stack, None).prefill(inputs, capture=captured)
    scores = paper_relevance(stack.layers[1], captured[1][0][0], int(inputs.visual_start[0]), n, stack.num_heads,
                             stack.num_kv_heads)
    order = sorted(range(n), key=lambda v: (-float(scores[v]), v))  # highest first, ties to the lower index
    assert attention.kept["cut"][0].tolist() == sorted(order[:k])
    assert float(scores[order[k - 1]] - scores[order[k]]) > 1e-6  # no near-tie at the cut: the comparison is exact
    # and the scores themselves (fp32 in the implementation) are the formula's
    from halfv_export.graphs.pruning import relevance_scores

    got = relevance_scores(stack, stack.layers[1], captured[1][0], inputs.visual_start, n)[0]
    torch.testing.assert_close(got.double(), scores, rtol=1e-4, atol=1e-6)
    draws = [HalfVReference(stack, None, cut=SingleCut("random", 2, k, seed=s)).prefill(inputs).kept["cut"][0].tolist()
             for s in (0, 0, 1)]
    assert draws[0] == draws[1] != draws[2]
    assert draws[0] == sorted(set(draws[0])) and len(draws[0]) == k and max(draws[0]) < n
    with pytest.raises(Exception, match="keeps 0 of"):
        HalfVReference(stack, None, cut=SingleCut("random", 2, 0)).prefill(inputs)


def test_random_baseline_draws_afresh_for_every_image(qwen):
    """One stream per evaluation, never reseeded: prefilling the same image again draws another subset (a reseed per
    prefill gave the b-th image of every batch the same one), a generator shared by successive references continues
    the stream, and the same seed replays it."""
    from halfv_export.graphs.pruning import SingleCut

    adapter, loaded, stack = qwen
    inputs = adapter.prepare(loaded, [make_image(336, 336, 14)], ["Which digits are in row 1, left to right?"])
    cut = SingleCut("random", 2, inputs.num_visual // 4, seed=3)
    one = HalfVReference(stack, None, cut=cut)
    first, second = (one.prefill(inputs).kept["cut"][0].tolist() for _ in range(2))
    assert first != second
    shared = torch.Generator().manual_seed(3)
    replay = [HalfVReference(stack, None, cut=cut, draws=shared).prefill(inputs).kept["cut"][0].tolist()
              for _ in range(2)]
    assert replay == [first, second]


def test_forced_selection_reproduces_the_rule_and_measures_another(qwen):
    adapter, loaded, stack = qwen
    inputs = adapter.prepare(loaded, [make_image(448, 448, seed=s) for s in (0, 1)], ["Describe.", "Count the dots."])
    schedule = PruneSchedule(2, 0.25, 0.1, 5, "topk", 0.05)
    reference = HalfVReference(stack, schedule)
    own = reference.prefill(inputs)
    forced = reference.prefill(inputs, force={"ivr": own.kept["ivr"], "ssr": own.kept["ssr"]})
    assert torch.equal(forced.logits, own.logits)  # forcing the rule's own choice changes nothing
    assert set(forced.shortfall) == {"ivr", "ssr"} and float(max(v.max() for v in forced.shortfall.values())) < 1e-6
    # keep the lowest-index dropped token instead of the last kept one: the rule would never choose that set
    ivr, ssr = own.kept["ivr"].clone(), own.kept["ssr"].clone()
    for b in range(2):
        dropped = [u for u in range(inputs.num_visual) if u not in ivr[b].tolist()]
        ivr[b, -1] = dropped[0]
        ssr[b, 0] = dropped[0]  # for the SSR test below: a row IVR did not keep
    other = reference.prefill(inputs, force={"ivr": ivr.sort(dim=1).values})
    assert (other.shortfall["ivr"] > 1e-4).all() and not torch.equal(other.logits, own.logits)
    assert torch.equal(other.kept["ivr"], ivr.sort(dim=1).values)
    # an SSR set that is not inside the IVR set cannot be followed: infinite shortfall, never a silent gather
    outside = reference.prefill(inputs, force={"ssr": ssr.sort(dim=1).values})
    assert torch.isinf(outside.shortfall["ssr"]).all()
