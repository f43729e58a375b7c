"""LLaVA's host-side images in numpy: the CLIP pipeline (shortest-edge bicubic resize, centre crop, rescale,
normalise) of transformers' CLIP image processor, and LLaVA-NeXT's anyres tiling (the best grid pinpoint, an
aspect-keeping resize, centred zero padding, tiles of the crop size behind a base view of the whole image) of its
LLaVA-NeXT image processor, both PIL backends. tests/test_host.py holds them equal to transformers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..base.data import to_rgb

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipImageConfig:
    """What preprocessor_config.json says about images (CLIPImageProcessor, LlavaNextImageProcessor)."""

    shortest_edge: int
    crop: tuple[int, int]  # (height, width)
    resample: int
    rescale_factor: float
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    pinpoints: tuple[tuple[int, int], ...] = ()  # LLaVA-NeXT's (height, width) grid resolutions

    @classmethod
    def from_json(cls, cfg: dict) -> "ClipImageConfig":
        size, crop = cfg.get("size") or {"shortest_edge": 224}, cfg.get("crop_size") or {"height": 224, "width": 224}
        if "shortest_edge" not in size:
            raise ValueError(f"size {size}: only a shortest_edge resize is supported")
        return cls(shortest_edge=int(size["shortest_edge"]), crop=(int(crop["height"]), int(crop["width"])),
                   resample=int(cfg.get("resample", 3)), rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
                   image_mean=tuple(cfg.get("image_mean") or CLIP_MEAN), image_std=tuple(cfg.get("image_std") or CLIP_STD),
                   pinpoints=tuple(tuple(p) for p in cfg.get("image_grid_pinpoints") or ()))


def shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """The shorter side becomes `shortest`, the longer one int(shortest * long / short) (truncated, as transformers)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest * long / short)
    return (new_long, shortest) if width <= height else (shortest, new_long)


def _resize(array: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """[3, H, W] uint8 -> [3, h, w] uint8 through PIL (the same size is returned as is, as PIL does)."""
    if array.shape[1:] == tuple(size):
        return array
    image = Image.fromarray(np.moveaxis(array, 0, -1)).resize((size[1], size[0]), resample=resample)
    return np.moveaxis(np.asarray(image), -1, 0)


def center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """[C, H, W] -> [C, height, width] from the centre; an image smaller than the crop is zero-padded around it
    first (transformers' center_crop)."""
    h, w = array.shape[1:]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0 and top + height <= h and left + width <= w:
        return array[:, top:top + height, left:left + width]
    new_h, new_w = max(height, h), max(width, w)
    padded = np.zeros((array.shape[0], new_h, new_w), dtype=array.dtype)
    top_pad, left_pad = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded[:, top_pad:top_pad + h, left_pad:left_pad + w] = array
    top, left = top + top_pad, left + left_pad
    return padded[:, max(0, top):min(new_h, top + height), max(0, left):min(new_w, left + width)]


def _normalised(array: np.ndarray, cfg: ClipImageConfig) -> np.ndarray:
    """uint8 [3, h, w] -> float32, rescaled in float64 then normalised in float32 (transformers' order and dtypes)."""
    array = (array.astype(np.float64) * cfg.rescale_factor).astype(np.float32)
    mean, std = np.array(cfg.image_mean, dtype=np.float32), np.array(cfg.image_std, dtype=np.float32)
    return ((array.T - mean) / std).T


def _view(array: np.ndarray, cfg: ClipImageConfig) -> np.ndarray:
    """One CLIP view: shortest-edge resize, centre crop, rescale, normalise -> [3, crop h, crop w] float32."""
    array = _resize(array, shortest_edge_size(*array.shape[1:], cfg.shortest_edge), cfg.resample)
    return _normalised(center_crop(array, *cfg.crop), cfg)


def _rgb(image: Image.Image) -> np.ndarray:
    return np.moveaxis(np.asarray(to_rgb(image)), -1, 0)


def clip_pixels(image: Image.Image, cfg: ClipImageConfig) -> np.ndarray:
    """An image -> [3, crop h, crop w] float32, as LLaVA-1.5's CLIP image processor makes it."""
    return _view(_rgb(image), cfg)


def select_best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """The pinpoint (height, width) that keeps the most of the image's resolution, then wastes the least."""
    height, width = size
    best, best_effective, best_wasted = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = ph * pw - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (ph, pw), effective, wasted
    return best


def anyres_pixels(image: Image.Image, cfg: ClipImageConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """An image -> ([1 + tiles, 3, crop, crop] float32, its (height, width)): the whole image squashed to the tile
    size first, then the tiles of the best pinpoint row-major, each a CLIP view (LLaVA-NeXT's image processor)."""
    array = _rgb(image)
    h, w = array.shape[1:]
    target_h, target_w = select_best_resolution((h, w), cfg.pinpoints)
    scale_w, scale_h = target_w / w, target_h / h  # scale first, then multiply: the same float rounding as transformers
    if scale_w < scale_h:
        new_h, new_w = min(math.ceil(h * scale_w), target_h), target_w
    else:
        new_h, new_w = target_h, min(math.ceil(w * scale_h), target_w)
    resized = _resize(array, (new_h, new_w), cfg.resample)
    top, left = (target_h - new_h) // 2, (target_w - new_w) // 2
    padded = np.zeros((3, target_h, target_w), dtype=np.uint8)
    padded[:, top:top + new_h, left:left + new_w] = resized
    tile = cfg.crop[0]
    tiles = [padded[:, i:i + tile, j:j + tile] for i in range(0, target_h, tile) for j in range(0, target_w, tile)]
    base = _resize(array, (cfg.shortest_edge, cfg.shortest_edge), cfg.resample)
    return np.stack([_view(view, cfg) for view in [base, *tiles]]), (h, w)
