"""LLaVA-1.5 and LLaVA-NeXT through the adapter interface: inputs as transformers builds them, freeze mode that
really skips work, the whole pipeline on embedded defaults and differently shaped checkpoints."""

import ast
import json
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from halfv_export.calibration.rules import derive_schedule
from halfv_export.graphs import get_adapter
from halfv_export.graphs.adapter import Processing
from halfv_export.graphs.export_forward import PrefillGraph
from halfv_export.graphs.halfv import HalfVReference
from halfv_export.graphs.pruning import PruneSchedule
from halfv_export.measure.flops import LMShape, prefill_flops
from tests.conftest import make_image

FREEZE = PruneSchedule(ivr_layer=1, keep_ratio=0.5, anchor_ratio=0.2, ssr_layer=4, ssr_mode="freeze")
CONFIGS = Path(__file__).parent / "data" / "model-configs.json"


@pytest.fixture(scope="module", params=["llava-1.5", "llava-next"])
def llava(request):
    adapter = get_adapter(request.param)
    loaded = adapter.load(None)
    return adapter, loaded, adapter.text_stack(loaded)


def test_unpruned_reference_equals_the_hf_multimodal_forward(llava):
    adapter, loaded, stack = llava
    image, prompt = make_image(300, 140, 1), "What is in this picture?"
    inputs = adapter.prepare(loaded, [image], [prompt])
    host = adapter.host_inputs(Processing(loaded.tokenizer, loaded.image_processor, loaded.config), [image], [prompt])
    kwargs = {"pixel_values": host.pixel_values[0]}
    if adapter.name == "llava-next":
        kwargs = {"pixel_values": host.pixel_values[0][None], "image_sizes": torch.tensor([list(host.bucket)])}
    with torch.no_grad():
        hf = loaded.model(input_ids=host.input_ids, attention_mask=host.attention_mask, **kwargs).logits[:, -1]
    torch.testing.assert_close(HalfVReference(stack, None).prefill(inputs).logits, hf, atol=1e-4, rtol=1e-4)
    assert host.input_ids[0, 0] == loaded.tokenizer.bos_token_id  # <s> as a Llama tokenizer adds it
    assert inputs.positions.shape[0] == 1  # 1-D RoPE


def test_vision_graph_equals_the_model_tower(llava):
    adapter, loaded, _ = llava
    processing = Processing(loaded.tokenizer, loaded.image_processor, loaded.config)
    host = adapter.host_inputs(processing, [make_image(220, 210, 2)], ["x"])
    with torch.no_grad():
        ours = adapter.vision_graph(loaded, host.bucket)(host.pixel_values[0])
    torch.testing.assert_close(ours, adapter.eager_vision(loaded, host.pixel_values[0], host.bucket))
    assert ours.shape[0] == host.num_visual


def test_anyres_token_count_depends_on_the_grid():
    adapter = get_adapter("llava-next")
    loaded = adapter.load(None)
    processing = Processing(loaded.tokenizer, loaded.image_processor, loaded.config)
    counts = {adapter.bucket_for(processing, size) for size in [(224, 224), (140, 300), (300, 100), (200, 210)]}
    # 8x8 tokens per 112-px tile: base 64 + grid features + one newline per feature row
    assert counts == {((224, 224), 64 + 16 * 16 + 16), ((112, 336), 64 + 8 * 24 + 8), ((336, 112), 64 + 24 * 8 + 24)}


def test_freeze_graph_skips_the_frozen_rows_work(llava):
    adapter, loaded, stack = llava
    inputs = adapter.prepare(loaded, [make_image(224, 224, 3)], ["Describe the colours."])
    n, t = inputs.num_visual, inputs.seq_len - inputs.num_visual
    graph = PrefillGraph(stack, FREEZE, n).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = graph(inputs.embeds, inputs.attention_mask, inputs.positions, inputs.visual_start)
    analytic = prefill_flops(LMShape.from_config(loaded.config.to_dict()), n, t, FREEZE)
    assert counter.get_total_flops() == pytest.approx(analytic.halfv + analytic.overhead, rel=0.02)
    # and the same logits and kept sets as the eager reference, which computes then restores the frozen rows
    reference = HalfVReference(stack, FREEZE).prefill(inputs)
    torch.testing.assert_close(out[0], reference.logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(out[1], reference.kept["ivr"]) and torch.equal(out[2], reference.kept["ssr"])


def test_flops_for_the_published_llava_configs(run_cli, tmp_path):
    models = {m["_model"]: m for m in json.loads(CONFIGS.read_text())["models"]}
    ratios = {}
    for name, n in (("llava-hf/llava-1.5-7b-hf", 576), ("llava-hf/llava-v1.6-mistral-7b-hf", 2340)):
        config = tmp_path / f"{n}.json"
        config.write_text(json.dumps(models[name]))
        result = run_cli("flops", "--config", config, "--visual-tokens", n, "--json")
        assert result.exit_code == 0, result.output
        data = json.loads(result.output)
        assert "freeze" in data["schedule"]
        ratios[n] = data["rows"][0]["ratio"]
    # LLaVA-1.5 (MHA): 3 full layers, 12 at 288+64 rows, 17 frozen (64 query rows, K/V for 352 rows) -> 2.57x.
    # LLaVA-NeXT (Mistral, 8 kv heads): 2 full, 14 at 1170+64, 16 frozen; GQA makes frozen K/V cheap -> 3.34x.
    assert ratios[576] == pytest.approx(2.572, abs=0.01)
    assert ratios[2340] == pytest.approx(3.340, abs=0.01)


@pytest.mark.parametrize("backbone", ["llava-1.5", "llava-next"])
def test_calibration_starts_from_the_paper_mode(backbone):
    adapter = get_adapter(backbone)
    visual = [1.0, 1.2, 1.1, 1.0, 0.9, 0.7, 0.8, 0.9, 1.0]
    # before the whole-cut probe the mode is the paper's (freeze), whatever the per-layer KL curve says
    loud = derive_schedule({"visual": visual, "kl_visual_update": [1e-2] * 8}, 8, adapter, {})[0]
    assert loud["ssr_mode"] == "freeze" and loud["ssr_ratio"] is None
    # a topk override on a backbone whose paper schedule is freeze gets HalfV's sigma, not an error
    forced, why = derive_schedule(None, 32, adapter, {"ssr_mode": "topk"})
    assert forced["ssr_ratio"] == 0.05 and why["ssr_mode"].by == "cli" and why["ssr_ratio"].why.startswith("HalfV's default")
    paper = derive_schedule(None, 32, adapter, {})[0]
    assert paper["ssr_mode"] == "freeze" and paper["ivr_layer"] == adapter.paper.ivr_layer == (3 if backbone == "llava-1.5" else 2)


@pytest.mark.slow
@pytest.mark.parametrize("backbone,fixture,size", [
    ("llava-1.5", None, None), ("llava-next", None, "112x336"),
    ("llava-1.5", "tiny_llava_dir", None), ("llava-next", "tiny_llava_next_dir", "224x112"),
])
def test_build_passes_its_parity_gates(backbone, fixture, size, request, run_cli, tmp_path):
    if (backbone, fixture, size) == ("llava-1.5", None, None):  # this very command, made once for the session
        built = request.getfixturevalue("llava_build")
    else:
        built = tmp_path / "b"
        args = ["build", "--backbone", backbone, "--paper-values", "--ssr-mode", "freeze", "--out", built]  # probe tested elsewhere
        if fixture:
            args += ["--model", request.getfixturevalue(fixture)]
        if size:
            args += ["--image-size", size]
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
    report = json.loads((built / "report.json").read_text())
    assert report["schedule"]["ssr_mode"] == "freeze"
    assert report["parity"]["kept_indices_match"] == 1.0 and report["parity"]["greedy_tokens_match"] == 1.0
    assert report["parity"]["logits_max_abs_diff"] <= 1e-3


# the modules allowed to name a backbone: the adapters themselves, and the CLI's help text and examples
NAMING_BACKBONES = {"graphs/llava.py", "graphs/qwen2_5_vl.py", "host/qwen.py", "host/builds.py", "cli/main.py"}


def test_pipeline_modules_do_not_name_backbones():
    root = Path(__file__).resolve().parents[1] / "halfv_export"
    modules = sorted(str(path.relative_to(root)) for path in root.rglob("*.py"))
    assert {"measure/vision_flops.py", "measure/report.py", "graphs/adapter.py"} <= set(modules)
    assert NAMING_BACKBONES <= set(modules)  # an exemption for a module that is gone would hide nothing
    for module in sorted(set(modules) - NAMING_BACKBONES):
        tree = ast.parse((root / module).read_text())
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
            n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | {
            n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        strings = [n.value for n in ast.walk(tree)
                   if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]
        named = [s for s in list(names) + strings if "qwen" in s.lower() or "llava" in s.lower()]
        assert not named, (module, named)


def test_vision_flops_follow_the_adapter_not_the_config_strings():
    """The tower's FLOPs model comes from the adapter of the config's model_type: configs that lack the keys a
    string switch would look at (a vision model_type, a window_size) are counted as before, and a model_type no
    adapter loads is refused, not guessed."""
    from halfv_export.base.errors import BadInput
    from halfv_export.measure.vision_flops import vision_flops

    models = {m["_model"]: m for m in json.loads(CONFIGS.read_text())["models"]}
    llava, qwen = models["llava-hf/llava-1.5-7b-hf"], models["Qwen/Qwen2.5-VL-7B-Instruct"]

    def without(config, key):
        return dict(config, vision_config={k: v for k, v in config["vision_config"].items() if k != key})

    assert vision_flops(without(llava, "model_type"), 4096, 576) == vision_flops(llava, 4096, 576)
    # no window_size: still the windowed tower, at the 112-px windows the published config also has
    assert qwen["vision_config"]["window_size"] == 112
    assert vision_flops(without(qwen, "window_size"), 3584, 4096) == vision_flops(qwen, 3584, 4096)
    assert vision_flops(qwen, 3584, 4096).windowed_attention > 0
    assert vision_flops(llava, 4096, 576).grid == (1, 577)  # one CLIP pass of 576 patches and the CLS row
    with pytest.raises(BadInput, match="model_type 'mystery_vl' has no vision FLOPs model"):
        vision_flops(dict(llava, model_type="mystery_vl"), 4096, 576)
