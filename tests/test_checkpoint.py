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


# ------------------------------------------------------------------------------------------------ sharded checkpoints
@pytest.fixture(scope="module")
def tiny_sharded_dir(tmp_path_factory, tiny_qwen_dir):
    """The tiny checkpoint re-saved by transformers in shards of at most 200 kB + model.safetensors.index.json."""
    from halfv_export.graphs import get_adapter

    adapter = get_adapter("qwen2.5-vl")
    root = tmp_path_factory.mktemp("tiny-sharded")
    loaded = adapter.load(tiny_qwen_dir)
    loaded.model.save_pretrained(root, max_shard_size="200KB")
    for f in tiny_qwen_dir.iterdir():
        if not f.name.endswith(".safetensors") and not (root / f.name).exists():
            shutil.copy(f, root / f.name)
    return root


def test_sharded_checkpoint_loads_like_the_single_file(tiny_sharded_dir, tiny_qwen_dir):
    import torch

    from halfv_export.graphs import get_adapter

    shards = sorted(tiny_sharded_dir.glob("*.safetensors"))
    assert len(shards) > 2 and (tiny_sharded_dir / "model.safetensors.index.json").exists()
    adapter = get_adapter("qwen2.5-vl")
    sharded = adapter.load(tiny_sharded_dir).model.state_dict()
    single = adapter.load(tiny_qwen_dir).model.state_dict()
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)
    bf16 = adapter.load(tiny_sharded_dir, dtype=torch.bfloat16).model
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}  # loaded at the export dtype, no fp32 copy


@pytest.mark.parametrize("damage", ["missing_shard", "index_not_json", "index_without_map", "shard_path_escapes",
                                    "truncated_shard", "shard_swapped"])
def test_damaged_sharded_checkpoints_are_refused_in_one_line(run_cli, tmp_path, tiny_sharded_dir, damage):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_sharded_dir, ckpt)
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    if damage == "missing_shard":
        (ckpt / shards[1]).unlink()
        expected = f"shard {shards[1]} (listed in model.safetensors.index.json) is missing"
    elif damage == "index_not_json":
        index_path.write_text("{\"weight_map\": ")
        expected = "not valid JSON"
    elif damage == "index_without_map":
        index_path.write_text(json.dumps({"metadata": {}}))
        expected = "no weight_map"
    elif damage == "shard_path_escapes":
        name = next(iter(index["weight_map"]))
        index["weight_map"][name] = "../elsewhere/model.safetensors"
        index_path.write_text(json.dumps(index))
        expected = "is not a .safetensors file name in the checkpoint directory"
    elif damage == "truncated_shard":
        shard = ckpt / shards[-1]
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size - 100])
        expected = "truncated"
    else:  # two shards' contents exchanged: the names in the index no longer match the headers
        a, b = ckpt / shards[0], ckpt / shards[1]
        data = a.read_bytes()
        a.write_bytes(b.read_bytes())
        b.write_bytes(data)
        expected = "are not in it"
    assert expected in cli_error(run_cli, tmp_path, ckpt)
