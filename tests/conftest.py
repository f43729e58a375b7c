"""Shared fixtures: the embedded default loaded once, a tiny differently-shaped checkpoint saved to disk, images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from halfv_export.exporter.cli import cli
from halfv_export.graphs import get_adapter
from halfv_export.graphs.checkpoint import EMBEDDED_ROOT, seeded_model

QWEN_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def qwen():
    adapter = get_adapter("qwen2.5-vl")
    loaded = adapter.load(None, seed=0)
    return adapter, loaded, adapter.text_stack(loaded)


def make_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * (seed + 1) % 97) / 97, (yy * 3 % 53) / 53, rng.random((h, w))], -1)
    return Image.fromarray((base * 255).astype(np.uint8))


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """A Qwen2.5-VL checkpoint shaped unlike the embedded default (6 layers, hidden 96, 3 heads / 1 kv head,
    2-block vision tower, other pixel limits), saved as a real checkpoint directory with safetensors."""
    root = tmp_path_factory.mktemp("tiny-qwen")
    src = EMBEDDED_ROOT / "qwen2_5_vl"
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"].update(hidden_size=96, intermediate_size=200, num_hidden_layers=6, num_attention_heads=3,
                              num_key_value_heads=1)
    cfg["vision_config"].update(depth=2, hidden_size=48, num_heads=3, intermediate_size=96, out_hidden_size=96,
                                fullatt_block_indexes=[1])
    model = seeded_model(Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLConfig(**cfg), seed=7)
    model.save_pretrained(root)
    for name in QWEN_FILES:
        shutil.copy(src / name, root / name)
    pre = json.loads((src / "preprocessor_config.json").read_text())
    pre.update(min_pixels=56 * 56, max_pixels=336 * 336)
    (root / "preprocessor_config.json").write_text(json.dumps(pre))
    return root


@pytest.fixture
def run_cli():
    def invoke(*args):
        result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
        return result

    return invoke
