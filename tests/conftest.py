"""Shared fixtures: the embedded default loaded once, a tiny differently-shaped checkpoint saved to disk, images."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from filelock import FileLock
from PIL import Image
from halfv_export.cli.main import cli
from halfv_export.graphs import get_adapter
from halfv_export.graphs.adapter import EMBEDDED_WEIGHTS
from halfv_export.graphs.checkpoint import seeded_model

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` on a 2-core box: one worker per core. Two workers each running torch's two OpenMP threads spin-wait
    # for each other and ran small matrices >10x slower (measured for halfv_export.training's --threads).
    torch.set_num_threads(1)

# what the embedded Qwen default holds: its shipped trained weights, or seeded random ones where none are shipped
EMBEDDED_KIND = "trained" if (get_adapter("qwen2.5-vl").embedded_dir / EMBEDDED_WEIGHTS).exists() else "random"
QWEN_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="session")
def qwen():
    """The embedded default as `calibrate`/`export` load it: the shipped trained weights (parity tests hold for any
    weights; tests that need seeded random ones load them with seed=...)."""
    adapter = get_adapter("qwen2.5-vl")
    loaded = adapter.load(None)
    return adapter, loaded, adapter.text_stack(loaded)


def make_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * (seed + 1) % 97) / 97, (yy * 3 % 53) / 53, rng.random((h, w))], -1)
    return Image.fromarray((base * 255).astype(np.uint8))


def shared_folder(tmp_path_factory, name: str, make) -> Path:
    """A folder made once per test session and shared by its xdist workers: the first worker to ask makes it (under a
    file lock, `make(folder)`), the others wait for it and reuse it. One worker's builds cost a whole export each, and
    `--dist loadfile` spreads the files that share them over both workers. A failed `make` leaves nothing behind, so
    the next asker tries again. Tests that write into a shared folder work on a copy (copy_build)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER") and root.name.startswith("popen-"):
        root = root.parent  # this session's folder, above every worker's own (never one that outlives the session)
    folder, made = root / f"shared-{name}", root / f"shared-{name}.made"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not made.exists():
            shutil.rmtree(folder, ignore_errors=True)
            try:
                make(folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            made.touch()
    return folder


def _cli_ok(*args) -> None:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def save_tiny_checkpoint(root, backbone: str, text: dict, vision: dict, preprocessor: dict, seed: int = 7):
    """A checkpoint directory shaped unlike the backbone's embedded default: config + safetensors (real
    save_pretrained) + the embedded tokenizer, chat template and an edited preprocessor config."""
    adapter = get_adapter(backbone)
    src = adapter.embedded_dir
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"].update(text)
    cfg["vision_config"].update(vision)
    model = seeded_model(adapter.model_class, adapter.config_class(**cfg), seed=seed)
    model.save_pretrained(root)
    for name in QWEN_FILES:
        shutil.copy(src / name, root / name)
    pre = json.loads((src / "preprocessor_config.json").read_text())
    pre.update(preprocessor)
    (root / "preprocessor_config.json").write_text(json.dumps(pre))
    return root


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory):
    """Qwen2.5-VL: 6 layers, hidden 96, 3 heads / 1 kv head, 2-block vision tower, other pixel limits."""
    return shared_folder(tmp_path_factory, "tiny-qwen", lambda root: save_tiny_checkpoint(
        root, "qwen2.5-vl",
        text=dict(hidden_size=96, intermediate_size=200, num_hidden_layers=6, num_attention_heads=3,
                  num_key_value_heads=1),
        vision=dict(depth=2, hidden_size=48, num_heads=3, intermediate_size=96, out_hidden_size=96,
                    fullatt_block_indexes=[1]),
        preprocessor=dict(min_pixels=56 * 56, max_pixels=336 * 336)))


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """LLaVA-1.5: 6 Llama layers with GQA (4 heads / 2 kv), hidden 64, a 2-layer CLIP tower at 168 px."""
    return save_tiny_checkpoint(
        tmp_path_factory.mktemp("tiny-llava"), "llava-1.5",
        text=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2),
        vision=dict(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=3, image_size=168),
        preprocessor=dict(size={"shortest_edge": 168}, crop_size={"height": 168, "width": 168}))


@pytest.fixture(scope="session")
def tiny_llava_next_dir(tmp_path_factory):
    """LLaVA-NeXT: 6 Mistral layers (4 heads / 1 kv), hidden 64, other anyres pinpoints."""
    pinpoints = [[112, 224], [224, 112], [224, 224]]
    root = tmp_path_factory.mktemp("tiny-llava-next")
    save_tiny_checkpoint(
        root, "llava-next",
        text=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=1),
        vision=dict(num_hidden_layers=2, hidden_size=48, intermediate_size=96, num_attention_heads=3),
        preprocessor=dict(image_grid_pinpoints=pinpoints))
    cfg = json.loads((root / "config.json").read_text())
    cfg["image_grid_pinpoints"] = pinpoints
    (root / "config.json").write_text(json.dumps(cfg))
    return root


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Embedded default, schedule via the CLI flags, two buckets: 448x448 and non-square 336x504. Shared by the
    session's workers: read it, or work on a copy (copy_build)."""
    def make(out):
        _cli_ok("calibrate", "--backbone", "qwen2.5-vl", "--paper-values", "--ivr-layer", "2", "--ssr-layer", "6",
                "--out", out)
        _cli_ok("export", "--schedule", out / "schedule.json", "--image-size", "448x448", "--image-size", "336x504",
                "--out", out)

    return shared_folder(tmp_path_factory, "exported", make)


@pytest.fixture(scope="session")
def tiny_qwen_build(tmp_path_factory, tiny_qwen_dir):
    """`build` on the tiny checkpoint at the non-square 252x336 bucket, once per session (shared by its workers).
    Tests that write into a build work on a copy (copy_build)."""
    return shared_folder(tmp_path_factory, "tiny-build", lambda out: _cli_ok(
        "build", "--backbone", "qwen2.5-vl", "--model", tiny_qwen_dir, "--image-size", "252x336", "--out", out))


@pytest.fixture(scope="session")
def engined(exported, tmp_path_factory):
    """The export after the engine stage, as `build` leaves it: the fused prefill graphs in ort/ (shared)."""
    from halfv_export.engines.ort import build_ort_engines

    return shared_folder(tmp_path_factory, "engined", lambda out: build_ort_engines(copy_build(exported, out)))


@pytest.fixture(scope="session")
def llava_build(tmp_path_factory):
    """`build` of the embedded LLaVA-1.5 default with the paper's schedule (SSR freeze), once per session (shared by
    its workers): test_llava's parity gates read it, test_triton serves it."""
    return shared_folder(tmp_path_factory, "llava-build", lambda out: _cli_ok(
        "build", "--backbone", "llava-1.5", "--paper-values", "--ssr-mode", "freeze", "--out", out))


def copy_build(source, target):
    """A private copy of a shared artifacts folder, for a test that writes into it (engines, reports, manifest)."""
    shutil.copytree(source, target)
    return target


@pytest.fixture
def run_cli():
    def invoke(*args):
        result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
        return result

    return invoke
