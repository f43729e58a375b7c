"""validate gates what users run: the prompt rows (padding included) that `load()` / `serve` build for a prompt, and
the eager reference sees the very same rows."""

import json

import numpy as np

import halfv_export
from halfv_export.engines.pipeline import EnginePipeline
from halfv_export.graphs.halfv import HalfVReference
from halfv_export.host.inputs import PAD_MULTIPLE

from .conftest import copy_build, make_image

PROMPTS = ["What is shown?", "Describe the colours in this picture, please, in one short sentence.",
           "Count the shapes.", "Is there any text in the image at all, or only shapes and colours?"]


def test_validate_gates_the_rows_and_logits_the_runtime_serves(exported, run_cli, tmp_path, monkeypatch):
    artifacts = copy_build(exported, tmp_path / "artifacts")
    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for i, prompt in enumerate(PROMPTS):  # prompts of different lengths: each batch of two pads one of them
        make_image(448, 448, i).save(data / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "prompt": prompt}))
    (data / "prompts.jsonl").write_text("\n".join(lines) + "\n")

    engine_rows, eager_rows = [], []
    real_prefill, real_eager = EnginePipeline.prefill, HalfVReference.prefill

    def engine_spy(self, host, halfv=True, prompt=None):
        state = real_prefill(self, host, halfv, prompt)
        if halfv and prompt is None and host.num_visual:
            engine_rows.append((host.input_ids.copy(), host.attention_mask.copy(), self.to_host(state.logits)))
        return state

    def eager_spy(self, inputs, *args, **kwargs):
        eager_rows.append(inputs.input_ids.numpy().copy())
        return real_eager(self, inputs, *args, **kwargs)

    monkeypatch.setattr(EnginePipeline, "prefill", engine_spy)
    monkeypatch.setattr(HalfVReference, "prefill", eager_spy)
    result = run_cli("validate", "--artifacts", artifacts, "--data", data, "--latency-runs", "1")
    monkeypatch.undo()
    assert result.exit_code == 0, result.output

    batched = [row for row in engine_rows if row[0].shape[0] == 2]
    assert len(batched) >= 2  # four prompts in batches of two (the parity prefill, then generate's)
    for ids, mask, _ in engine_rows:
        assert ids.shape[1] % PAD_MULTIPLE == 0
        assert any(e.shape == ids.shape and bool((e == ids).all()) for e in eager_rows)  # eager ran these rows

    # every prompt's gated logits and kept tokens are what load() computes for it alone (logits to float rounding:
    # ONNX Runtime may split a batch of two over its threads differently from a batch of one)
    model = halfv_export.load(artifacts)
    for i, prompt in enumerate(PROMPTS):
        image = make_image(448, 448, i)
        alone = model.start([image], [prompt], max_new_tokens=1)
        host = model.pipeline.host([image], [prompt])
        own_ids = host.input_ids[0][host.attention_mask[0] == 1].tolist()
        hits = [logits[b] for ids, mask, logits in batched for b in range(ids.shape[0])
                if ids[b][mask[b] == 1].tolist() == own_ids]
        assert hits, prompt
        for logits in hits:
            np.testing.assert_allclose(logits, alone.state.logits[0], rtol=0, atol=1e-4, err_msg=prompt)
