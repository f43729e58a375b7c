"""validate's near-tie rule at a high-resolution N: relevance scores sum to 1 over N visual rows, so at N = 4096 a
mean score is 2.4e-4 and an absolute tolerance of 1e-5 would accept a top-K that keeps a row scored a few percent
below one it dropped. The rule (selection_shortfall <= TIE_TOLERANCE) must accept a rounding-level tie and refuse that pick."""

import torch

from halfv_export.graphs.pruning import selection_shortfall
from halfv_export.measure.report import TIE_TOLERANCE

N, K = 4096, 1024


def _scores(seed: int = 0) -> torch.Tensor:
    """[1, N] softmax-mean-like scores: positive, distinct, summing to 1."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
    return (s / s.sum())[None]


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores[0].argsort(descending=True, stable=True)[:k]


def test_a_rounding_level_tie_at_4096_rows_is_valid():
    scores = _scores()
    order = scores[0].argsort(descending=True, stable=True)
    worst_kept, best_dropped = order[K - 1], order[K]
    scores[0, best_dropped] = scores[0, worst_kept] * (1 + 3e-7)  # the dropped row wins by fp32 rounding only
    other_side = order[:K].sort().values[None]  # keeps worst_kept, drops the row a hair above it
    gap = float(selection_shortfall(scores, None, other_side, 0)[0])
    assert 0 < gap <= TIE_TOLERANCE


def test_a_wrong_pick_at_4096_rows_is_refused_though_its_absolute_gap_is_tiny():
    scores = _scores()
    order = scores[0].argsort(descending=True, stable=True)
    scores[0, order[K]] = scores[0, order[K - 1]] - 9e-6  # under the old absolute tolerance of 1e-5 ...
    assert 9e-6 / float(scores[0, order[K - 1]]) > 0.02  # ... but a few percent of a score at this N
    wrong = torch.cat([order[:K - 1], order[K:K + 1]]).sort().values[None]  # drops the K-th best, keeps the next
    assert float(selection_shortfall(scores, None, wrong, 0)[0]) > TIE_TOLERANCE
    assert float(selection_shortfall(scores, None, _top(scores, K).sort().values[None], 0)[0]) == 0.0


def test_a_wrong_anchor_at_4096_rows_is_refused():
    """The IVR anchors are a top-A of the same scores: the same scale applies to them."""
    scores = _scores(1)
    feats = torch.nn.functional.normalize(torch.randn(1, N, 8, generator=torch.Generator().manual_seed(2),
                                                      dtype=torch.float64), dim=-1)
    anchors = 16
    order = scores[0].argsort(descending=True, stable=True)
    scores[0, order[anchors]] = scores[0, order[anchors - 1]] - 9e-6
    wrong = torch.cat([order[:anchors - 1], order[anchors:anchors + 1]]).sort().values[None]  # K = A: no fill
    assert float(selection_shortfall(scores, feats, wrong, anchors)[0]) > TIE_TOLERANCE
    right = order[:anchors].sort().values[None]
    assert float(selection_shortfall(scores, feats, right, anchors)[0]) == 0.0
