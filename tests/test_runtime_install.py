"""The runtime install runs a build with ONNX Runtime, numpy, Pillow, tokenizers and jinja2 alone (issue 40).

The oracle is the toolchain's eager reference (torch) fed by transformers alone: its Qwen2-VL image processor, its
tokenizer's chat template and tokenisation, Qwen2_5_VLModel.get_rope_index; nothing of the runtime's host/ code,
which the adapters share. The runtime answers through tests/runtime_answers.py, in a process where torch,
transformers and the rest of the [export] extra cannot be imported, and (slow) in a fresh venv that holds the base
install alone."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from halfv_export.base.artifact_files import NUMPY_BY_ONNX, ONNX_BFLOAT16
from halfv_export.graphs import get_adapter
from halfv_export.graphs.adapter import HostInputs
from halfv_export.graphs.halfv import HalfVReference
from halfv_export.graphs.pruning import PruneSchedule
from halfv_export.measure.accuracy import cut_at_eos
from halfv_export.stages.data import default_samples
from tests.test_host import reference_rope_index

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "runtime_answers.py"
BUDGET = 8


def test_weights_dtypes_equal_onnx_own_table():
    """weights.bin is read without onnx (engines/ort.py); the element-type table is onnx's (bfloat16 as raw uint16)."""
    for code, dtype in NUMPY_BY_ONNX.items():
        want = np.uint16 if code == ONNX_BFLOAT16 else onnx.helper.tensor_dtype_to_np_dtype(code)
        assert np.dtype(dtype) == np.dtype(want), code


def transformers_rows(loaded, image, prompt: str) -> HostInputs:
    """One prompt's rows built by transformers alone, as its Qwen2.5-VL processor does: the image processor's
    patches and grid, the chat template with the image pad expanded to the merged token count, the tokenizer's ids,
    get_rope_index's 3-D positions."""
    tokenizer, processor, config = loaded.tokenizer, loaded.image_processor, loaded.config
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": prompt}]
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    pixels, grid, n = [], None, 0
    if image is not None:
        processed = processor(images=[image], return_tensors="pt")
        grid = processed["image_grid_thw"]
        n = int(grid.prod()) // config.vision_config.spatial_merge_size ** 2
        text = text.replace("<|image_pad|>", "<|image_pad|>" * n)
        pixels = [processed["pixel_values"]]
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    mask = torch.ones_like(ids)
    if grid is None:
        positions = torch.arange(ids.shape[1]).expand(3, 1, -1)
    else:
        types = (ids == config.image_token_id).int()
        positions, _ = reference_rope_index(config)(ids, mm_token_type_ids=types, image_grid_thw=grid,
                                                    attention_mask=mask)
    start = int((ids[0] == config.image_token_id).int().argmax()) if n else 0
    bucket = None if grid is None else tuple(int(v) * processor.patch_size for v in grid[0, 1:])
    return HostInputs(input_ids=ids, attention_mask=mask, positions=positions.long(),
                      visual_start=torch.tensor([start]), num_visual=n,
                      next_positions=positions.max(dim=2).values.max(dim=0, keepdim=True).values.expand(3, -1) + 1,
                      pixel_values=pixels, bucket=bucket)


@pytest.fixture(scope="module")
def cases(exported, tmp_path_factory):
    """Task questions at both exported buckets; an image of odd size whose own bucket is exported (333x517 ->
    336x504); a 300x517 image, whose own bucket (308x504) is not, so `run` fits it to 336x504 (here: resized by
    the test); a text-only prompt. Each with the eager reference's greedy answer on transformers' rows."""
    adapter = get_adapter("qwen2.5-vl")
    loaded = adapter.load(None)
    folder = tmp_path_factory.mktemp("runtime-cases")
    samples = default_samples(loaded, 6, seed=4242, split="eval", sizes=[(448, 448), (336, 504)], any_size=True)
    items = [(s.image, s.image, s.prompt) for s in samples]
    odd = samples[0].image.resize((517, 333))
    items.append((odd, odd, samples[0].prompt))
    fitted = samples[1].image.resize((517, 300))
    items.append((fitted, fitted.resize((504, 336)), samples[1].prompt))
    items.append((None, None, "Say hello."))
    meta = json.loads((exported / "artifacts.json").read_text())
    reference = HalfVReference(adapter.text_stack(loaded), PruneSchedule(**meta["schedule"]))
    eos = adapter.eos_token_ids(loaded)
    out = []
    for i, (image, seen, prompt) in enumerate(items):
        path = None
        if image is not None:
            path = folder / f"case{i}-{image.height}x{image.width}.png"
            image.save(path)
        rows = transformers_rows(loaded, seen, prompt)
        tokens = reference.generate(adapter.embed_host(loaded, rows), BUDGET, eos)[0].tolist()
        want = cut_at_eos(tokens, eos)
        out.append({"image": None if path is None else str(path), "prompt": prompt, "max_new_tokens": BUDGET,
                    "want": want, "want_text": adapter.decode_text(loaded, want)})
    (folder / "cases.json").write_text(json.dumps(out))
    return folder / "cases.json", out, eos


def runtime_answers(python: str, build: Path, cases_file: Path, *extra: str) -> tuple[dict, str]:
    result = subprocess.run([python, str(SCRIPT), str(build), str(cases_file), *extra], capture_output=True,
                            text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


def assert_answers_equal_the_reference(got: dict, cases: list, eos: set):
    assert got["export_extra_loaded"] == []
    for answer, case in zip(got["answers"], cases, strict=True):
        assert cut_at_eos(answer["token_ids"], eos) == case["want"], case
        assert answer["text"] == case["want_text"]


def test_without_the_toolchain_answers_equal_the_eager_reference(engined, cases):
    cases_file, items, eos = cases
    got, stderr = runtime_answers(sys.executable, engined, cases_file, "--block")
    assert_answers_equal_the_reference(got, items, eos)
    assert [a["bucket"] for a in got["answers"][-3:]] == [[336, 504], [336, 504], None]
    assert stderr == ""  # the engine stage's fused graphs opened as they are: nothing to rewrite, nothing to warn


def test_without_the_toolchain_an_export_without_engine_stage_runs_unfused_and_says_so(exported, cases):
    cases_file, items, eos = cases
    got, stderr = runtime_answers(sys.executable, exported, cases_file, "--block")
    assert_answers_equal_the_reference(got, items, eos)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "no engine stage wrote fused graphs" in lines[0] and "onnx is not installed" in lines[0]


def test_run_without_the_toolchain_prints_the_reference_answer(engined, cases):
    _, items, _ = cases
    for case in (items[0], items[-1]):  # an image, text only
        args = ["run", "--artifacts", str(engined), "--prompt", case["prompt"], "--max-new-tokens", str(BUDGET)]
        args += ["--image", case["image"]] if case["image"] else []
        result = subprocess.run([sys.executable, str(SCRIPT), "cli", *args], capture_output=True, text=True,
                                timeout=600, cwd=ROOT)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout == case["want_text"] + "\n"


def test_toolchain_commands_say_what_to_install_without_it(exported, tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "cli", "calibrate", "--backbone", "qwen2.5-vl",
                             "--out", str(tmp_path / "c")], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: `calibrate` needs the export toolchain (torch is not installed; the runtime install only runs "
        "builds); install the [export] extra: pip install '.[export]' in a checkout"]
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_a_fresh_venv_with_the_runtime_install_answers_like_the_full_install(engined, cases, tmp_path):
    """pip install of the package without extras into an empty venv: no torch, no transformers; the same answers."""
    cases_file, items, eos = cases
    venv = tmp_path / "runtime-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    install = subprocess.run([python, "-m", "pip", "install", "-q", str(ROOT)], capture_output=True, text=True,
                             timeout=1200, env=env)
    assert install.returncode == 0, install.stderr[-3000:]
    listed = json.loads(subprocess.run([python, "-m", "pip", "list", "--format", "json"], capture_output=True,
                                       text=True, check=True, env=env).stdout)
    names = {p["name"].lower() for p in listed}
    assert "onnxruntime" in names and "halfv-export" in names
    assert not names & {"torch", "transformers", "onnx", "onnxscript", "safetensors", "scikit-learn", "matplotlib"}
    # the script's own folder (tests/) heads sys.path, so the venv's installed package is the one imported
    got, stderr = runtime_answers(python, engined, cases_file)
    assert_answers_equal_the_reference(got, items, eos)
    assert stderr == ""
    case = items[0]
    result = subprocess.run([str(venv / "bin" / "halfv-export"), "run", "--artifacts", str(engined), "--image",
                             case["image"], "--prompt", case["prompt"], "--max-new-tokens", str(BUDGET)],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == case["want_text"] + "\n"
