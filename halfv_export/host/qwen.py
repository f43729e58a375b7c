"""Qwen2.5-VL's host-side inputs in numpy: the image as transformers' Qwen2-VL image processor (PIL backend) makes
it (smart resize, bicubic, rescale, normalise, patches in merge-window order) and the 3-D M-RoPE positions as
`Qwen2_5_VLModel.get_rope_index` computes them for still images. tests/test_host.py holds both to transformers
over many sizes, aspect ratios and paddings."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..base.data import to_rgb

# transformers' defaults where a preprocessor_config.json leaves a field out (Qwen2VLImageProcessorPil)
DEFAULTS = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280, "patch_size": 14, "temporal_patch_size": 2,
            "merge_size": 2, "rescale_factor": 1 / 255, "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3}  # 3: PIL bicubic


@dataclass(frozen=True)
class QwenImageConfig:
    """What preprocessor_config.json says about images (min / max pixels from `size` or the older top-level keys)."""

    min_pixels: int
    max_pixels: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    rescale_factor: float
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    resample: int

    @classmethod
    def from_json(cls, cfg: dict) -> "QwenImageConfig":
        size = cfg.get("size") or {}
        values = {**DEFAULTS, **{k: cfg[k] for k in DEFAULTS if cfg.get(k) is not None}}
        values["min_pixels"] = cfg.get("min_pixels") or size.get("shortest_edge") or DEFAULTS["min_pixels"]
        values["max_pixels"] = cfg.get("max_pixels") or size.get("longest_edge") or DEFAULTS["max_pixels"]
        values["image_mean"], values["image_std"] = tuple(values["image_mean"]), tuple(values["image_std"])
        return cls(**values)

    @property
    def factor(self) -> int:
        """Pixels per merged token side: images are resized to multiples of it."""
        return self.patch_size * self.merge_size


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Both sides multiples of `factor`, the area within [min_pixels, max_pixels], the aspect ratio kept as closely
    as that allows (transformers' qwen2_vl smart_resize, the same arithmetic)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pixel_patches(image: Image.Image, cfg: QwenImageConfig) -> tuple[np.ndarray, tuple[int, int, int]]:
    """An RGB image -> (pixel_values [P, 3 * T * p * p] float32, grid (1, h / p, w / p)). The rows are the patches
    in the order the vision tower reads them: merge windows of merge x merge patches, row-major."""
    image = to_rgb(image)
    h, w = smart_resize(image.height, image.width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    if (h, w) != (image.height, image.width):
        image = image.resize((w, h), resample=cfg.resample)
    array = np.moveaxis(np.asarray(image), -1, 0)  # [3, H, W] uint8
    array = (array.astype(np.float64) * cfg.rescale_factor).astype(np.float32)  # transformers rescales in float64
    mean, std = np.array(cfg.image_mean, dtype=np.float32), np.array(cfg.image_std, dtype=np.float32)
    array = ((array.T - mean) / std).T
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = h // p, w // p
    patches = array.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)  # gh, gw, mh, mw, C, p, p
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))  # a still image: T copies
    return np.ascontiguousarray(patches.reshape(gh * gw, 3 * t * p * p), dtype=np.float32), (1, gh, gw)


def rope_positions(input_ids: np.ndarray, attention_mask: np.ndarray, image_token_id: int,
                   grid: tuple[int, int, int] | None, merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, S] ids (left-padded, at most one image per row, every row's image of `grid`) -> (positions [3, B, S]
    int64, rope deltas [B]). Text rows count 1, 2, 3, ... on all three axes; an image's rows take (t, h, w) of its
    merged grid offset by the text before it, and the text after it resumes at that offset + max(h, w). Padding is
    position 0, as in transformers."""
    batch, seq = input_ids.shape
    positions = np.zeros((3, batch, seq), dtype=np.int64)
    deltas = np.zeros(batch, dtype=np.int64)
    for row in range(batch):
        real = attention_mask[row].astype(bool)
        ids = input_ids[row][real]
        is_image = ids == image_token_id
        rows, start = [], 0
        for kind, length in _runs(is_image):
            if not kind:
                rows.append(np.arange(length)[None].repeat(3, 0) + start)
                start += length
                continue
            if grid is None:
                raise ValueError("image tokens in the prompt but no image grid")
            _, gh, gw = grid[0], grid[1] // merge_size, grid[2] // merge_size
            if length != gh * gw:
                raise ValueError(f"{length} image tokens for a {gh}x{gw} merged grid")
            hh, ww = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
            rows.append(np.stack([np.zeros(gh * gw, dtype=np.int64), hh.ravel(), ww.ravel()]) + start)
            start += max(gh, gw)
        row_positions = np.concatenate(rows, axis=1) if rows else np.zeros((3, 0), dtype=np.int64)
        positions[:, row, real] = row_positions
        deltas[row] = (row_positions.max() + 1 if row_positions.size else 0) - len(ids)
    return positions, deltas


def _runs(flags: np.ndarray):
    """(value, length) of each run of equal values."""
    if flags.size == 0:
        return []
    edges = np.flatnonzero(np.diff(flags.astype(np.int8))) + 1
    bounds = np.concatenate([[0], edges, [flags.size]])
    return [(bool(flags[a]), int(b - a)) for a, b in zip(bounds[:-1], bounds[1:])]
