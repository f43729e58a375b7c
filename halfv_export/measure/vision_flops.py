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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..base.errors import BadInput
from ..graphs.adapter import ADAPTERS, adapter_for_model_type


@dataclass(frozen=True)
class VisionFlops:
    total: int
    blocks: int  # the transformer blocks (attention + MLP), all kinds
    windowed_attention: int  # QKᵀ + AV of the windowed blocks
    full_attention: int  # QKᵀ + AV of the full-attention blocks
    grid: tuple[int, int]  # merged tokens (rows, cols) for a windowed tower; (passes, tokens per pass) for CLIP


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


def windowed_vision_flops(vision: dict, llm_hidden: int, grid: tuple[int, int]) -> VisionFlops:
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
    return VisionFlops(blocks + embed + merger, blocks, windowed_total, full_total, grid)


def clip_vision_flops(vision: dict, llm_hidden: int, n_visual: int) -> VisionFlops:
    c, m = int(vision.get("hidden_size", 1024)), int(vision.get("intermediate_size", 4096))
    layers = int(vision.get("num_hidden_layers", 24))
    patch, size = int(vision.get("patch_size", 14)), int(vision.get("image_size", 336))
    per_pass = (size // patch) ** 2
    t = per_pass + 1
    passes = max(1, math.ceil(n_visual / per_pass))
    attention = 4 * t * t * c
    blocks = layers * (4 * 2 * t * c * c + 2 * 2 * t * c * m + attention)
    embed = 2 * per_pass * 3 * patch * patch * c
    projector = 2 * per_pass * c * llm_hidden + 2 * per_pass * llm_hidden * llm_hidden
    return VisionFlops(passes * (blocks + embed + projector), passes * blocks, 0, passes * layers * attention,
                       (passes, t))


def vision_flops(config: dict, llm_hidden: int, n_visual: int, grid: tuple[int, int] | None = None) -> VisionFlops:
    """Vision encoder FLOPs for n_visual LLM-side visual tokens of one image. The backbone adapter of the config's
    model_type says which tower it has (BackboneAdapter.vision_tower); a windowed tower is counted on `grid` merged
    tokens, by default square_grid(n_visual)."""
    vision = config.get("vision_config")
    if not vision:
        raise BadInput("config has no vision_config; --end-to-end needs a vision-language model's config.json")
    if n_visual == 0:
        return VisionFlops(0, 0, 0, 0, (0, 0))
    adapter = adapter_for_model_type(str(config.get("model_type")))
    tower = adapter.vision_tower if adapter is not None else None
    if tower == "windowed":
        return windowed_vision_flops(vision, llm_hidden, grid or square_grid(n_visual))
    if tower == "clip":
        return clip_vision_flops(vision, llm_hidden, n_visual)
    raise BadInput(f"model_type '{config.get('model_type')}' has no vision FLOPs model; --end-to-end counts the "
                   f"towers of the backbones with an adapter: {', '.join(sorted(ADAPTERS))}")
