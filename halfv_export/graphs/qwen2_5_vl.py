"""Qwen2.5-VL adapter on transformers' Qwen2_5_VLForConditionalGeneration.

Inputs are built the way the Qwen2.5-VL processor builds them, without the processor class (which needs
torchvision in transformers 5 for its video half): chat template -> `<|image_pad|>` expanded to N = t*h*w/merge^2
tokens -> tokenizer; pixel patches, the (t, h, w) grid and the M-RoPE positions by the numpy port in host/qwen.py,
which tests/test_host.py holds equal to the PIL Qwen2-VL image processor and the model's get_rope_index.
"""

from __future__ import annotations


import numpy as np
import torch
from torch import nn
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

from ..base.errors import BadInput
from .adapter import (BackboneAdapter, HostInputs, LoadedModel, PaperSchedule, Processing, TextStack, layer_head_dim,
                      grid_boxes, register, visual_span)
from .checkpoint import EMBEDDED_ROOT
from .pruning import VisionCut
from .vision_cut import (check_cut, eager_cut_vision, group_patches, packed_windows, raster_order, select_groups,
                         window_length)
from ..base.kinds import SSRMode
from ..host.qwen import QwenImageConfig, pixel_patches, rope_positions, smart_resize

IMAGE_PAD = "<|image_pad|>"


# Scores one attention call may hold (elements): 2^26 fp32 = 256 MiB. Full-attention blocks over P patches chunk
# their queries so that heads x chunk x P stays under it (P = 16384 at 1792x1792 would be 16 GiB per block unchunked).
SCORE_BUDGET = 1 << 26


def segment_tables(cu: torch.Tensor, patches: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded layout of contiguous segments [cu[w], cu[w+1]) of a P-row sequence (windows, or images).

    Returns gather [W, L] (row of the sequence in slot (w, i); padding slots point at row P, an appended zero row),
    scatter [P] (flat slot w*L + i of each row, to gather the padded layout back) and key_mask [W, 1, 1, L]
    (additive: 0 on real keys, the dtype minimum on padding; every window has a real key, so no row is all -inf)."""
    cu = cu.long()
    lengths = cu[1:] - cu[:-1]  # [W]
    width = int(lengths.max())
    slot = torch.arange(width)
    real = slot[None, :] < lengths[:, None]  # [W, L]
    gather = torch.where(real, cu[:-1, None] + slot[None, :], torch.full_like(real, patches, dtype=torch.long))
    rows = torch.arange(patches)
    window = torch.bucketize(rows, cu[1:], right=True)  # [P]
    scatter = window * width + rows - cu[window]
    key_mask = torch.where(real, 0.0, torch.finfo(torch.float32).min)[:, None, None, :]
    return gather, scatter, key_mask


class QwenVisionBucket(nn.Module):
    """Qwen2.5-VL's vision tower for one (h, w) bucket: pixel patches [P, C*T*p*p] -> merged features [N, D].

    Everything data-dependent in the HF forward (window permutation, cu_seqlens, rotary positions) is computed on
    the host for the bucket's grid and stored as constants. Cost is linear in windows:
      windowed blocks: the P patches (in HF's window order, where each window is a contiguous run) are gathered into
        a padded [W, L, C] layout (L = longest window, 64 patches for 112-px windows; border windows shorter, their
        padding slots read an appended zero row and are masked as keys), attention runs batched over windows
        ([W, heads, L, L] scores), and a second gather puts the rows back in sequence order. A grid whose windows
        all have L patches needs neither gather nor mask: the layout is a reshape.
      full-attention blocks: one image attends to itself with no mask; queries are chunked so that the score tensor
        stays under SCORE_BUDGET elements.
    Several images/frames in one bucket (t > 1) run their full-attention blocks through the segment layout too.

    With a VisionCut (graphs/vision_cut.py) the blocks after `cut.block` run on the K kept merge groups only, the
    windowed ones over the kept patches re-packed into dense windows (a "kept" segment layout, static since K is);
    the graph then returns (features [K, D], raster token indices [K])."""

    def __init__(self, visual: nn.Module, grid_thw: tuple[int, int, int], cut: VisionCut | None = None):
        super().__init__()
        cfg = visual.config
        grid = torch.tensor([grid_thw])
        unit = visual.spatial_merge_size ** 2
        self.visual, self.unit = visual, unit
        positions = get_vision_position_ids(grid, visual.spatial_merge_size, kwargs={})
        window_index, cu_window = get_vision_window_index(grid, visual.spatial_merge_size, visual.window_size,
                                                          visual.patch_size, kwargs={})
        cu_full, _ = get_vision_attention_seqlens(grid, cfg, kwargs={})
        patches = int(grid.prod())
        with torch.no_grad():
            cos, sin = visual.rotary_pos_emb(torch.zeros(patches, 1), positions)
        permute = lambda t: t.reshape(patches // unit, unit, -1)[window_index].reshape(patches, -1)  # noqa: E731
        self.register_buffer("window_index", window_index.long(), persistent=False)
        self.register_buffer("reverse_index", torch.argsort(window_index).long(), persistent=False)
        self.register_buffer("cos", permute(cos).float(), persistent=False)  # [P, hd] window order
        self.register_buffer("sin", permute(sin).float(), persistent=False)
        self.patches = patches
        self.cut, self.kept = cut, None
        tables = [("window", cu_window), ("full", cu_full)]
        if cut is not None:
            check_cut(visual.config, cut, grid_thw)
            self.kept = cut.tokens(patches // unit)
            tables.append(("kept", packed_windows(self.kept * unit, window_length(visual))))
        self.layouts = {}
        for kind, cu in tables:
            rows = int(cu[-1])
            gather, scatter, key_mask = segment_tables(cu, rows)
            num, width = gather.shape
            padded = bool((gather == rows).any())
            if kind == "full" and num == 1:
                self.layouts[kind] = None  # one image: plain attention
                continue
            self.layouts[kind] = (num, width, padded)
            self.register_buffer(f"{kind}_gather", gather.reshape(-1), persistent=False)
            self.register_buffer(f"{kind}_scatter", scatter, persistent=False)
            self.register_buffer(f"{kind}_mask", key_mask, persistent=False)
            if kind == "kept":  # its rotary rows depend on which groups are kept: gathered at run time
                continue
            flat = gather.reshape(-1)
            self.register_buffer(f"{kind}_cos", torch.cat([self.cos, self.cos[:1] * 0])[flat], persistent=False)
            self.register_buffer(f"{kind}_sin", torch.cat([self.sin, self.sin[:1] * 0])[flat], persistent=False)

    def _segment_attention(self, attn, x: torch.Tensor, kind: str, rotary=None) -> torch.Tensor:
        """x [P, C] -> attention output [P, C] over the padded segment layout of `kind`; `rotary` (cos, sin) [P, hd]
        in x's row order where the layout has no stored tables (the kept rows of a cut)."""
        num, width, padded = self.layouts[kind]
        if rotary is None:
            cos, sin = getattr(self, f"{kind}_cos"), getattr(self, f"{kind}_sin")
        elif padded:
            cos, sin = (torch.cat([t, t[:1] * 0])[getattr(self, f"{kind}_gather")] for t in rotary)
        else:
            cos, sin = rotary
        if padded:
            x = torch.cat([x, x.new_zeros(1, x.shape[1])])[getattr(self, f"{kind}_gather")]  # [W*L, C]
        q, k, v = attn.qkv(x).reshape(num * width, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.reshape(num, width, attn.num_heads, -1).transpose(1, 2) for t in (q, k, v))  # [W, H, L, hd]
        weights = (q @ k.transpose(-1, -2)) * attn.scaling  # [W, H, L, L]
        if padded:
            weights = weights + getattr(self, f"{kind}_mask").to(weights.dtype)
        out = (weights.float().softmax(-1).to(v.dtype) @ v).transpose(1, 2).reshape(num * width, -1)
        return out[getattr(self, f"{kind}_scatter")] if padded else out  # [P, C]

    def _full_attention(self, attn, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, received: bool = False):
        """x [P, C] -> attention output [P, C], every patch attending to every patch; queries in chunks. With
        `received`, also [P]: the attention each patch received, mean over heads and queries (the cut's score)."""
        rows = x.shape[0]
        q, k, v = attn.qkv(x).reshape(rows, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [H, P, hd]
        chunk = max(1, SCORE_BUDGET // (attn.num_heads * rows))
        outs, got = [], None
        for lo in range(0, rows, chunk):
            weights = ((q[:, lo:lo + chunk] @ k.transpose(-1, -2)) * attn.scaling).float().softmax(-1)  # [H, c, P]
            if received:
                part = weights.sum(dim=(0, 1))
                got = part if got is None else got + part
            outs.append(weights.to(v.dtype) @ v)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        out = out.transpose(0, 1).reshape(rows, -1)
        return (out, got / (attn.num_heads * rows)) if received else out

    def _patch_embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[P, C*T*p*p] -> [P, C]: the patch embedding's Conv3d, whose kernel is its stride, is one matrix product
        with the kernel flattened in the order the patches are (a GEMM on prepacked weights, where a Conv over 1x1x1
        outputs is not)."""
        embed = self.visual.patch_embed
        weight = embed.proj.weight  # [C, in, T, p, p]
        out = pixel_values.to(weight.dtype) @ weight.reshape(weight.shape[0], -1).t()
        return out if embed.proj.bias is None else out + embed.proj.bias

    def forward(self, pixel_values: torch.Tensor):
        """-> features [N, D]; with a cut, (features [K, D], raster token indices [K])."""
        v = self.visual
        h = self._patch_embed(pixel_values)  # [P, C]
        h = h.reshape(self.patches // self.unit, self.unit, -1)[self.window_index].reshape(self.patches, -1)
        cut, rotary, received, groups = self.cut, None, None, None
        for i, block in enumerate(v.blocks):
            kind = "full" if i in v.fullatt_block_indexes else "window"
            if cut is not None and i == cut.block + 1:  # keep the groups the cut block attended to most
                groups = select_groups(received, self.unit, self.kept, exporting=True)
                rows = group_patches(groups, self.unit)
                h, rotary = h[rows], (self.cos[rows], self.sin[rows])
            x = block.norm1(h)
            if rotary is not None:  # after the cut: the kept rows only
                out = (self._full_attention(block.attn, x, *rotary) if kind == "full" else
                       self._segment_attention(block.attn, x, "kept", rotary))
            elif self.layouts[kind] is None:
                scoring = cut is not None and i == cut.block
                out = self._full_attention(block.attn, x, self.cos, self.sin, received=scoring)
                if scoring:
                    out, received = out
            else:
                out = self._segment_attention(block.attn, x, kind)
            h = h + block.attn.proj(out)
            h = h + block.mlp(block.norm2(h))
        if cut is not None:
            return raster_order(v.merger(h), groups, self.window_index)  # [K, D], [K]
        return v.merger(h)[self.reverse_index]  # [N, D]


@register
class Qwen25VLAdapter(BackboneAdapter):
    name = "qwen2.5-vl"
    model_types = ("qwen2_5_vl",)
    paper = PaperSchedule(
        ivr_layer=2, keep_ratio=0.25, anchor_ratio=0.1, ssr_layer=21, ssr_mode=SSRMode.TOPK, ssr_ratio=0.05,
        reference_depth=28, reference_model="Qwen2.5-VL-7B-Instruct",
    )
    model_class = Qwen2_5_VLForConditionalGeneration
    config_class = Qwen2_5_VLConfig
    image_processor_class = Qwen2VLImageProcessorPil
    vision_tower = "windowed"
    embedded_dir = EMBEDDED_ROOT / "qwen2_5_vl"

    # ---------------------------------------------------------------- inputs
    def bucket_for(self, processing: Processing, image_size: tuple[int, int]) -> tuple[tuple[int, int], int]:
        ip = processing.image_processor
        factor = ip.patch_size * ip.merge_size
        h, w = smart_resize(image_size[0], image_size[1], factor, ip.size.shortest_edge, ip.size.longest_edge)
        return (h, w), (h // factor) * (w // factor)

    def token_boxes(self, processing: Processing, bucket: tuple[int, int]) -> list[tuple[int, int, int, int]]:
        factor = processing.image_processor.patch_size * processing.image_processor.merge_size  # one merged token
        return grid_boxes(bucket, bucket[0] // factor, bucket[1] // factor)

    def host_inputs(self, processing: Processing, images: list, prompts: list[str]) -> HostInputs:
        if len(images) != len(prompts):
            raise BadInput(f"{len(images)} images for {len(prompts)} prompts; give one image (or none) per prompt")
        cfg, tok = processing.config, processing.tokenizer
        has_image = [im is not None for im in images]
        if any(has_image) and not all(has_image):
            raise BadInput("a batch mixes text-only prompts and images; batch them separately")

        merge = cfg.vision_config.spatial_merge_size
        pixel_values, grid, n_per_image, bucket = [], None, 0, None
        if all(has_image):  # the numpy processor a deployment host runs (host/qwen.py), not transformers'
            image_cfg = QwenImageConfig.from_json(processing.image_processor.to_dict())
            patches = [pixel_patches(image, image_cfg) for image in images]
            grids = sorted({g for _, g in patches})
            if len(grids) != 1:
                raise BadInput(f"images in one batch resize to different grids {[list(g) for g in grids]}; batch "
                               "one size bucket at a time")
            grid = grids[0]
            n_per_image = grid[1] * grid[2] // merge**2
            pixel_values = [torch.from_numpy(p) for p, _ in patches]  # per image [P, C*T*p*p]
            bucket = (grid[1] * image_cfg.patch_size, grid[2] * image_cfg.patch_size)

        input_ids, attention_mask = self.tokenize_prompts(tok, images, prompts, IMAGE_PAD, n_per_image,
                                                            cfg.image_token_id, False)

        start, n = visual_span(input_ids, cfg.image_token_id)
        positions, _ = rope_positions(input_ids.numpy(), attention_mask.numpy(), cfg.image_token_id, grid, merge)
        positions = torch.from_numpy(positions)  # [3, B, S]
        next_positions = positions.max(dim=2).values.max(dim=0, keepdim=True).values.expand(3, -1) + 1  # [3, B]
        return HostInputs(input_ids=input_ids, attention_mask=attention_mask, positions=positions.long(),
                          visual_start=start, num_visual=n, next_positions=next_positions.long().clone(),
                          pixel_values=pixel_values, bucket=bucket)

    def fit_config(self, cfg: dict) -> None:
        """The merger must emit the LLM's width; M-RoPE sections (t, h, w) must sum to head_dim / 2 (Qwen's 2:3:3)."""
        text = cfg["text_config"]
        cfg["vision_config"]["out_hidden_size"] = text["hidden_size"]
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        t = head_dim // 8
        h = (head_dim // 2 - t) // 2
        rope = dict(text.get("rope_parameters") or {"rope_type": "default", "rope_theta": 1e6})
        rope["mrope_section"] = [t, h, head_dim // 2 - t - h]
        text["rope_parameters"] = rope

    def prompt_positions(self, config, before: int, grid: tuple[int, int], after: int) -> torch.Tensor:
        """M-RoPE positions as the model computes them for an image of grid (rows, cols) merged tokens."""
        n = grid[0] * grid[1]
        merge = config.vision_config.spatial_merge_size
        ids = torch.cat([torch.zeros(before, dtype=torch.long), torch.full((n,), config.image_token_id),
                         torch.zeros(after, dtype=torch.long)])[None]
        positions, _ = rope_positions(ids.numpy(), np.ones(ids.shape, dtype=np.int64), config.image_token_id,
                                      (1, merge * grid[0], merge * grid[1]), merge)
        return torch.from_numpy(positions)  # [3, 1, S]

    def _grid(self, image_processor, bucket: tuple[int, int]) -> tuple[int, int, int]:
        return (1, bucket[0] // image_processor.patch_size, bucket[1] // image_processor.patch_size)

    def eager_vision(self, loaded: LoadedModel, pixel_values: torch.Tensor, bucket: tuple[int, int]) -> torch.Tensor:
        grid = torch.tensor([self._grid(loaded.image_processor, bucket)])
        return loaded.model.model.get_image_features(pixel_values, grid, return_dict=True).pooler_output[0]

    def eager_vision_cut(self, loaded: LoadedModel, pixel_values: torch.Tensor, bucket: tuple[int, int], cut,
                         force: torch.Tensor | None = None):
        grid = self._grid(loaded.image_processor, bucket)
        return eager_cut_vision(loaded.model.model.visual, pixel_values, grid, cut, force)

    def tower_blocks(self, loaded: LoadedModel) -> tuple[list, list[int]]:
        visual = loaded.model.model.visual
        return list(visual.blocks), VisionCut.blocks(len(visual.blocks), list(visual.fullatt_block_indexes))

    def check_vision_cut(self, config, cut) -> None:
        check_cut(config.vision_config, cut)

    def vision_batch(self, loaded: LoadedModel, pixel_values: list, bucket: tuple[int, int]) -> torch.Tensor:
        grid = torch.tensor([self._grid(loaded.image_processor, bucket)] * len(pixel_values), device=pixel_values[0].device)
        feats = loaded.model.model.get_image_features(torch.cat(pixel_values), grid, return_dict=True).pooler_output
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats  # [B * N, D]
        return feats.reshape(len(pixel_values), -1, feats.shape[-1])

    def vision_graph(self, loaded: LoadedModel, bucket: tuple[int, int], cut=None) -> nn.Module:
        return QwenVisionBucket(loaded.model.model.visual, self._grid(loaded.image_processor, bucket), cut).eval()

    # ---------------------------------------------------------------- model view
    def text_stack(self, loaded: LoadedModel) -> TextStack:
        lm = loaded.model.model.language_model
        tc = loaded.config.text_config
        return TextStack(
            layers=list(lm.layers), norm=lm.norm, lm_head=loaded.model.lm_head, embed_tokens=lm.embed_tokens,
            rotary_emb=lm.rotary_emb, mrope=True,
            num_heads=tc.num_attention_heads, num_kv_heads=tc.num_key_value_heads,
            head_dim=layer_head_dim(lm.layers, tc), vocab_size=tc.vocab_size,
        )
