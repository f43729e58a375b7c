"""The generic graph code reads decoder layers only through the adapter's LayerMaths hook, and head_dim as the layers
use it. Proven with backbone variants built only here: a LLaVA whose Llama layers have head_dim != hidden / heads,
and a LLaVA whose language model is Qwen3 (q/k RMSNorms inside attention), each against HF's own layers."""

import json

import numpy as np
import pytest
import torch

from halfv_export.graphs import get_adapter
from halfv_export.graphs.adapter import LayerMaths, LoadedModel
from halfv_export.graphs.checkpoint import seeded_model
from halfv_export.graphs.export_forward import PrefillGraph
from halfv_export.graphs.halfv import HalfVReference
from halfv_export.graphs.pruning import PruneSchedule
from halfv_export.graphs.specs import prefill_spec
from tests.conftest import make_image

SCHEDULE = PruneSchedule(ivr_layer=1, keep_ratio=0.5, anchor_ratio=0.25, ssr_layer=3, ssr_mode="topk", ssr_ratio=0.1)


class QKNormMaths(LayerMaths):
    """Qwen3-style attention: an RMSNorm over each head's queries and keys before RoPE."""

    def queries(self, layer, x, heads, head_dim):
        a = layer.self_attn
        return a.q_norm(a.q_proj(x).view(x.shape[0], x.shape[1], heads, head_dim)).transpose(1, 2)

    def keys(self, layer, x, kv_heads, head_dim):
        a = layer.self_attn
        return a.k_norm(a.k_proj(x).view(x.shape[0], x.shape[1], kv_heads, head_dim)).transpose(1, 2)


def llava_variant(text: dict, maths: LayerMaths | None = None):
    """The embedded LLaVA-1.5 with its language model replaced per `text` (random weights, embedded tokenizer)."""
    adapter = get_adapter("llava-1.5")
    cfg = json.loads((adapter.embedded_dir / "config.json").read_text())
    cfg["text_config"] = {**cfg["text_config"], **text}
    config = adapter.config_class(**cfg)
    model = seeded_model(adapter.model_class, config, seed=3)
    proc = adapter.load_processing(adapter.embedded_dir, config=config)
    loaded = LoadedModel(model=model, tokenizer=proc.tokenizer, image_processor=proc.image_processor, source="test")
    stack = adapter.text_stack(loaded)
    if maths is not None:
        stack.maths = maths
    return adapter, loaded, stack


def inputs_for(adapter, loaded):
    images = [make_image(224, 224, 1), make_image(224, 224, 2)]
    return adapter.prepare(loaded, images, ["What is in the image?", "Describe the colours and the shapes."])


def graph_vs_reference(stack, inputs):
    graph = PrefillGraph(stack, SCHEDULE, inputs.num_visual).eval()
    with torch.no_grad():
        out = graph(inputs.embeds, inputs.attention_mask, inputs.positions, inputs.visual_start)
    ref = HalfVReference(stack, SCHEDULE).prefill(inputs)
    return out, ref


HEAD_DIM_VARIANT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=24)
QWEN3_VARIANT = dict(HEAD_DIM_VARIANT, model_type="qwen3", head_dim=16)


def test_head_dim_is_read_as_the_layers_use_it():
    adapter, loaded, stack = llava_variant(HEAD_DIM_VARIANT)
    assert stack.head_dim == 24 != 64 // 4
    inputs = inputs_for(adapter, loaded)
    out, ref = graph_vs_reference(stack, inputs)
    np.testing.assert_allclose(out[0].numpy(), ref.logits.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(out[1].numpy(), ref.kept["ivr"].numpy())
    np.testing.assert_array_equal(out[2].numpy(), ref.kept["ssr"].numpy())
    assert out[3].shape[-1] == 24  # present_key_0 [B, G, S, hd]


def test_qk_norm_layers_go_through_the_adapter_hook():
    adapter, loaded, stack = llava_variant(QWEN3_VARIANT, QKNormMaths())
    assert hasattr(stack.layers[0].self_attn, "q_norm")
    inputs = inputs_for(adapter, loaded)
    out, ref = graph_vs_reference(stack, inputs)
    np.testing.assert_allclose(out[0].numpy(), ref.logits.numpy(), atol=1e-5, rtol=1e-5)
    for index, stage in ((1, "ivr"), (2, "ssr")):
        np.testing.assert_array_equal(out[index].numpy(), ref.kept[stage].numpy())
    # the hook is what makes it right: the Llama-layout maths on the same layers give other logits
    stack.maths = LayerMaths()
    plain, _ = graph_vs_reference(stack, inputs)
    assert np.abs(plain[0].numpy() - ref.logits.numpy()).max() > 1e-3


def test_qk_norm_variant_exports_and_runs_in_onnx_runtime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    adapter, loaded, stack = llava_variant(QWEN3_VARIANT, QKNormMaths())
    inputs = inputs_for(adapter, loaded)
    path = prefill_spec(stack, SCHEDULE, inputs.num_visual, label="variant").export(tmp_path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, kept_ivr, kept_ssr = session.run(["logits", "kept_ivr", "kept_ssr"], {
        "embeds": inputs.embeds.numpy(), "attention_mask": inputs.attention_mask.numpy(),
        "positions": inputs.positions.numpy(), "visual_start": inputs.visual_start.numpy()})
    ref = HalfVReference(stack, SCHEDULE).prefill(inputs)
    np.testing.assert_allclose(logits, ref.logits.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(kept_ivr, ref.kept["ivr"].numpy())
    np.testing.assert_array_equal(kept_ssr, ref.kept["ssr"].numpy())
