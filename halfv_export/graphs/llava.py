"""LLaVA-family adapters: LLaVA-1.5 (CLIP + Llama/Vicuna) and LLaVA-NeXT (CLIP + Mistral, anyres).

Both read the CLIP tower at `vision_feature_layer` (-2), drop CLS ("default" strategy) and project into the LLM.
LLaVA-1.5 has one image size (the processor's crop), so one bucket. LLaVA-NeXT tiles an image on the anyres grid
pinpoint that fits it best, then unpads and inserts an image-newline row per feature row; N therefore depends on
the image size. halfv-export makes N static per grid: each image is resized to its pinpoint before tiling, so
unpadding removes nothing and every image of a grid has the same N (transformers would pad instead and give each
aspect ratio its own N). The unpad + newline layout of a grid is traced once on the host by running transformers'
own `pack_image_features` on index-coded features, and baked into the vision graph as one gather.
"""

from __future__ import annotations

import types

import numpy as np
import torch
from torch import nn
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

from ..base.errors import BadInput
from .adapter import (BackboneAdapter, HostInputs, LoadedModel, PaperSchedule, Processing, TextStack, layer_head_dim,
                      grid_boxes, register, visual_span)
from .checkpoint import EMBEDDED_ROOT
from ..base.kinds import SSRMode
from ..host.clip import ClipImageConfig, anyres_pixels, clip_pixels, select_best_resolution

IMAGE_TOKEN = "<image>"


class ClipProjectorVision(nn.Module):
    """CLIP tower at one hidden layer -> drop CLS -> projector -> [tiles * tokens, D], then (anyres) one gather that
    applies the grid's unpad + image-newline layout: index value == tiles * tokens selects the newline row."""

    def __init__(self, model: nn.Module, feature_layer: int, drop_cls: bool, layout: torch.Tensor | None):
        super().__init__()
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.newline = getattr(model.model, "image_newline", None)
        self.feature_layer, self.drop_cls = feature_layer, drop_cls
        self.register_buffer("layout", layout, persistent=False) if layout is not None else setattr(self, "layout", None)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states[self.feature_layer]  # [T, 1+t, C]
        if self.drop_cls:
            hidden = hidden[:, 1:]
        feats = self.projector(hidden)
        feats = feats.reshape(-1, feats.shape[-1])  # [T*t, D]
        if self.layout is None:
            return feats
        return torch.cat([feats, self.newline[None].to(feats.dtype)], dim=0)[self.layout]  # [N, D]


class LlavaFamilyAdapter(BackboneAdapter):
    add_bos = True
    vision_tower = "clip"

    # ---------------------------------------------------------------- buckets
    def tokens_per_tile(self, config) -> int:
        side = config.vision_config.image_size // config.vision_config.patch_size
        return side * side + (0 if config.vision_feature_select_strategy == "default" else 1)

    def feature_layer(self, config) -> int:
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise BadInput(f"vision_feature_layer={layer} (several layers) is not supported; use a single layer")
        return layer

    def image_pixels(self, image, image_cfg: ClipImageConfig) -> np.ndarray:
        """[1, 3, crop, crop]: one CLIP view."""
        return clip_pixels(image, image_cfg)[None]

    def snap(self, processing: Processing, image):
        """The image as the processor will see it (LLaVA-NeXT: resized to its pinpoint)."""
        return image

    # ---------------------------------------------------------------- inputs
    def host_inputs(self, processing: Processing, images: list, prompts: list[str]) -> HostInputs:
        if len(images) != len(prompts):
            raise BadInput(f"{len(images)} images for {len(prompts)} prompts; give one image (or none) per prompt")
        has_image = [im is not None for im in images]
        if any(has_image) and not all(has_image):
            raise BadInput("a batch mixes text-only prompts and images; batch them separately")
        cfg, tok = processing.config, processing.tokenizer
        pixel_values, bucket, n_per_image = [], None, 0
        if all(has_image):
            images = [self.snap(processing, im) for im in images]
            buckets = {self.bucket_for(processing, (im.height, im.width)) for im in images}
            if len(buckets) != 1:
                raise BadInput(f"images in one batch fall in different buckets {sorted(buckets)}; batch one at a time")
            bucket, n_per_image = buckets.pop()
            # the numpy processors a deployment host runs (host/clip.py), not transformers'
            image_cfg = ClipImageConfig.from_json(processing.image_processor.to_dict())
            pixel_values = [torch.from_numpy(self.image_pixels(im, image_cfg)) for im in images]  # each [T, 3, h, w]
        input_ids, attention_mask = self.tokenize_prompts(tok, images, prompts, IMAGE_TOKEN, n_per_image,
                                                            cfg.image_token_id, self.add_bos)
        start, n = visual_span(input_ids, cfg.image_token_id)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[None]  # [1, B, S] 1-D RoPE
        return HostInputs(input_ids=input_ids, attention_mask=attention_mask, positions=positions, visual_start=start,
                          num_visual=n, next_positions=positions.max(dim=2).values + 1, pixel_values=pixel_values,
                          bucket=bucket)

    # ---------------------------------------------------------------- model view
    def text_stack(self, loaded: LoadedModel) -> TextStack:
        lm = loaded.model.model.language_model
        tc = loaded.config.text_config
        return TextStack(
            layers=list(lm.layers), norm=lm.norm, lm_head=loaded.model.lm_head, embed_tokens=lm.embed_tokens,
            rotary_emb=lm.rotary_emb, mrope=False, num_heads=tc.num_attention_heads,
            num_kv_heads=tc.num_key_value_heads,
            head_dim=layer_head_dim(lm.layers, tc),
            vocab_size=tc.vocab_size,
        )

    def vision_graph(self, loaded: LoadedModel, bucket: tuple[int, int], cut=None) -> nn.Module:
        if cut is not None:
            self.check_vision_cut(loaded.config, cut)  # the base refusal, one line
        cfg = loaded.config
        return ClipProjectorVision(loaded.model, self.feature_layer(cfg), cfg.vision_feature_select_strategy == "default",
                                   self.layout(cfg, bucket)).eval()

    def layout(self, config, bucket: tuple[int, int]) -> torch.Tensor | None:
        return None


@register
class Llava15Adapter(LlavaFamilyAdapter):
    name = "llava-1.5"
    model_types = ("llava",)
    paper = PaperSchedule(ivr_layer=3, keep_ratio=0.5, anchor_ratio=0.2, ssr_layer=15, ssr_mode=SSRMode.FREEZE,
                          ssr_ratio=None, reference_depth=32, reference_model="LLaVA-1.5-7B")
    model_class = LlavaForConditionalGeneration
    config_class = LlavaConfig
    image_processor_class = CLIPImageProcessorPil
    embedded_dir = EMBEDDED_ROOT / "llava_1_5"

    def bucket_for(self, processing: Processing, image_size: tuple[int, int]) -> tuple[tuple[int, int], int]:
        crop = processing.image_processor.crop_size
        return (crop.height, crop.width), self.tokens_per_tile(processing.config)

    def token_boxes(self, processing: Processing, bucket: tuple[int, int]) -> list[tuple[int, int, int, int]] | None:
        vc = processing.config.vision_config
        if processing.config.vision_feature_select_strategy != "default":
            return None  # the CLS row keeps no place on the image
        side = vc.image_size // vc.patch_size  # one CLIP patch
        return grid_boxes(bucket, side, side)

    def eager_vision(self, loaded: LoadedModel, pixel_values: torch.Tensor, bucket: tuple[int, int]) -> torch.Tensor:
        cfg = loaded.config
        out = loaded.model.model.get_image_features(pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                                                    vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                                    return_dict=True)
        return out.pooler_output[0]

    def vision_batch(self, loaded: LoadedModel, pixel_values: list, bucket: tuple[int, int]) -> torch.Tensor:
        cfg = loaded.config
        out = loaded.model.model.get_image_features(torch.cat(pixel_values), vision_feature_layer=cfg.vision_feature_layer,
                                                    vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                                    return_dict=True)
        feats = out.pooler_output
        return torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats


@register
class LlavaNextAdapter(LlavaFamilyAdapter):
    name = "llava-next"
    model_types = ("llava_next",)
    paper = PaperSchedule(ivr_layer=2, keep_ratio=0.5, anchor_ratio=0.1, ssr_layer=16, ssr_mode=SSRMode.FREEZE,
                          ssr_ratio=None, reference_depth=32, reference_model="LLaVA-NeXT-7B (Mistral)")
    model_class = LlavaNextForConditionalGeneration
    config_class = LlavaNextConfig
    image_processor_class = LlavaNextImageProcessorPil
    embedded_dir = EMBEDDED_ROOT / "llava_next"

    def image_pixels(self, image, image_cfg: ClipImageConfig) -> np.ndarray:
        """[1 + tiles, 3, crop, crop]: the base view, then the pinpoint's tiles."""
        return anyres_pixels(image, image_cfg)[0]

    def pinpoint(self, config, image_size: tuple[int, int]) -> tuple[int, int]:
        h, w = select_best_resolution(tuple(image_size), [tuple(p) for p in config.image_grid_pinpoints])
        return int(h), int(w)

    def snap(self, processing: Processing, image):
        h, w = self.pinpoint(processing.config, (image.height, image.width))
        return image if (image.height, image.width) == (h, w) else image.resize((w, h))

    def layout(self, config, bucket: tuple[int, int]) -> torch.Tensor:
        """The grid's token order: indices into [tile features (tiles * tokens rows); newline row] -> [N]."""
        if config.vision_feature_select_strategy != "default":
            raise BadInput("LLaVA-NeXT with vision_feature_select_strategy='full' is not supported")
        tokens = self.tokens_per_tile(config)
        tiles = image_size_to_num_patches(list(bucket), config.image_grid_pinpoints, config.vision_config.image_size)
        codes = torch.arange(tiles * tokens, dtype=torch.float64).reshape(tiles, tokens, 1)
        owner = types.SimpleNamespace(config=config)
        packed, _ = LlavaNextModel.pack_image_features(owner, [codes], torch.tensor([list(bucket)]), "default",
                                                       image_newline=torch.tensor([-1.0], dtype=torch.float64))
        order = packed[0][:, 0].long()
        return torch.where(order < 0, tiles * tokens, order)

    def bucket_for(self, processing: Processing, image_size: tuple[int, int]) -> tuple[tuple[int, int], int]:
        bucket = self.pinpoint(processing.config, image_size)
        return bucket, int(self.layout(processing.config, bucket).numel())

    def eager_vision(self, loaded: LoadedModel, pixel_values: torch.Tensor, bucket: tuple[int, int]) -> torch.Tensor:
        cfg = loaded.config
        out = loaded.model.model.get_image_features(pixel_values[None], torch.tensor([list(bucket)], device=pixel_values.device),
                                                    vision_feature_layer=cfg.vision_feature_layer,
                                                    vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                                    return_dict=True)
        return out.pooler_output[0]
