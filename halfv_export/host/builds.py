"""A build folder's host side without torch or transformers: from artifacts.json, config.json,
preprocessor_config.json, tokenizer.json and the chat template it holds, the rows its graphs run (HostArrays) for
images and prompts, the bucket an image falls in, the end-of-sequence ids and the decoded text. One small class per
backbone family; tests/test_host_builds.py holds each equal to the toolchain's adapter (graphs/) on real builds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..base.errors import BadInput
from .clip import ClipImageConfig, anyres_pixels, clip_pixels, select_best_resolution
from .inputs import HostArrays, left_padded, visual_span
from .prompts import tokenized_rows
from .qwen import QwenImageConfig, pixel_patches, rope_positions, smart_resize
from .text import HostTokenizer


class BuildHost:
    """What every family shares: the files, the tokenizer, the image token, the batch checks."""

    placeholder = "<image>"  # the chat template's image slot
    add_special_tokens = True  # the tokenizer's post-processor adds BOS (LLaVA); Qwen's template writes its own

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = Path(folder), meta
        self.config = json.loads((self.folder / "config.json").read_text())
        self.preprocessor = json.loads((self.folder / "preprocessor_config.json").read_text())
        self.tokenizer = HostTokenizer(self.folder)
        self.image_token_id = int(self.config.get("image_token_id", self.config.get("image_token_index")))
        self.buckets = {tuple(b["size"]): b for b in meta["buckets"]}

    def eos_token_ids(self) -> set[int]:
        eos = self.tokenizer.eos_token_id
        return {eos} if eos is not None else set()

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def host_inputs(self, images: list, prompts: list[str]) -> HostArrays:
        if len(images) != len(prompts):
            raise BadInput(f"{len(images)} images for {len(prompts)} prompts; give one image (or none) per prompt")
        has_image = [im is not None for im in images]
        if any(has_image) and not all(has_image):
            raise BadInput("a batch mixes text-only prompts and images; batch them separately")
        pixels, bucket, count, grid = (self.images(images) if all(has_image) else ([], None, 0, None))
        rows = tokenized_rows(self.tokenizer, images, prompts, self.placeholder, count, self.image_token_id,
                              self.add_special_tokens)
        input_ids, attention_mask = left_padded(rows, self.tokenizer.pad_token_id)
        start, n = visual_span(input_ids, self.image_token_id)
        positions = self.positions(input_ids, attention_mask, grid)
        return HostArrays(input_ids=input_ids, attention_mask=attention_mask, positions=positions,
                          visual_start=start, num_visual=n, next_positions=positions.max(axis=2).max(
                              axis=0, keepdims=True).repeat(len(positions), 0) + 1,
                          pixel_values=pixels, bucket=bucket)

    def positions(self, input_ids, attention_mask, grid) -> np.ndarray:
        """[1, B, S]: 1-D RoPE, the real rows counted from 0, padding at 0."""
        return ((attention_mask.cumsum(-1) - 1).clip(min=0))[None].astype(np.int64)

    def one_bucket(self, buckets: list) -> tuple[int, int]:
        if len(set(buckets)) != 1:
            raise BadInput(f"images in one batch fall in different buckets {sorted(set(buckets))}; batch one at a time")
        return buckets[0]


class QwenHost(BuildHost):
    placeholder = "<|image_pad|>"
    add_special_tokens = False

    def __init__(self, folder: Path, meta: dict):
        super().__init__(folder, meta)
        self.image_cfg = QwenImageConfig.from_json(self.preprocessor)
        self.merge = int(self.config["vision_config"]["spatial_merge_size"])

    def bucket_for(self, size: tuple[int, int]) -> tuple[int, int]:
        return smart_resize(size[0], size[1], self.image_cfg.factor, self.image_cfg.min_pixels,
                            self.image_cfg.max_pixels)

    def images(self, images: list):
        patches = [pixel_patches(image, self.image_cfg) for image in images]
        grid = self.one_bucket([g for _, g in patches])
        bucket = (grid[1] * self.image_cfg.patch_size, grid[2] * self.image_cfg.patch_size)
        return [p for p, _ in patches], bucket, grid[1] * grid[2] // self.merge ** 2, grid

    def positions(self, input_ids, attention_mask, grid) -> np.ndarray:
        return rope_positions(input_ids, attention_mask, self.image_token_id, grid, self.merge)[0]


class LlavaHost(BuildHost):
    def __init__(self, folder: Path, meta: dict):
        super().__init__(folder, meta)
        self.image_cfg = ClipImageConfig.from_json(self.preprocessor)
        vision = self.config["vision_config"]
        side = int(vision["image_size"]) // int(vision["patch_size"])
        self.tokens = side * side + (0 if self.config.get("vision_feature_select_strategy", "default") == "default"
                                     else 1)

    def bucket_for(self, size: tuple[int, int]) -> tuple[int, int]:
        return self.image_cfg.crop

    def images(self, images: list):
        bucket = self.image_cfg.crop
        return [clip_pixels(image, self.image_cfg)[None] for image in images], bucket, self.tokens, None


class LlavaNextHost(LlavaHost):
    def bucket_for(self, size: tuple[int, int]) -> tuple[int, int]:
        return select_best_resolution(tuple(size), self.image_cfg.pinpoints)

    def images(self, images: list):
        snapped = []
        for image in images:  # resized to its pinpoint first, as the eager path does (adapter.snap)
            h, w = self.bucket_for((image.height, image.width))
            snapped.append(image if (image.height, image.width) == (h, w) else image.resize((w, h)))
        bucket = self.one_bucket([(im.height, im.width) for im in snapped])
        if bucket not in self.buckets:
            raise BadInput(f"bucket {bucket[0]}x{bucket[1]} was not exported; export it with --image-size")
        return ([anyres_pixels(image, self.image_cfg)[0] for image in snapped], bucket,
                int(self.buckets[bucket]["num_visual"]), None)


FAMILIES = {"qwen2.5-vl": QwenHost, "llava-1.5": LlavaHost, "llava-next": LlavaNextHost}


def host_for(folder: Path, meta: dict | None = None) -> BuildHost:
    """The host side of the build in `folder` (its artifacts.json names the backbone; `meta`: that file, where the
    caller has read it already)."""
    if meta is None:
        meta_path = Path(folder) / "artifacts.json"
        if not meta_path.exists():
            raise BadInput(f"{folder} has no artifacts.json; run `halfv-export export` into it first")
        meta = json.loads(meta_path.read_text())
    family = FAMILIES.get(meta.get("backbone"))
    if family is None:
        raise BadInput(f"{folder}: backbone {meta.get('backbone')!r} has no host side; one of {', '.join(FAMILIES)}")
    return family(folder, meta)
