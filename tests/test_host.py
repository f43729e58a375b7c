"""The numpy host-side inputs (halfv_export/host) against transformers itself: the same pixel values and grids as
the Qwen2-VL, CLIP and LLaVA-NeXT image processors over many sizes, aspect ratios and modes (every LLaVA-NeXT
pinpoint among them), and the same 3-D positions and rope deltas as Qwen2_5_VLModel.get_rope_index over paddings
and prompt layouts. The host package must not import torch or
transformers: a deployment host runs it without them."""

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from halfv_export.graphs import get_adapter
from halfv_export.host.clip import ClipImageConfig, anyres_pixels, clip_pixels, select_best_resolution
from halfv_export.host.qwen import QwenImageConfig, pixel_patches, rope_positions, smart_resize

HOST = Path(__file__).resolve().parents[1] / "halfv_export" / "host"
SIZES = [(224, 224), (448, 448), (392, 504), (224, 336), (27, 29), (55, 57), (1, 300), (301, 2), (97, 1003),
         (640, 480), (1080, 1920), (2000, 30), (333, 333), (59, 60), (448, 447), (900, 901)]


@pytest.fixture(scope="module")
def qwen():
    adapter = get_adapter("qwen2.5-vl")
    return adapter.load_processing(adapter.embedded_dir)


def reference_rope_index(config):
    """transformers' Qwen2_5_VLModel.get_rope_index without a model instance (it reads only the config)."""
    import functools
    import types

    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    owner = types.SimpleNamespace(config=config)
    owner.get_vision_position_ids = functools.partial(Qwen2_5_VLModel.get_vision_position_ids, owner)
    return functools.partial(Qwen2_5_VLModel.get_rope_index, owner)


def noise(h: int, w: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Random pixels in `mode`; RGBA with a random alpha, P with a transparent palette entry (both composited on
    white by the processors)."""
    rng = np.random.default_rng(seed)
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    if mode == "P":
        image.info["transparency"] = int(np.asarray(image)[0, 0])
    return image


def test_host_imports_neither_torch_nor_transformers():
    for path in sorted(HOST.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            heavy = [n for n in names if n.split(".")[0] in ("torch", "transformers", "onnx", "onnxscript")]
            assert not heavy, f"{path.name} imports {heavy}"


@pytest.mark.parametrize("h,w", SIZES)
def test_smart_resize_matches_transformers(qwen, h, w):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    cfg = QwenImageConfig.from_json(qwen.image_processor.to_dict())
    for lo, hi in ((cfg.min_pixels, cfg.max_pixels), (56 * 56, 28 * 28 * 1280), (28 * 28 * 4, 28 * 28 * 16)):
        if max(h, w) / min(h, w) > 200:
            with pytest.raises(ValueError):
                smart_resize(h, w, 28, lo, hi)
            continue
        assert smart_resize(h, w, 28, lo, hi) == reference(h, w, factor=28, min_pixels=lo, max_pixels=hi)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
@pytest.mark.parametrize("h,w", [s for s in SIZES if max(s) / min(s) <= 200])
def test_pixel_patches_match_the_image_processor(qwen, h, w, mode):
    image = noise(h, w, h * 7919 + w, mode)
    expected = qwen.image_processor(images=[image], return_tensors="np")
    pixels, grid = pixel_patches(image, QwenImageConfig.from_json(qwen.image_processor.to_dict()))
    assert grid == tuple(int(v) for v in expected["image_grid_thw"][0])
    assert pixels.dtype == np.float32 and pixels.shape == expected["pixel_values"].shape
    np.testing.assert_array_equal(pixels, expected["pixel_values"])


@pytest.mark.parametrize("seed", range(12))
def test_rope_positions_match_get_rope_index(qwen, seed):
    """Rows of different prompt lengths, left-padded, each with one image of the batch's grid at a random place (or
    a text-only batch), against transformers' get_rope_index on the same ids."""
    rng = np.random.default_rng(seed)
    cfg = qwen.config
    image_id, merge = cfg.image_token_id, cfg.vision_config.spatial_merge_size
    with_image = seed % 4 != 3
    grid = (1, int(rng.integers(1, 12)) * merge, int(rng.integers(1, 12)) * merge) if with_image else None
    n = grid[1] * grid[2] // merge ** 2 if grid else 0
    rows = []
    for _ in range(int(rng.integers(1, 5))):
        before, after = int(rng.integers(0, 9)), int(rng.integers(1, 9))
        text = rng.integers(10, 1000, before + after)
        rows.append(np.concatenate([text[:before], np.full(n, image_id), text[before:]]))
    length = max(len(r) for r in rows) + int(rng.integers(0, 4))
    ids = np.zeros((len(rows), length), dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r):], mask[i, length - len(r):] = r, 1
    positions, deltas = rope_positions(ids, mask, image_id, grid, merge)
    if grid is None:  # transformers' get_rope_index wants an image; text-only rows count 0, 1, 2, ... on each axis
        expected = np.broadcast_to((np.cumsum(mask, 1) - 1).clip(min=0) * mask, positions.shape)
        np.testing.assert_array_equal(positions, expected)
        return
    types = torch.from_numpy((ids == image_id).astype(np.int32))
    ref, ref_deltas = reference_rope_index(cfg)(torch.from_numpy(ids), mm_token_type_ids=types,
                                          image_grid_thw=torch.tensor([grid] * len(rows)),
                                          attention_mask=torch.from_numpy(mask))
    np.testing.assert_array_equal(positions, ref.numpy())
    np.testing.assert_array_equal(deltas, ref_deltas.numpy().ravel())


@pytest.fixture(scope="module")
def llava_processors():
    return {name: get_adapter(name).load_processing(get_adapter(name).embedded_dir).image_processor
            for name in ("llava-1.5", "llava-next")}


CLIP_SIZES = [s for s in SIZES if max(s) / min(s) <= 200] + [(224, 224), (112, 224), (336, 112), (100, 50), (7, 9),
                                                         (60, 200), (200, 60), (50, 400), (400, 50), (90, 300)]


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA", "P"])
@pytest.mark.parametrize("h,w", CLIP_SIZES)
def test_clip_pixels_match_the_image_processor(llava_processors, h, w, mode):
    processor = llava_processors["llava-1.5"]
    image = noise(h, w, h * 31 + w, mode)
    expected = processor(images=[image], return_tensors="np")["pixel_values"][0]
    got = clip_pixels(image, ClipImageConfig.from_json(processor.to_dict()))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("h,w", CLIP_SIZES)
def test_anyres_pixels_match_the_image_processor(llava_processors, h, w):
    """Every pinpoint of the shipped LLaVA-NeXT config is picked by some size here (checked below)."""
    processor = llava_processors["llava-next"]
    image = noise(h, w, h * 17 + w)
    expected = processor(images=[image], return_tensors="np")
    got, size = anyres_pixels(image, ClipImageConfig.from_json(processor.to_dict()))
    assert size == tuple(int(v) for v in expected["image_sizes"][0])
    np.testing.assert_array_equal(got, expected["pixel_values"][0])


def test_the_sizes_reach_every_pinpoint(llava_processors):
    cfg = ClipImageConfig.from_json(llava_processors["llava-next"].to_dict())
    assert {select_best_resolution(s, cfg.pinpoints) for s in CLIP_SIZES} == set(cfg.pinpoints)
