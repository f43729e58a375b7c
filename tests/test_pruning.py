import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from halfv_export.graphs.pruning import (PruneSchedule, budgets, farthest_point_fill, floor_ratio, keep_index,
                                         top_indices)


def brute_force_fps(feats: np.ndarray, anchors: list[int], k: int) -> list[int]:
    """Textbook max-min farthest-point sampling, recomputing every distance each step, float64."""
    n = feats.shape[0]
    chosen = list(anchors)
    while len(chosen) < k:
        best, best_d = None, -np.inf
        for u in range(n):
            if u in chosen:
                continue
            d = 2.0 if not chosen else min(1.0 - float(feats[u] @ feats[v]) for v in chosen)
            if d > best_d + 1e-12:  # strict: the lowest index wins ties
                best, best_d = u, d
        chosen.append(best)
    return sorted(chosen)


def max_min_fps(feats: np.ndarray, anchors: list[int], k: int) -> tuple[list[int], float]:
    """The same textbook rule for larger n, float64 numpy: every step recomputes each unchosen row's cosine distance
    1 - <F_u, F_v> to every chosen row from the features and takes the row whose nearest chosen row is farthest
    (np.argmax: the lowest index on ties); 2.0 for every row while nothing is chosen.
    Returns the picks (ascending) and the smallest margin by which a pick beat the runner-up: a fp32 implementation
    can only be held to the exact set when that margin is well above fp32 rounding."""
    feats = np.asarray(feats, dtype=np.float64)
    chosen, margin = list(anchors), np.inf
    while len(chosen) < k:
        nearest = (1.0 - feats @ feats[chosen].T).min(axis=1) if chosen else np.full(len(feats), 2.0)
        nearest[chosen] = -np.inf
        best, runner_up = np.sort(nearest)[::-1][:2]
        margin = min(margin, best - runner_up)
        chosen.append(int(np.argmax(nearest)))
    return sorted(chosen), float(margin)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n,k,a", [(40, 10, 1), (64, 16, 0), (25, 25, 5), (50, 12, 3)])
def test_fps_matches_brute_force(seed, n, k, a):
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(2, n, 8, generator=g, dtype=torch.float64), dim=-1)
    anchors = torch.stack([torch.randperm(n, generator=g)[:a] for _ in range(2)])
    got = farthest_point_fill(feats, anchors, k)
    for b in range(2):
        assert got[b].tolist() == brute_force_fps(feats[b].numpy(), anchors[b].tolist(), k)


def test_fps_without_anchors_starts_at_token_zero_and_breaks_ties_low():
    feats = F.normalize(torch.ones(1, 6, 4), dim=-1)  # all identical: every distance ties
    assert farthest_point_fill(feats, torch.zeros(1, 0, dtype=torch.long), 3).tolist() == [[0, 1, 2]]


def test_top_indices_ties_go_to_lower_index_and_come_back_sorted():
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.2, 0.5]])
    assert top_indices(scores, 2).tolist() == [[1, 2]]
    assert top_indices(scores, 4).tolist() == [[1, 2, 3, 4]]


def test_budget_formulas_match_paper_example():
    # method §7: N = 1000 on Qwen -> K1 = 250, A = 25 anchors, K2 = 50
    plan = budgets(1000, PruneSchedule(2, 0.25, 0.1, 21, "topk", 0.05))
    assert (plan.k1, plan.anchors, plan.k2) == (250, 25, 50)
    # K2 is relative to the original N and capped by K1
    assert budgets(100, PruneSchedule(2, 0.1, 0.1, 5, "topk", 0.5)).k2 == 10
    # freeze keeps the K1 rows (as frozen keys/values)
    assert budgets(576, PruneSchedule(3, 0.5, 0.2, 15, "freeze")).k2 == 288
    assert floor_ratio(10, 0.1) == 1 and floor_ratio(3, 0.25) == 0 and floor_ratio(7, 1.0) == 7


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 40000), num=st.integers(1, 1000))
def test_floor_ratio_is_exact_decimal_floor(n, num):
    ratio = num / 1000  # ratios as written with up to three decimals
    assert floor_ratio(n, ratio) == (n * num) // 1000
    assert 0 <= floor_ratio(n, ratio) <= n


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_keep_index_is_text_plus_selected_visual_ascending(data):
    b = data.draw(st.integers(1, 3))
    n = data.draw(st.integers(1, 20))
    k = data.draw(st.integers(1, n))
    seq = n + data.draw(st.integers(0, 15))
    starts = [data.draw(st.integers(0, seq - n)) for _ in range(b)]
    selected = [sorted(data.draw(st.permutations(range(n)))[:k]) for _ in range(b)]
    got = keep_index(torch.tensor(starts), torch.tensor(selected), n, seq)
    for i in range(b):
        s = starts[i]
        want = list(range(s)) + [s + j for j in selected[i]] + list(range(s + n, seq))
        assert got[i].tolist() == want


# ------------------------------------------------------------------------------------------------ FPS formulations
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 48), dims=st.integers(1, 6), batch=st.integers(1, 3),
       duplicates=st.booleans(), data=st.data())
def test_fps_chain_is_identical_to_the_literal_form(seed, n, dims, batch, duplicates, data):
    """The 4-node step (diagonal -1, flat row gather) picks exactly what the literal form picks, ties included:
    duplicated rows and few dimensions make equal distances common."""
    from halfv_export.graphs.pruning import farthest_point_fill_reference

    k = data.draw(st.integers(1, n))
    a = data.draw(st.integers(0, k))
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, n, dims, generator=g)
    if duplicates:
        feats = feats[:, torch.randint(0, max(1, n // 3), (n,), generator=g)]
    feats = F.normalize(feats, dim=-1)
    anchors = torch.stack([torch.randperm(n, generator=g)[:a] for _ in range(batch)])
    assert torch.equal(farthest_point_fill(feats, anchors, k), farthest_point_fill_reference(feats, anchors, k))


@pytest.mark.parametrize("n", [96, 520])  # 520: the block-triangular similarity (pruning.similarity)
def test_fps_chain_exports_four_nodes_a_step_and_matches_onnxruntime(tmp_path, n):
    import onnx
    import onnxruntime as ort

    from halfv_export.graphs.lint import lint_file
    from halfv_export.graphs.onnx_export import batch_dim, export_module
    from halfv_export.graphs.pruning import GRAM_BLOCKED_FROM

    k, a = 40, 4

    class Fill(torch.nn.Module):
        def forward(self, feats, anchors):
            return farthest_point_fill(feats, anchors, k)

    g = torch.Generator().manual_seed(3)
    feats = F.normalize(torch.randn(2, n, 16, generator=g), dim=-1)
    anchors = torch.stack([torch.randperm(n, generator=g)[:a] for _ in range(2)])
    b = batch_dim()
    path = export_module(Fill(), (feats, anchors), tmp_path / "fps.onnx", ["feats", "anchors"], ["selected"],
                         ({0: b}, {0: b}))
    assert lint_file(path) == []
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    # one ArgMax per pick; the last pick's update is dead and pruned by the exporter
    assert ops.count("ArgMax") == k - a and ops.count("Gather") == ops.count("Min") == k - a - 1
    assert ops.count("MatMul") == (10 if n >= GRAM_BLOCKED_FROM else 1)  # 4 x 4 blocks: the upper 10 only
    blocks = 30 if n >= GRAM_BLOCKED_FROM else 0  # split, transposes, concatenations
    assert len(ops) <= 4 * (k - a) + 30 + blocks  # the chain, the distance matrix, the anchors' min and the sort
    feats3 = F.normalize(torch.randn(3, n, 16, generator=g), dim=-1)  # another batch size than traced
    anchors3 = torch.stack([torch.randperm(n, generator=g)[:a] for _ in range(3)])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"feats": feats3.numpy(), "anchors": anchors3.numpy()})[0]
    want = [max_min_fps(feats3[b].numpy(), anchors3[b].tolist(), k) for b in range(3)]
    assert min(margin for _, margin in want) > 1e-5  # no near-tie in these features: an exact comparison
    assert got.tolist() == [picks for picks, _ in want]


@pytest.mark.parametrize("seed", range(4))
def test_selection_shortfall_is_zero_for_the_rules_own_pick_and_large_for_another(seed):
    from halfv_export.graphs.pruning import ivr_select, selection_shortfall

    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(2, 40, 8, generator=g), dim=-1)
    scores = torch.rand(2, 40, generator=g).softmax(-1)
    picked = ivr_select(scores, feats, 12, 3)
    assert selection_shortfall(scores, feats, picked, 3).max() < 1e-6  # fp32 inputs replayed in float64
    top = top_indices(scores, 7)
    assert selection_shortfall(scores, None, top, 0).max() == 0
    # swap one kept row for the dropped row nearest to it: a different, worse set
    for b in range(2):
        other = picked.clone()
        dropped = [u for u in range(40) if u not in picked[b].tolist()]
        nearest = max(dropped, key=lambda u: float(feats[b, u] @ feats[b, picked[b, -1]]))
        other[b, -1] = nearest
        assert selection_shortfall(scores, feats, other.sort(dim=1).values, 3)[b] > 1e-3
    worse = top.clone()
    worse[:, 0] = scores.argmin(dim=1)  # the lowest score instead of a kept one
    assert (selection_shortfall(scores, None, worse.sort(dim=1).values, 0) > 1e-4).all()


def test_selection_shortfall_accepts_the_other_side_of_an_exact_tie():
    from halfv_export.graphs.pruning import farthest_point_fill, selection_shortfall

    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(1, 20, 6, generator=g), dim=-1)
    feats[0, 17] = feats[0, 3]  # rows 3 and 17 are the same point: every distance to them ties exactly
    scores = torch.full((1, 20), 0.05)
    picked = farthest_point_fill(feats, torch.zeros((1, 0), dtype=torch.long), 10)[0].tolist()
    twin, other = (3, 17) if 3 in picked else (17, 3)
    assert other not in picked  # a duplicate is never picked twice (distance 0 to its twin)
    swapped = torch.tensor([sorted(other if u == twin else u for u in picked)])
    assert swapped.tolist()[0] != picked
    assert selection_shortfall(scores, feats, swapped, 0)[0] < 1e-6  # the rule could have picked either twin


@pytest.mark.parametrize("n", [512, 515, 1030])
def test_block_triangular_similarity_is_the_gram_matrix(n):
    from halfv_export.graphs.pruning import similarity

    feats = F.normalize(torch.randn(2, n, 16, generator=torch.Generator().manual_seed(n + 1)), dim=-1)
    got = similarity(feats)
    assert got.shape == (2, n, n) and torch.equal(got, got.transpose(1, 2))  # exactly symmetric by construction
    f = feats.double().numpy()
    gram = np.einsum("bud,bvd->buv", f, f)  # <F_u, F_v> for every pair, float64
    np.testing.assert_allclose(got.numpy(), gram, rtol=0, atol=1e-6)
    anchors = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(1))[:3]] * 2)
    want = [max_min_fps(f[b], anchors[b].tolist(), 40) for b in range(2)]
    assert min(margin for _, margin in want) > 1e-5  # seeds without a near-tie (n + 0 has one at 2e-9 for n = 515)
    assert farthest_point_fill(feats, anchors, 40).tolist() == [picks for picks, _ in want]  # the fill on blocks


@pytest.mark.parametrize("n", [100, 512, 1030])
def test_similarity_flops_count_what_similarity_computes(n):
    from torch.utils.flop_counter import FlopCounterMode

    from halfv_export.graphs.pruning import similarity, similarity_flops

    with FlopCounterMode(display=False) as counter:
        similarity(torch.randn(1, n, 24))
    assert counter.get_total_flops() == similarity_flops(n, 24)
    assert similarity_flops(n, 24) <= 2 * n * n * 24 * (1 if n < 512 else 0.63)
