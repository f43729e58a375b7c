"""Cutting visual tokens inside Qwen2.5-VL's vision tower (beyond the paper, which prunes inside the LLM only).

After an early full-attention block `block`, every future visual token (a 2x2 merge group of patches) is scored by
the attention its patches received in that block (mean over heads and queries: the tower's own "who is looked
at"), the top K groups are kept, and the remaining blocks, the merger and the LLM run on them alone:

    blocks 0..block       all P patches, as the uncut tower
    select                K = floor(N * keep) groups, ties to the lower index, ascending in window order
    windowed blocks       the kept patches re-packed, in window order, into dense windows of the tower's window
                          length (64 patches for 112-px windows); the last one shorter where 4K does not divide.
                          Cost stays linear, and a packed window holds neighbours of the original windows.
    full-attention blocks the 4K kept patches attend to each other
    merger                K features, returned in raster order with their raster indices (the LLM's 3-D rotary
                          positions are the kept tokens' original (t, h, w))

Both the exported graph (qwen2_5_vl.QwenVisionBucket) and the eager reference below select through `select_groups`.
Their scores agree to rounding (the eager reference runs transformers' own blocks, varlen attention over cu_seqlens,
the graph its padded window layout), so they keep the same tokens except where two groups' scores tie to rounding
level at the K-th place, as with the IVR cut.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

from ..base.errors import BadInput
from .pruning import VisionCut, selection_shortfall, top_indices


def check_cut(vision_config, cut: VisionCut, grid_thw: tuple[int, int, int] | None = None) -> None:
    """One line for a cut this tower (and bucket, where given) cannot make: the graph, the eager reference and the
    adapter's early check (no bucket yet) all ask here."""
    if grid_thw is not None and grid_thw[0] != 1:
        raise BadInput("a vision cut needs one image per bucket (t = 1); drop the cut for video frames")
    cut.check(vision_config.depth, list(vision_config.fullatt_block_indexes))


def packed_windows(patches: int, window: int) -> torch.Tensor:
    """cu_seqlens of `patches` kept rows packed into windows of `window` rows: [0, w, 2w, ..., patches]."""
    cu = list(range(0, patches, window)) + [patches]
    return torch.tensor(cu, dtype=torch.int32)


def window_length(visual) -> int:
    """Patches in one full window of the tower (112-px windows, 14-px patches: 8 x 8 = 64)."""
    side = visual.window_size // visual.patch_size
    return side * side


def select_groups(received: torch.Tensor, unit: int, k: int, exporting: bool = False) -> torch.Tensor:
    """received [P] (attention each patch received, window order) -> the k merge groups (window order) whose patches
    received the most, ascending. The one selection the graph and the eager reference share."""
    groups = received.reshape(-1, unit).sum(-1)  # [N]
    return top_indices(groups[None], k, exporting)[0]


def group_patches(groups: torch.Tensor, unit: int) -> torch.Tensor:
    """[K] merge groups -> [K * unit] their patch rows (a group's patches are consecutive in window order)."""
    return (groups[:, None] * unit + torch.arange(unit, device=groups.device)[None, :]).reshape(-1)


def raster_order(merged: torch.Tensor, groups: torch.Tensor, window_index: torch.Tensor):
    """Kept features [K, D] in window order -> (features in raster order, their raster token indices [K]). TopK with
    largest=False sorts the (distinct) raster indices: ONNX has no Sort op."""
    raster = window_index[groups]
    values, order = torch.topk(raster, raster.shape[0], largest=False, sorted=True)
    return merged[order], values


def received_attention(attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """Eager: x [P, C] (the block's normed input) -> [P] attention each patch received in the block, mean over
    heads and queries; `rows` queries at a time, so that the reference holds heads x rows x P scores, not the whole
    P x P matrix (4 GiB at 896x896 with 16 heads)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    q, k, _ = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    total = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    for lo in range(0, x.shape[0], rows):
        weights = torch.einsum("qhd,khd->hqk", q[lo:lo + rows], k) * attn.scaling
        total += weights.float().softmax(-1).sum(dim=(0, 1))
    return total / (attn.num_heads * x.shape[0])


class CutVision(NamedTuple):
    features: torch.Tensor  # [K, D], raster order
    tokens: torch.Tensor  # [K] raster indices of the kept tokens, ascending
    shortfall: float  # 0 unless forced: how far the forced set is from one the rule could pick (selection_shortfall)


@torch.no_grad()
def eager_cut_vision(visual, pixel_values: torch.Tensor, grid_thw: tuple[int, int, int], cut: VisionCut,
                     force: torch.Tensor | None = None) -> CutVision:
    """transformers' tower forward (Qwen2_5_VisionTransformerPretrainedModel.forward) with the cut after
    `cut.block`. `force` [K] (raster indices, e.g. what an engine kept where a near-tie fell the other way): keep
    those tokens instead, and report how far they are from a set the rule could pick, as validate's parity does for
    IVR / SSR."""
    check_cut(visual.config, cut, grid_thw)
    grid = torch.tensor([grid_thw])
    unit = visual.spatial_merge_unit
    position_ids = get_vision_position_ids(grid, visual.spatial_merge_size, kwargs={})
    cu_full, _ = get_vision_attention_seqlens(grid, visual.config, kwargs={})
    window_index, cu_window = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                                      window_size=visual.window_size, patch_size=visual.patch_size,
                                                      kwargs={})
    h = visual.patch_embed(pixel_values)
    seq = h.shape[0]
    h = visual.permute_input_for_window_attn(h, window_index, seq_len=seq)
    cos, sin = (visual.permute_input_for_window_attn(t, window_index, seq_len=seq)
                for t in visual.rotary_pos_emb(h, position_ids))
    shortfall = 0.0
    for i, block in enumerate(visual.blocks):
        full = i in visual.fullatt_block_indexes
        if i == cut.block + 1:  # the cut: keep the groups the cut block attended to most, re-pack their windows
            groups = select_groups(received, unit, cut.tokens(seq // unit))
            if force is not None:
                window_of = torch.argsort(window_index)  # raster token -> its place in window order
                groups = torch.sort(window_of[force.to(window_of.device)]).values
                shortfall = float(selection_shortfall(received.reshape(-1, unit).sum(-1)[None], None, groups[None])[0])
            rows = group_patches(groups, unit)
            h, cos, sin = h[rows], cos[rows], sin[rows]
            cu_full = torch.tensor([0, rows.shape[0]], dtype=torch.int32)
            cu_window = packed_windows(rows.shape[0], window_length(visual))
        if i == cut.block:
            received = received_attention(block.attn, block.norm1(h), cos, sin)
        h = block(h, cu_seqlens=cu_full if full else cu_window, position_embeddings=(cos, sin))
    return CutVision(*raster_order(visual.merger(h), groups, window_index.to(groups.device)), shortfall)
