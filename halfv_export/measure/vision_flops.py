"""Analytic FLOPs of the vision encoder, for time to first token (TTFT = vision + prefill; method §10 / export notes
§10). HalfV prunes inside the LLM and leaves the vision tower untouched, so the end-to-end ratio is

    (vision + LLM full) / (vision + LLM HalfV)     <  the prefill-only ratio  LLM full / LLM HalfV

Same 2mkn convention as flops.py (norms, activations, softmax, RoPE not counted; attention counts QKᵀ and AV).

Qwen2.5-VL (windowed ViT): P = 4N patches of width C (N merged tokens on a rows x cols merged grid, 2x2 merge),
    patch embedding   2 * P * (3*t*p*p) * C
    per block         2 * P * (3C*C + C*C + 3*C*m)                       (qkv, proj, SwiGLU gate/up/down)
    attention         windowed blocks: sum over windows of 4 * len_w^2 * C; full-attention blocks: 4 * P^2 * C
    merger            2 * N * 4C * 4C + 2 * N * 4C * D_llm
  Windows are counted as they run: window_size / patch / merge merged tokens a side (4 for 112 px), border windows
  shorter where the grid does not divide (as transformers' get_vision_window_index cuts them).
CLIP (LLaVA): every layer runs on T = (image/patch)^2 + 1 tokens (the CLS row included), 4 * 2 * T * C^2 (q, k, v,
  o) + 2 * 2 * T * C * m (fc1, fc2) + 4 * T^2 * C, patch embedding 2 * (T-1) * 3p^2 * C, projector
  2 * (T-1) * C * D + 2 * (T-1) * D * D. N visual tokens are ceil(N / (T-1)) tower passes (LLaVA-NeXT's anyres
  tiles; LLaVA-1.5 itself has one pass of 576 tokens).

With a vision cut (graphs/vision_cut.py: keep K = floor(N * keep) tokens after block b) the blocks after b run on
the kept rows: a windowed tower's 4K kept patches in dense windows of the full window length (the last one shorter:
counted at its length, though the graph pads it to a full window), its full-attention blocks over 4K patches, the
merger on K tokens; CLIP's later layers on a pass's share of the K plus the CLS row, and the projector on K. The
score (attention received in block b) is a sum over weights the block already computes, not counted. vision_flops
checks the cut against the tower (check_vision_cut); the per-tower functions take it as given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..base.errors import BadInput
from ..graphs.adapter import ADAPTERS, adapter_for_model_type
from ..graphs.pruning import VisionCut


@dataclass(frozen=True)
class VisionFlops:
    total: int
    blocks: int  # the transformer blocks (attention + MLP), all kinds
    windowed_attention: int  # QKᵀ + AV of the windowed blocks
    full_attention: int  # QKᵀ + AV of the full-attention blocks
    grid: tuple[int, int]  # merged tokens (rows, cols) for a windowed tower; (passes, tokens per pass) for CLIP
    kept: int | None = None  # visual tokens the LLM gets after a vision cut (None: no cut)


def square_grid(n: int) -> tuple[int, int]:
    """The most square rows x cols = n (rows <= cols): the grid an n-token image of aspect ~1 has."""
    rows = int(math.isqrt(n))
    while n % rows:
        rows -= 1
    return rows, n // rows


def window_lengths(rows: int, cols: int, side: int, unit: int) -> list[int]:
    """Patches per window on a rows x cols merged grid cut into side x side windows from the top-left corner."""
    cut = lambda n: [min(side, n - i) for i in range(0, n, side)]  # noqa: E731
    return [a * b * unit for a in cut(rows) for b in cut(cols)]


def windowed_vision_flops(vision: dict, llm_hidden: int, grid: tuple[int, int],
                          cut: VisionCut | None = None) -> VisionFlops:
    c, m, depth = int(vision["hidden_size"]), int(vision["intermediate_size"]), int(vision["depth"])
    merge, patch = int(vision.get("spatial_merge_size", 2)), int(vision.get("patch_size", 14))
    temporal = int(vision.get("temporal_patch_size", 2))
    full_blocks = [i for i in vision.get("fullatt_block_indexes", []) if i < depth]
    n = grid[0] * grid[1]
    unit = merge * merge
    p = n * unit
    side = int(vision.get("window_size", 112)) // patch // merge
    linear = 2 * p * (3 * c * c + c * c + 3 * c * m)
    windowed = sum(4 * length * length * c for length in window_lengths(grid[0], grid[1], side, unit))
    full = 4 * p * p * c
    windowed_total = (depth - len(full_blocks)) * windowed
    full_total = len(full_blocks) * full
    blocks = depth * linear + windowed_total + full_total
    embed = 2 * p * (3 * temporal * patch * patch) * c
    merger = 2 * n * (unit * c) * (unit * c) + 2 * n * (unit * c) * int(vision.get("out_hidden_size", llm_hidden))
    if cut is None:
        return VisionFlops(blocks + embed + merger, blocks, windowed_total, full_total, grid)
    k = cut.tokens(n)
    kept = k * unit
    window = side * side * unit
    before, after = range(cut.block + 1), range(cut.block + 1, depth)
    packed = sum(4 * length * length * c for length in [window] * (kept // window) + [kept % window] if length)
    windowed_total = (sum(windowed for i in before if i not in full_blocks)
                      + sum(packed for i in after if i not in full_blocks))
    full_total = sum(full for i in before if i in full_blocks) + sum(4 * kept * kept * c for i in after
                                                                     if i in full_blocks)
    linear_kept = 2 * kept * (3 * c * c + c * c + 3 * c * m)
    blocks = len(before) * linear + len(after) * linear_kept + windowed_total + full_total
    merger = merger * k // n
    return VisionFlops(blocks + embed + merger, blocks, windowed_total, full_total, grid, kept=k)


def clip_vision_flops(vision: dict, llm_hidden: int, n_visual: int, cut: VisionCut | None = None) -> VisionFlops:
    c, m = int(vision.get("hidden_size", 1024)), int(vision.get("intermediate_size", 4096))
    layers = int(vision.get("num_hidden_layers", 24))
    patch, size = int(vision.get("patch_size", 14)), int(vision.get("image_size", 336))
    per_pass = (size // patch) ** 2
    t = per_pass + 1
    passes = max(1, math.ceil(n_visual / per_pass))
    layer = lambda rows: 4 * 2 * rows * c * c + 2 * 2 * rows * c * m + 4 * rows * rows * c  # noqa: E731
    attention = 4 * t * t * c
    blocks = layers * layer(t)
    embed = 2 * per_pass * 3 * patch * patch * c
    projector = 2 * per_pass * c * llm_hidden + 2 * per_pass * llm_hidden * llm_hidden
    if cut is None:
        return VisionFlops(passes * (blocks + embed + projector), passes * blocks, 0, passes * layers * attention,
                           (passes, t))
    kept = cut.tokens(n_visual)  # what the LLM gets, over all passes
    k = min(per_pass, math.ceil(kept / passes))  # rows a pass carries after the cut (its share of the kept)
    blocks = (cut.block + 1) * layer(t) + (layers - cut.block - 1) * layer(k + 1)
    attention_total = (cut.block + 1) * attention + (layers - cut.block - 1) * 4 * (k + 1) ** 2 * c
    projector = 2 * kept * c * llm_hidden + 2 * kept * llm_hidden * llm_hidden
    return VisionFlops(passes * (blocks + embed) + projector, passes * blocks, 0, passes * attention_total,
                       (passes, t), kept=kept)


def _tower(config: dict) -> tuple[str | None, dict]:
    """(the config's tower kind per its backbone adapter: "windowed", "clip" or None, its vision_config)."""
    vision = config.get("vision_config")
    if not vision:
        raise BadInput("config has no vision_config; --end-to-end needs a vision-language model's config.json")
    adapter = adapter_for_model_type(str(config.get("model_type")))
    return (adapter.vision_tower if adapter is not None else None), vision


def check_vision_cut(config: dict, cut: VisionCut) -> None:
    """One line where the config's tower cannot make `cut` (a windowed tower cuts after a full-attention block)."""
    tower, vision = _tower(config)
    if tower == "windowed":
        depth = int(vision["depth"])
        cut.check(depth, [i for i in vision.get("fullatt_block_indexes", []) if i < depth])
    else:
        cut.check(int(vision.get("num_hidden_layers", 24)))


def bucket_grid(config: dict, bucket: tuple[int, int], n_visual: int | None = None) -> tuple[int, int] | None:
    """The merged-token grid (rows, cols) of an image-size bucket on a windowed tower (what vision_flops counts its
    windows on), or None for a tower without one or where it does not hold n_visual tokens."""
    vision = config.get("vision_config") or {}
    if "spatial_merge_size" not in vision:
        return None
    side = int(vision.get("patch_size", 14)) * int(vision["spatial_merge_size"])  # a merged token's side in pixels
    grid = (bucket[0] // side, bucket[1] // side)
    return grid if n_visual is None or grid[0] * grid[1] == n_visual else None


def vision_flops(config: dict, llm_hidden: int, n_visual: int, grid: tuple[int, int] | None = None,
                 cut: VisionCut | None = None) -> VisionFlops:
    """Vision encoder FLOPs for n_visual LLM-side visual tokens of one image. The backbone adapter of the config's
    model_type says which tower it has (BackboneAdapter.vision_tower); a windowed tower is counted on `grid` merged
    tokens, by default square_grid(n_visual)."""
    tower, vision = _tower(config)
    if cut is not None:
        check_vision_cut(config, cut)
    if n_visual == 0:
        return VisionFlops(0, 0, 0, 0, (0, 0))
    if tower == "windowed":
        return windowed_vision_flops(vision, llm_hidden, grid or square_grid(n_visual), cut)
    if tower == "clip":
        return clip_vision_flops(vision, llm_hidden, n_visual, cut)
    raise BadInput(f"model_type '{config.get('model_type')}' has no vision FLOPs model; --end-to-end counts the "
                   f"towers of the backbones with an adapter: {', '.join(sorted(ADAPTERS))}")
