"""`halfv-export bench` end to end on a small Qwen2.5-VL-shaped LLM: every section runs on real ONNX Runtime
sessions (and the ONNX Runtime GenAI builder when installed), results land in bench.json / bench.md / plots, and the
README section is replaced between its markers. Speed is not asserted here: the bench measures it."""

import importlib.util
import json

import pytest

from halfv_export.base.errors import BadInput
from halfv_export.graphs import get_adapter
from halfv_export.benchmarks.bench import BenchShape
from halfv_export.benchmarks.report import END, START, update_readme

GENAI_INSTALLED = importlib.util.find_spec("onnxruntime_genai") is not None
GENAI_MISSING = "onnxruntime-genai is not installed (pip install 'halfv-export[bench]')"


@pytest.mark.slow
def test_bench_command_small_shape(run_cli, tmp_path, monkeypatch):
    _narrow_tower(monkeypatch)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n## Performance\n{START}\nSTALE-SECTION\n{END}\n\n## Next\n")
    result = run_cli("bench", "--visual-tokens", 64, "--visual-tokens", 144, "--reference-visual", 64,
                     "--text-tokens", 32, "--layers", 6, "--hidden", 64, "--heads", 4, "--kv-heads", 1,
                     "--intermediate", 128, "--vocab", 500, "--runs", 2, "--vision-cut", "1:0.5", "--readme", readme,
                     "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert data["weights"] == "random" and data["runs"] == 2
    assert set(data["load_average"]) == {"start", "end"}  # a loaded box is visible in the numbers' own record
    assert data["command"] == "halfv-export bench (from Python)"  # never a command that was not run
    assert "Command: `halfv-export bench (from Python)`" in (tmp_path / "b" / "bench.md").read_text()
    assert "1-min load average" in (tmp_path / "b" / "bench.md").read_text()
    assert data["schedule"]["ivr_layer"] == 1 and data["schedule"]["ssr_layer"] == 4  # paper 2/28, 21/28 at depth 6
    assert [row["visual"] for row in data["cpu_prefill"]] == [64, 144]
    for row in data["cpu_prefill"]:
        assert row["full"]["median_ms"] > 0 and row["halfv"]["peak_rss_mb"] > 0 and 1 < row["flops_ratio"] < 6
    assert data["eager"]["halfv"]["median_ms"] > 0 and 0 < data["selection"]["flops_share"] < 1
    ttft = data["ttft"]  # the published tower's layout, narrowed (_narrow_tower), one 8x8-token image (224x224 px)
    assert ttft["bucket"] == [224, 224] and ttft["vision_depth"] == 4 and ttft["vision_ort"]["median_ms"] > 0
    stages = ttft["embed_ort"]["median_ms"] + ttft["vision_ort"]["median_ms"] + data["cpu_prefill"][0]["full"]["median_ms"]
    assert ttft["engine_ttft_ms"]["full"] == pytest.approx(stages, abs=0.06)  # TTFT is the sum of the stage medians
    assert 1 < ttft["flops_ttft_ratio"] < ttft["flops_prefill_ratio"]  # the tower is paid by both
    cut = ttft["cut"]  # HalfV behind the cut: embedding + the cut tower + the HalfV prefill on its K rows
    assert (cut["block"], cut["keep"], cut["kept"]) == (1, 0.5, 32)
    cut_stages = ttft["embed_ort"]["median_ms"] + cut["vision_ort"]["median_ms"] + cut["prefill_ort"]["median_ms"]
    assert cut["engine_ttft_ms"] == pytest.approx(cut_stages, abs=0.06)
    assert cut["engine_ttft_ratio"] == pytest.approx(stages / cut_stages, rel=2e-3)
    # FLOPs: the cut tower does less than the whole one, so the end-to-end ratio beats LLM-only HalfV's
    assert cut["vision_flops"] < ttft["vision_flops"] and cut["flops_ttft_ratio"] > ttft["flops_ttft_ratio"]
    decode = data["decode"]
    assert decode["halfv"]["kv_cache_bytes"] < decode["full"]["kv_cache_bytes"]
    assert len(decode["halfv"]["cache_lengths"]) == 3 and len(decode["full"]["cache_lengths"]) == 1
    if GENAI_INSTALLED:  # the bench extra installs it: the peer must have been built and timed, not skipped
        genai = data["genai"]
        assert genai.get("median_ms", 0) > 0 and "GroupQueryAttention" in genai["contrib_ops"], genai
        assert genai["halfv_speedup_over_genai"] == pytest.approx(
            genai["median_ms"] / data["cpu_prefill"][0]["halfv"]["median_ms"], abs=1e-3)
    else:
        assert data["genai"] == {"skipped": GENAI_MISSING}
    assert {c["backbone"] for c in data["flops_curves"]} == {"qwen2.5-vl", "llava-1.5", "llava-next"}
    assert data["gpu"] == {"skipped": "no CUDA device"}
    for png in ("flops_ratio.png", "prefill_latency.png"):
        assert (tmp_path / "b" / png).stat().st_size > 10_000
    text = readme.read_text()
    assert "STALE-SECTION" not in text and "ONNX Runtime CPU prefill" in text and text.endswith("## Next\n")
    assert "With a vision cut" in text
    assert not (tmp_path / "b" / "work").exists()  # the 2 GB-class graphs are not left behind


def test_genai_peer_without_the_package_says_how_to_install_it(tmp_path, monkeypatch):
    import sys

    import torch

    from halfv_export.benchmarks.bench import genai_peer

    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import now raises ImportError
    ids = torch.zeros((1, 4), dtype=torch.long)
    assert genai_peer(tmp_path, tmp_path, ids, ids[None], 1, print, 1, 8) == {"skipped": GENAI_MISSING}
    assert not (tmp_path / "genai").exists()


def test_readme_without_markers_is_refused(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(BadInput, match="markers"):
        update_readme(readme, "x")


def test_bench_config_is_the_half_billion_class():
    config = get_adapter("qwen2.5-vl").synthetic_config(BenchShape().text_config())
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (896, 24, 14, 2)
    assert sum(text.rope_parameters["mrope_section"]) == 896 // 14 // 2
    assert config.vision_config.out_hidden_size == 896  # the merger feeds the LLM's width


def test_bench_shape_from_a_published_config_with_flag_overrides():
    from pathlib import Path

    import json

    models = json.loads((Path(__file__).parent / "data" / "model-configs.json").read_text())["models"]
    q7 = next(m for m in models if m["_model"] == "Qwen/Qwen2.5-VL-7B-Instruct")
    path = Path(__file__).parent / "data" / "q7.json"
    try:
        path.write_text(json.dumps(q7))
        shape = BenchShape.from_config(path, layers=4, vocab=None)
    finally:
        path.unlink()
    assert (shape.hidden, shape.heads, shape.kv_heads, shape.intermediate, shape.vocab) == (3584, 28, 4, 18944, 152064)
    assert shape.layers == 4


@pytest.mark.slow
def test_bench_runs_on_another_backbone(run_cli, tmp_path):
    """The bench is backbone-agnostic: a LLaVA-1.5 (Llama, 1-D RoPE) LLM through the same sections."""
    result = run_cli("bench", "--backbone", "llava-1.5", "--visual-tokens", 64, "--reference-visual", 64,
                     "--text-tokens", 16, "--layers", 4, "--hidden", 64, "--heads", 4, "--kv-heads", 2,
                     "--intermediate", 128, "--vocab", 1100, "--runs", 1, "--no-genai", "--out", tmp_path / "b")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert data["backbone"] == "llava-1.5" and data["schedule"]["ssr_mode"] == "freeze"
    assert data["cpu_prefill"][0]["flops_ratio"] > 1 and data["decode"]["kv_cache_ratio"] > 1
    assert len(data["decode"]["halfv"]["cache_lengths"]) == 2  # freeze: N rows before L1, K1 after
    assert "no published windowed vision tower" in data["ttft"]["skipped"]


def _narrow_tower(monkeypatch):
    """The published tower's layout at a width the test can afford: 4 blocks, full attention after 1 and 3."""
    import halfv_export.benchmarks.bench as bench

    vision = dict(depth=4, hidden_size=64, num_heads=4, intermediate_size=128, fullatt_block_indexes=[1, 3],
                  window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_chans=3,
                  out_hidden_size=64, hidden_act="silu")
    monkeypatch.setattr(bench, "published_vision", lambda adapter: ("narrow test tower", dict(vision)))


@pytest.mark.parametrize("args, message", [
    (["--vision-depth", 2, "--vision-cut", "1:0.5"], r"after block 1: .*"),
    (["--no-vision", "--vision-cut", "1:0.5"], "drop --no-vision or the cut"),
    (["--backbone", "llava-1.5", "--vision-cut", "1:0.5"], "has none; drop --vision-cut"),
    (["--quantize", "int4", "--vision-cut", "1:0.5"], "drop --vision-cut or --quantize"),
])
def test_bench_refuses_a_cut_it_cannot_time_in_one_line(run_cli, tmp_path, args, message):
    import re

    out = tmp_path / "b"
    result = run_cli("bench", "--visual-tokens", 64, "--reference-visual", 64, *args, "--out", out)
    assert result.exit_code == 2 and re.search(message, result.output), result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
