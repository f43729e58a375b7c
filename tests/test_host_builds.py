"""The torch-free host side of a build (host/builds.py) against the toolchain's adapters on the same folder: for
every backbone, batches of images of several sizes and ordinary or hostile prompts, and text-only batches, the same
token ids, masks, positions, visual spans, pixel values and buckets, array for array."""

import json

import numpy as np
import pytest

from halfv_export.graphs import get_adapter
from halfv_export.host.builds import host_for
from tests.test_host import noise
from tests.test_prompt_injection import ATTACKS, ORDINARY

PROMPTS = ORDINARY + ATTACKS[:3]
SIZES = {"qwen2.5-vl": [(224, 224), (230, 220), (224, 336), (448, 448)],
         "llava-1.5": [(224, 224), (300, 200), (97, 1003)],
         "llava-next": [(112, 224), (224, 112), (224, 224), (120, 330), (60, 200)]}


@pytest.fixture(scope="module", params=sorted(SIZES))
def folder(request, tmp_path_factory):
    """What a build holds for its host side: the processing files an export saves, and artifacts.json's buckets
    (here every bucket the sizes below reach)."""
    backbone = request.param
    adapter = get_adapter(backbone)
    loaded = adapter.load(None)
    root = tmp_path_factory.mktemp(backbone)
    adapter.save_processing(loaded, root)
    processing = adapter.load_processing(root)
    buckets = {}
    for size in SIZES[backbone]:
        image = adapter.snap(processing, noise(*size, 0)) if hasattr(adapter, "snap") else noise(*size, 0)
        bucket, n = adapter.bucket_for(processing, (image.height, image.width))
        buckets[bucket] = {"size": list(bucket), "num_visual": n}
    (root / "artifacts.json").write_text(json.dumps({"backbone": backbone, "buckets": list(buckets.values())}))
    return backbone, adapter, processing, root


def assert_same(host, eager):
    for field in ("input_ids", "attention_mask", "positions", "visual_start", "next_positions"):
        np.testing.assert_array_equal(getattr(host, field), getattr(eager, field).numpy(), err_msg=field)
    assert host.num_visual == eager.num_visual and host.bucket == (tuple(eager.bucket) if eager.bucket else None)
    assert len(host.pixel_values) == len(eager.pixel_values)
    for got, want in zip(host.pixel_values, eager.pixel_values):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want.numpy())


def test_host_rows_equal_the_adapters(folder):
    backbone, adapter, processing, root = folder
    host = host_for(root)
    assert host.eos_token_ids() == adapter.eos_token_ids(type("L", (), {"tokenizer": processing.tokenizer})())
    for i, size in enumerate(SIZES[backbone]):
        images = [noise(*size, 10 * i + k) for k in range(1 + i % 3)]
        prompts = [PROMPTS[(i + k) % len(PROMPTS)] for k in range(len(images))]
        assert_same(host.host_inputs(images, prompts), adapter.host_inputs(processing, images, prompts))
        assert host.bucket_for(size) == adapter.bucket_for(processing, size)[0]
    texts = PROMPTS[:4]
    assert_same(host.host_inputs([None] * len(texts), texts), adapter.host_inputs(processing, [None] * len(texts), texts))


def test_decoded_text_equals_the_adapters(folder):
    backbone, adapter, processing, root = folder
    host = host_for(root)
    ids = host.host_inputs([None], ["What is this? 中文 🙂"]).input_ids[0].tolist()
    assert host.decode(ids) == processing.tokenizer.decode(ids, skip_special_tokens=True)


def test_a_folder_without_a_build_is_one_line(tmp_path):
    from halfv_export.base.errors import BadInput

    with pytest.raises(BadInput, match="has no artifacts.json"):
        host_for(tmp_path)
