"""HalfV's pruning stages as plain tensor ops (method notes §4-§5, with the §8 interpretation).

Everything here is batched with per-sample indices, uses static shapes (N, K1, A, K2 are Python ints) and no
data-dependent shapes, so the same functions trace into ONNX: selection is sort/argmax, compaction is one gather.

Shapes: B batch, S sequence rows, N visual rows, D hidden, H query heads, G kv heads, hd head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F

from ..base.errors import BadInput
from ..base.kinds import SSRMode


@dataclass(frozen=True)
class PruneSchedule:
    """The static HalfV schedule: IVR before layer `ivr_layer`, SSR from layer `ssr_layer` on."""

    ivr_layer: int  # L1 >= 1
    keep_ratio: float  # rho: IVR keeps K1 = floor(N * rho) visual tokens
    anchor_ratio: float  # alpha: A = floor(K1 * alpha) of them are attention anchors
    ssr_layer: int  # L2 > L1
    ssr_mode: SSRMode  # a plain "topk" / "freeze" is turned into the member (ValueError for anything else)
    ssr_ratio: float | None = None  # sigma, topk only: K2 = min(floor(N * sigma), K1)

    def __post_init__(self):
        object.__setattr__(self, "ssr_mode", SSRMode(self.ssr_mode))

    def cache_groups(self, num_layers: int) -> list[int]:
        """KV-cache length group per layer: 0 before L1 (N visual rows), 1 from L1 (K1), 2 from L2 in topk mode
        (K2). Freeze mode keeps K1 rows to the end, so it has two groups."""
        return [0 if i < self.ivr_layer else (2 if (i >= self.ssr_layer and self.ssr_mode is SSRMode.TOPK) else 1)
                for i in range(num_layers)]


@dataclass(frozen=True)
class VisionCut:
    """Keep K = floor(N * keep) of N visual tokens after the vision tower's block `block` (graphs/vision_cut.py);
    the later blocks, the projector and the LLM run on the K kept tokens."""

    block: int
    keep: float

    def tokens(self, n: int) -> int:
        return max(1, floor_ratio(n, self.keep))

    @classmethod
    def parse(cls, text: str) -> "VisionCut":
        """'7:0.25' (the CLI's BLOCK:KEEP) -> VisionCut(7, 0.25); one line naming the form otherwise."""
        block, _, keep = str(text).partition(":")
        try:
            return cls(int(block), float(keep))
        except ValueError:
            raise BadInput(f"--vision-cut {text!r}: write BLOCK:KEEP, e.g. 7:0.25 (keep a quarter of the visual "
                           "tokens after the tower's block 7)") from None

    @staticmethod
    def blocks(depth: int, full_blocks: list[int] | None = None) -> list[int]:
        """The blocks a cut may follow: a windowed tower's full-attention blocks (full_blocks), any block for CLIP
        (None), in either case one with blocks after it."""
        return [b for b in (full_blocks if full_blocks is not None else range(depth)) if b < depth - 1]

    def check(self, depth: int, full_blocks: list[int] | None = None) -> None:
        """One line naming what is wrong and what to pick. A windowed tower (full_blocks given) scores tokens by
        a full-attention block's attention, so it cuts after one of those; any tower cuts before its last block."""
        if not 0 < self.keep < 1:
            raise BadInput(f"vision cut keep {self.keep}: keep a share of the visual tokens in (0, 1), e.g. 0.25")
        usable = self.blocks(depth, full_blocks)
        kind = "full-attention block with blocks after it" if full_blocks is not None else "block before the last"
        if not usable:
            raise BadInput(f"vision cut after block {self.block}: this tower has no {kind}; drop the cut")
        if self.block not in usable:
            raise BadInput(f"vision cut after block {self.block}: cut after a {kind}; pick one of {usable}")


@dataclass(frozen=True)
class Budgets:
    n: int  # visual tokens before pruning
    k1: int  # kept by IVR
    anchors: int  # A, of which chosen by attention
    k2: int  # visual rows from L2 on (= k1 in freeze mode: frozen rows stay as keys/values)


def floor_ratio(n: int, ratio: float) -> int:
    """floor(n * ratio) with the ratio read as the decimal it was written as (0.1 = 1/10), so that
    e.g. floor(10 * 0.1) = 1 exactly; matches the reference's int(n * ratio) for the paper's ratios."""
    r = Fraction(repr(float(ratio)))
    return n * r.numerator // r.denominator


def budgets(n: int, schedule: PruneSchedule) -> Budgets:
    k1 = floor_ratio(n, schedule.keep_ratio)
    anchors = floor_ratio(k1, schedule.anchor_ratio)
    k2 = min(floor_ratio(n, schedule.ssr_ratio), k1) if schedule.ssr_mode is SSRMode.TOPK else k1
    return Budgets(n=n, k1=k1, anchors=anchors, k2=k2)


# --------------------------------------------------------------------------------------------- row gathers
def visual_rows(start: torch.Tensor, n: int) -> torch.Tensor:
    """start [B] -> row indices of the visual block [B, n]."""
    return start[:, None] + torch.arange(n, device=start.device)[None, :]


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, S, *rest], rows [B, R] -> [B, R, *rest] (one int64 gather on axis 1)."""
    index = rows.reshape(rows.shape + (1,) * (x.dim() - 2)).expand(rows.shape + x.shape[2:])
    return x.gather(1, index)


def keep_index(start: torch.Tensor, selected: torch.Tensor, n: int, seq_len: int) -> torch.Tensor:
    """The ascending row index that keeps every text row and the selected visual rows.

    start [B], selected [B, K] (ascending, relative to the visual block) -> [B, seq_len - n + K]
        keep = [0, s) ∪ (s + selected) ∪ [s + n, S)
    Built arithmetically (no masks, no NonZero) so that it exports with static shapes.
    """
    k = selected.shape[1]
    j = torch.arange(seq_len - n + k, device=start.device)[None, :]  # [1, S']
    s = start[:, None]  # [B, 1]
    in_block = (j - s).clamp(0, max(k - 1, 0))  # [B, S']
    visual = s + selected.gather(1, in_block) if k > 0 else j.expand_as(in_block)
    return torch.where(j < s, j, torch.where(j < s + k, visual, j + (n - k)))


# --------------------------------------------------------------------------------------------- scores
def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, R, hd], cos/sin [B, R, hd] (already M-RoPE-recomposed for Qwen)."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def relevance_scores(stack, layer, hidden: torch.Tensor, start: torch.Tensor, n: int,
                     rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """How much the last prompt token attends to each visual token, at `layer` (method §4a / §5.1).

    hidden [B, S, D] is the input of `layer`; returns scores [B, n] in fp32.
    As in the reference: the query of the LAST row only, the visual keys only, NO 1/sqrt(hd) scaling, softmax over
    the visual keys per head, mean over heads. RoPE is applied only when `rope` (cos, sin [B, S, hd]) is given (SSR).
    """
    x = stack.maths.input_norm(layer, hidden)  # [B, S, D]
    rows = visual_rows(start, n)  # [B, n]
    q = stack.queries(layer, x[:, -1:, :])  # [B, H, 1, hd]
    k = stack.keys(layer, gather_rows(x, rows))  # [B, G, n, hd]
    if rope is not None:
        cos, sin = rope
        q = apply_rope(q, cos[:, -1:], sin[:, -1:])
        k = apply_rope(k, gather_rows(cos, rows), gather_rows(sin, rows))
    k = k.repeat_interleave(stack.num_heads // stack.num_kv_heads, dim=1)  # [B, H, n, hd]
    logits = q.float() @ k.float().transpose(-1, -2)  # [B, H, 1, n], unscaled on purpose
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]  # [B, n]


def ascending(indices: torch.Tensor) -> torch.Tensor:
    """Sort distinct int64 indices [B, K] ascending with TopK(largest=False): ONNX has no Sort op (export rule 4)."""
    return torch.topk(indices, indices.shape[1], dim=1, largest=False, sorted=True).values


def top_indices(scores: torch.Tensor, k: int, exporting: bool = False) -> torch.Tensor:
    """The k highest scores, ties -> lower index, returned ascending. [B, n] -> [B, k].

    Eager: a stable descending sort (torch.topk does not promise an order among ties on CPU). Exported: TopK
    (sorted, largest), whose ONNX spec breaks ties toward the lower index, so both agree."""
    if exporting:
        order = torch.topk(scores, k, dim=-1, largest=True, sorted=True).indices
    else:
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]
    return ascending(order)


# --------------------------------------------------------------------------------------------- IVR
def diversity_features(final_norm, hidden: torch.Tensor, start: torch.Tensor, n: int) -> torch.Tensor:
    """F = L2-normalise(finalRMSNorm(h_L1)[visual]) in fp32: hidden [B, S, D] -> [B, n, D] (method §4d)."""
    return F.normalize(final_norm(gather_rows(hidden, visual_rows(start, n))).float(), dim=-1)


GRAM_BLOCKS = 4  # the fill's similarity matrix in 4 x 4 blocks, the lower ones transposed from the upper
GRAM_BLOCKED_FROM = 512  # below it the whole Gram is a few ms and one MatMul keeps those graphs as they were


def similarity(features: torch.Tensor) -> torch.Tensor:
    """<F_u, F_v> for every pair: [B, n, C] -> [B, n, n], computed once per unordered pair of row blocks.

    The matrix is symmetric, so the 6 blocks below the diagonal of a 4 x 4 split are the transposes of those above
    it: 10 block products instead of 16, 37.5% fewer FLOPs. In ONNX Runtime on the 2-core box at [4096, 896]
    (tools/similarity_blocks.py): 127.0 ms against 175.6 for one MatMul, bit-identical values (its kernel
    accumulates every dot product in the same order however the rows are blocked). Eager computes it the same way."""
    n = features.shape[1]
    if n < GRAM_BLOCKED_FROM:
        return features @ features.transpose(1, 2)
    parts = features.split(-(-n // GRAM_BLOCKS), dim=1)
    upper = {(i, j): parts[i] @ parts[j].transpose(1, 2) for i in range(len(parts)) for j in range(i, len(parts))}
    rows = [torch.cat([upper[i, j] if j >= i else upper[j, i].transpose(1, 2) for j in range(len(parts))], dim=2)
            for i in range(len(parts))]
    return torch.cat(rows, dim=1)


def similarity_flops(n: int, dim: int) -> int:
    """The matmul FLOPs similarity() spends on n rows of width dim (2 per multiply-add, as measure.flops counts)."""
    if n < GRAM_BLOCKED_FROM:
        return 2 * n * n * dim
    step = -(-n // GRAM_BLOCKS)
    sizes = [min(step, n - i) for i in range(0, n, step)]
    return 2 * dim * sum(sizes[i] * sizes[j] for i in range(len(sizes)) for j in range(i, len(sizes)))


def farthest_point_fill(features: torch.Tensor, anchors: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy max-min farthest-point sampling seeded with the anchors (`hybrid_prune`, method §4d).

    features [B, n, C] unit rows, anchors [B, A] -> selected [B, k] ascending, relative visual indices.
        dist(u, v) = 1 - <F_u, F_v>
        md[u] = min over selected v of dist(u, v)   (2.0 everywhere when there are no anchors)
        md[selected] = -1
        repeat k - A times: u* = argmax md (lowest index on ties); select u*; md = min(md, dist(., u*)); md[u*] = -1

    Written for a short unrolled chain (k - A steps: 922 at N = 4096): the diagonal of dist is set to -1 once, so
    that min(md, dist[u*]) also marks u* (md >= -1 everywhere, so min(md[u*], -1) = -1) and the anchors come out
    marked by the same min; every other entry is the plain min. The selection is identical to
    farthest_point_fill_reference (tested index for index), and a step is ArgMax, Add, Gather, Min: 4 nodes
    instead of 9, with md kept as [B, 1, n] and dist read one row per sample from a flat [B*n, n] view."""
    b, n, _ = features.shape
    a = anchors.shape[1]
    token = torch.arange(n, device=features.device)
    dist = 1.0 - similarity(features)  # [B, n, n]
    dist = torch.where(token[:, None] == token[None, :], -1.0, dist)  # selected rows read -1 from their own row
    if a > 0:
        md = dist.gather(2, anchors[:, None, :].expand(b, n, a)).min(dim=2).values[:, None, :]  # [B, 1, n]
    else:
        md = torch.full((b, 1, n), 2.0, dtype=dist.dtype, device=dist.device)
    flat = dist.reshape(b * n, n)  # row u of sample i is flat row i*n + u
    offset = (torch.arange(b, device=features.device) * n)[:, None]  # [B, 1]
    picks = [anchors]
    for _ in range(k - a):  # unrolled: a fixed trip count, constant-shape state
        u = md.argmax(dim=2)  # [B, 1], the first maximum (ONNX ArgMax select_last_index=0)
        picks.append(u)
        md = torch.minimum(md, F.embedding(u + offset, flat))  # [B, 1, n]: one Gather on axis 0
    return ascending(torch.cat(picks, dim=1))


def farthest_point_fill_reference(features: torch.Tensor, anchors: torch.Tensor, k: int) -> torch.Tensor:
    """The literal form of farthest_point_fill (explicit anchor and pick masks): the parity oracle for it."""
    b, n, _ = features.shape
    a = anchors.shape[1]
    dist = 1.0 - similarity(features)  # [B, n, n]
    token = torch.arange(n, device=features.device)[None, :]  # [1, n]
    if a > 0:
        md = dist.gather(2, anchors[:, None, :].expand(b, n, a)).min(dim=2).values  # [B, n]
        is_anchor = (token[:, :, None] == anchors[:, None, :]).any(dim=2)  # [B, n] one-hot, no ScatterElements
        md = torch.where(is_anchor, -1.0, md)
    else:
        md = torch.full((b, n), 2.0, dtype=dist.dtype, device=dist.device)
    picks = [anchors]
    for _ in range(k - a):
        u = md.argmax(dim=1, keepdim=True)  # [B, 1]
        picks.append(u)
        md = torch.minimum(md, dist.gather(1, u[:, :, None].expand(b, 1, n))[:, 0])
        md = torch.where(token == u, -1.0, md)
    return ascending(torch.cat(picks, dim=1))


def ivr_select(scores: torch.Tensor, features: torch.Tensor, k1: int, num_anchors: int,
               exporting: bool = False) -> torch.Tensor:
    """IVR: A attention anchors + (K1 - A) farthest-point picks. scores [B, n], features [B, n, C] -> [B, K1]."""
    anchors = top_indices(scores, num_anchors, exporting)
    return farthest_point_fill(features, anchors, k1)


# --------------------------------------------------------------------------------------------- the cut
def stage_at(schedule: PruneSchedule, layer_index: int) -> str | None:
    """The stage that selects just before `layer_index`: "ivr", "ssr" (topk mode only) or None."""
    if layer_index == schedule.ivr_layer:
        return "ivr"
    if layer_index == schedule.ssr_layer and schedule.ssr_mode is SSRMode.TOPK:
        return "ssr"
    return None


def selection_inputs(stack, stage: str, layer_index: int, prev_input: torch.Tensor, hidden: torch.Tensor,
                     start: torch.Tensor, n: int, cos: torch.Tensor, sin: torch.Tensor):
    """What the stage's decision reads: (scores [B, N], features [B, N, D] for IVR's fill, else None).

        IVR:  scores(layer L1-1 on its input, no RoPE), features of the input of L1
        SSR:  scores(layer L2-1 on its input, RoPE at the kept positions)"""
    layer = stack.layers[layer_index - 1]
    if stage == "ivr":
        return (relevance_scores(stack, layer, prev_input, start, n),
                diversity_features(stack.norm, hidden, start, n))
    return relevance_scores(stack, layer, prev_input, start, n, rope=(cos, sin)), None


def select_before_layer(stack, schedule: PruneSchedule, plan: Budgets, layer_index: int, prev_input: torch.Tensor,
                        hidden: torch.Tensor, start: torch.Tensor, n: int, cos: torch.Tensor, sin: torch.Tensor,
                        exporting: bool = False) -> torch.Tensor | None:
    """HalfV's decision just before `layer_index`: the visual rows to keep [B, K] (ascending, relative to the
    current visual block), or None when no stage acts there. Shared by the eager reference and the export graph.

        layer L1:          IVR  top-A anchors by score + FPS fill -> K1
        layer L2 (topk):   SSR  top-K2 by score
    prev_input is the input of layer_index - 1; hidden the input of layer_index; cos/sin [B, S, hd].
    """
    stage = stage_at(schedule, layer_index)
    if stage is None:
        return None
    scores, features = selection_inputs(stack, stage, layer_index, prev_input, hidden, start, n, cos, sin)
    if stage == "ivr":
        return ivr_select(scores, features, plan.k1, plan.anchors, exporting)  # [B, K1]
    return top_indices(scores, plan.k2, exporting)  # [B, K2]


# --------------------------------------------------------------------------------------------- near-ties
def relative_rows(original: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Original visual indices `kept` [B, K] -> their positions in the current block `original` [B, n] (both
    ascending), and [B] whether every one of them is still in the block."""
    rel = torch.searchsorted(original, kept).clamp(max=original.shape[1] - 1)
    return rel, (original.gather(1, rel) == kept).all(dim=1)


def _score_gap(dropped: torch.Tensor, kept: torch.Tensor) -> float:
    """How far the best dropped score rises above the worst kept one, relative to their size: relevance scores are
    softmax means that sum to 1 over the N visual rows, so their scale is ~1/N and fp32 rounding is relative to it.
    An absolute gap would call a 4% miss at N = 4096 (1e-5 on a mean score of 2.4e-4) a tie."""
    if not dropped.numel():
        return 0.0
    best, worst = dropped.max(), kept.min()
    return max(0.0, float((best - worst) / torch.maximum(best.abs(), worst.abs()).clamp_min(1e-300)))


def selection_shortfall(scores: torch.Tensor, features: torch.Tensor | None, selected: torch.Tensor,
                        anchors: int = 0) -> torch.Tensor:
    """How far a given selection [B, K] (relative indices) is from one the rule could make on these inputs, [B].

    0 means the rule, breaking ties some way, picks exactly this set; a value at fp32 rounding level (~1e-7) means
    it does so once near-ties are allowed to fall either way, which is all an engine that computes the same inputs
    with other rounding can promise; anything larger means a different selection. Both parts are scale-free:
        top-K (features None):  (best dropped score - worst kept score) / the larger of the two, or 0
        IVR: the A best-scoring kept rows are the anchors (top-A gap as above, against every other row), then
             the fill is replayed greedily over the other kept rows: each step takes the kept row farthest from the
             selection so far, and falls short by (largest min-distance among unselected rows) - (its min-distance).
             Cosine distances of unit vectors lie in [0, 2] whatever N is, and 1 - <f, g> rounds to an absolute
             error (~1e-7 in fp32), so this gap stays absolute.
    """
    out = []
    for b in range(selected.shape[0]):
        s, keep = scores[b].double(), selected[b]
        kept = torch.zeros_like(s, dtype=torch.bool)
        kept[keep] = True
        if features is None:
            out.append(_score_gap(s[~kept], s[kept]))
            continue
        anchor = keep[s[keep].argsort(descending=True, stable=True)[:anchors]]
        chosen = torch.zeros_like(kept)
        chosen[anchor] = True
        gap = _score_gap(s[~chosen], s[chosen]) if anchors else 0.0
        f = features[b].double()
        dist = 1.0 - f @ f.T  # [n, n]
        md = dist[:, anchor].min(dim=1).values if anchors else torch.full_like(s, 2.0)
        for _ in range(keep.numel() - anchors):
            free = kept & ~chosen
            pick = torch.where(free, md, -torch.inf).argmax()
            gap = max(gap, float(md[~chosen].max() - md[pick]))
            chosen[pick] = True
            md = torch.minimum(md, dist[pick])
        out.append(gap)
    return torch.tensor(out, dtype=torch.float64)


# --------------------------------------------------------------------------------------------- ablation baselines
BASELINE_METHODS = ("random", "attention", "ivr")


@dataclass(frozen=True)
class SingleCut:
    """An ablation baseline (eager only): one prune just before layer `layer`, nothing after it.

        random     K visual rows drawn uniformly without replacement (torch.Generator seeded with `seed`)
        attention  the K highest relevance scores at layer-1 (FastV-like: HalfV's own last-token scores, no
                   diversity fill)
        ivr        HalfV's IVR (floor(K * anchor_ratio) anchors + farthest-point fill) without the SSR stage
    K is an absolute count, chosen by the caller (e.g. to match HalfV's prefill FLOPs for one N).
    """

    method: str
    layer: int  # >= 1
    keep: int  # K visual rows kept, 1 <= K <= N
    anchor_ratio: float = 0.1
    seed: int = 0


def select_single_cut(stack, cut: SingleCut, layer_index: int, prev_input: torch.Tensor, hidden: torch.Tensor,
                      start: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
    """The baseline's kept visual rows [B, K] (ascending, relative) just before `layer_index`, or None elsewhere.
    Scores and features are the ones HalfV's IVR uses at the same layer."""
    if layer_index != cut.layer:
        return None
    if cut.method == "random":
        picks = [torch.randperm(n, generator=generator)[:cut.keep] for _ in range(hidden.shape[0])]
        return ascending(torch.stack(picks))
    scores = relevance_scores(stack, stack.layers[layer_index - 1], prev_input, start, n)  # [B, N]
    if cut.method == "attention":
        return top_indices(scores, cut.keep)
    if cut.method == "ivr":
        features = diversity_features(stack.norm, hidden, start, n)
        return ivr_select(scores, features, cut.keep, floor_ratio(cut.keep, cut.anchor_ratio))
    raise ValueError(f"unknown baseline method {cut.method!r}; one of {BASELINE_METHODS}")
