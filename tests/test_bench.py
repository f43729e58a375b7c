"""The prefill benchmark on a small Qwen2.5-VL-shaped LLM: both graphs export, run in ONNX Runtime, agree with the
FLOPs model on what was pruned, and the result file says what was measured (random weights, medians)."""

import json

from halfv_export.validate.bench import BenchShape, bench_config


def test_bench_command_small_shape(run_cli, tmp_path):
    result = run_cli("bench", "--visual-tokens", 64, "--text-tokens", 32, "--layers", 6, "--hidden", 64, "--heads", 4,
                     "--kv-heads", 1, "--intermediate", 128, "--vocab", 500, "--runs", 2, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "bench_prefill.json").read_text())
    assert data["weights"] == "random" and data["runs"] == 2
    assert data["schedule"]["ivr_layer"] == 1 and data["schedule"]["ssr_layer"] == 4  # paper 2/28, 21/28 at depth 6
    assert data["prefill_ms"]["full"] > 0 and data["prefill_ms"]["halfv"] > 0
    assert 1 < data["flops_ratio"] < 6
    lines = result.output.splitlines()
    assert any(line.startswith("measured ratio:") for line in lines)
    assert any(line.startswith("FLOPs ratio:") for line in lines)


def test_bench_config_is_the_half_billion_class():
    config = bench_config(BenchShape())
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (896, 24, 14, 2)
    assert sum(text.rope_parameters["mrope_section"]) == 896 // 14 // 2
