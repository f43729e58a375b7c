"""Qwen2.5-VL adapter on transformers' Qwen2_5_VLForConditionalGeneration.

Inputs are built the way the Qwen2.5-VL processor builds them, without the processor class (which needs
torchvision in transformers 5 for its video half): chat template -> `<|image_pad|>` expanded to N = t*h*w/merge^2
tokens -> tokenizer, and the PIL Qwen2-VL image processor for pixel patches and the (t, h, w) grid.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..errors import BadInput
from .adapter import BackboneAdapter, LoadedModel, PaperSchedule, PrefillInputs, TextStack, register, visual_span
from .checkpoint import EMBEDDED_ROOT, check_checkpoint_dir, load_chat_template, load_pretrained, seeded_model

IMAGE_PAD = "<|image_pad|>"


@register
class Qwen25VLAdapter(BackboneAdapter):
    name = "qwen2.5-vl"
    model_types = ("qwen2_5_vl",)
    paper = PaperSchedule(
        ivr_layer=2, keep_ratio=0.25, anchor_ratio=0.1, ssr_layer=21, ssr_mode="topk", ssr_ratio=0.05,
        reference_depth=28, reference_model="Qwen2.5-VL-7B-Instruct",
    )
    default_prompt = "Describe this image."
    embedded_dir = EMBEDDED_ROOT / "qwen2_5_vl"

    # ---------------------------------------------------------------- loading
    def load(self, model_dir: Path | None = None, seed: int = 0) -> LoadedModel:
        if model_dir is None:
            config = Qwen2_5_VLConfig.from_pretrained(self.embedded_dir)
            model = seeded_model(Qwen2_5_VLForConditionalGeneration, config, seed)
            source, files_dir = f"embedded:{self.name}:seed={seed}", self.embedded_dir
        else:
            model_dir = Path(model_dir)
            check_checkpoint_dir(model_dir, self.model_types)
            model = load_pretrained(Qwen2_5_VLForConditionalGeneration, model_dir)
            source, files_dir = str(model_dir.resolve()), model_dir
        tokenizer = AutoTokenizer.from_pretrained(str(files_dir), local_files_only=True, trust_remote_code=False)
        load_chat_template(tokenizer, files_dir)
        tokenizer.padding_side = "left"
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(files_dir), local_files_only=True)
        return LoadedModel(model=model, tokenizer=tokenizer, image_processor=image_processor, source=source)

    # ---------------------------------------------------------------- inputs
    def prepare(self, loaded: LoadedModel, images: list, prompts: list[str]) -> PrefillInputs:
        if len(images) != len(prompts):
            raise BadInput(f"{len(images)} images for {len(prompts)} prompts; give one image (or none) per prompt")
        model, cfg, tok = loaded.model, loaded.config, loaded.tokenizer
        has_image = [im is not None for im in images]
        if any(has_image) and not all(has_image):
            raise BadInput("a batch mixes text-only prompts and images; batch them separately")

        merge = cfg.vision_config.spatial_merge_size
        pixel_values = grid_thw = None
        n_per_image = 0
        if all(has_image):
            processed = loaded.image_processor(images=list(images), return_tensors="pt")
            pixel_values, grid_thw = processed["pixel_values"], processed["image_grid_thw"]  # [sum patches, C*T*P*P], [B, 3]
            counts = (grid_thw.prod(-1) // merge**2).tolist()
            if len(set(counts)) != 1 or len({tuple(g) for g in grid_thw.tolist()}) != 1:
                raise BadInput(
                    f"images in one batch resize to different grids {grid_thw.tolist()}; batch one size bucket at a time"
                )
            n_per_image = counts[0]

        texts = []
        for image, prompt in zip(images, prompts):
            content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
            text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
            texts.append(text.replace(IMAGE_PAD, IMAGE_PAD * n_per_image))
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        input_ids, attention_mask = enc["input_ids"], enc["attention_mask"].long()  # [B, S], left-padded

        start, n = visual_span(input_ids, cfg.image_token_id)
        with torch.no_grad():
            embeds = model.model.get_input_embeddings()(input_ids)  # [B, S, D]
            if n > 0:
                feats = model.model.get_image_features(pixel_values, grid_thw, return_dict=True).pooler_output
                feats = torch.stack(list(feats)).to(embeds.dtype)  # [B, N, D]
                rows = (start[:, None] + torch.arange(n)[None, :])[..., None].expand(-1, -1, embeds.shape[-1])
                embeds = embeds.scatter(1, rows, feats)
                mm_types = (input_ids == cfg.image_token_id).int()
                positions, _ = model.model.get_rope_index(
                    input_ids, mm_token_type_ids=mm_types, image_grid_thw=grid_thw, attention_mask=attention_mask
                )  # [3, B, S]
            else:
                text_pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, S]
                positions = text_pos[None].expand(3, -1, -1).clone()
        next_positions = positions.max(dim=2).values.max(dim=0, keepdim=True).values.expand(3, -1) + 1  # [3, B]
        return PrefillInputs(
            input_ids=input_ids, embeds=embeds, attention_mask=attention_mask, positions=positions.long(),
            visual_start=start, num_visual=n, next_positions=next_positions.long().clone(),
        )

    # ---------------------------------------------------------------- model view
    def text_stack(self, loaded: LoadedModel) -> TextStack:
        lm = loaded.model.model.language_model
        tc = loaded.config.text_config
        return TextStack(
            layers=list(lm.layers), norm=lm.norm, lm_head=loaded.model.lm_head, embed_tokens=lm.embed_tokens,
            rotary=lambda x, positions: lm.rotary_emb(x, positions),  # positions [3, B, S] -> cos, sin [B, S, hd]
            num_heads=tc.num_attention_heads, num_kv_heads=tc.num_key_value_heads,
            head_dim=tc.hidden_size // tc.num_attention_heads, vocab_size=tc.vocab_size,
        )
