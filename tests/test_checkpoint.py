"""Local checkpoint loading: safetensors only, clear one-line refusals, exit code 2, no traceback."""

import json
import shutil

import pytest


def cli_error(run_cli, tmp_path, model_dir):
    result = run_cli("calibrate", "--backbone", "qwen2.5-vl", "--model", model_dir, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("calibrating")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_missing_directory(run_cli, tmp_path):
    assert "not a directory" in cli_error(run_cli, tmp_path, tmp_path / "nope")


def test_pickle_only_weights_are_refused(run_cli, tmp_path, tiny_qwen_dir):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_qwen_dir, ckpt)
    for f in ckpt.glob("*.safetensors"):
        f.rename(f.with_name("pytorch_model.bin"))
    line = cli_error(run_cli, tmp_path, ckpt)
    assert "pickle" in line and "safetensors" in line


def test_unsupported_model_type(run_cli, tmp_path, tiny_qwen_dir):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_qwen_dir, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "whisper"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert "model_type 'whisper' is not supported" in cli_error(run_cli, tmp_path, ckpt)


@pytest.mark.parametrize("damage", ["truncate_weights", "garbage_weights", "corrupt_config", "drop_tokenizer", "drop_preprocessor"])
def test_damaged_checkpoints(run_cli, tmp_path, tiny_qwen_dir, damage):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_qwen_dir, ckpt)
    if damage == "truncate_weights":
        weights = next(ckpt.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        expected = "truncated"
    elif damage == "garbage_weights":
        next(ckpt.glob("*.safetensors")).write_bytes(b"\xff" * 64)
        expected = "not a readable safetensors file"
    elif damage == "corrupt_config":
        (ckpt / "config.json").write_text("{not json")
        expected = "not valid JSON"
    elif damage == "drop_tokenizer":
        (ckpt / "tokenizer.json").unlink()
        expected = "no tokenizer files"
    else:
        (ckpt / "preprocessor_config.json").unlink()
        expected = "preprocessor_config.json is missing"
    assert expected in cli_error(run_cli, tmp_path, ckpt)


def test_unknown_backbone_is_a_usage_error(run_cli, tmp_path):
    result = run_cli("calibrate", "--backbone", "gpt-5-vl", "--out", tmp_path)
    assert result.exit_code == 2 and "unknown backbone 'gpt-5-vl'" in result.output
