"""validate's task accuracy on a model that knows some answers, whatever the package ships: a checkpoint with the
embedded Qwen config is taught four digit-grid questions by the training script's own loss (teacher forcing), then
goes through calibrate -> export -> validate --data with a fifth question it never saw."""

import json
from pathlib import Path

import pytest
import torch

from halfv_export.tasks.digits import task_set, write_task_set
from halfv_export.graphs import get_adapter
from halfv_export.graphs.adapter import Processing

ROOT = Path(__file__).resolve().parents[1]
TAUGHT = 4


def _training_script():
    from halfv_export.training import train

    return train


@pytest.fixture(scope="module")
def taught(tmp_path_factory):
    train = _training_script()
    adapter = get_adapter("qwen2.5-vl")
    loaded = adapter.load(None, seed=3)  # seeded random weights, never the shipped ones
    samples = task_set(TAUGHT + 1, seed=77, split="eval", sizes=[(224, 224)])
    processing = Processing(loaded.tokenizer, loaded.image_processor, loaded.config)
    stack, eos = adapter.text_stack(loaded), loaded.tokenizer.eos_token_id
    prefix = train.answer_prefix(adapter, processing)
    taught = samples[:TAUGHT]
    host = adapter.host_inputs(processing, [s.image for s in taught], [s.prompt for s in taught])
    answer, answer_valid = train.answer_batch(processing, taught, prefix, eos, loaded.tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(loaded.model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    loaded.model.train()
    for _ in range(120):
        loss, token_acc = train.teacher_forced_loss(adapter, loaded, stack, host, answer, answer_valid)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loaded.model.eval()
    assert token_acc == 1.0, f"teaching did not converge (loss {loss.item():.3g})"
    root = tmp_path_factory.mktemp("taught")
    loaded.model.save_pretrained(root / "model")
    adapter.save_processing(loaded, root / "model")
    write_task_set(samples, root / "data", {"seed": 77, "split": "eval"})
    return root, samples


@pytest.mark.slow
def test_validate_scores_what_the_model_was_taught(taught, run_cli):
    root, samples = taught
    model, build, data = root / "model", root / "build", root / "data"
    for args in (("calibrate", "--backbone", "qwen2.5-vl", "--model", model, "--paper-values", "--out", build),
                 ("export", "--schedule", build / "schedule.json", "--model", model, "--image-size", "224x224",
                  "--out", build)):
        result = run_cli(*args)
        assert result.exit_code == 0, result.output
    ok = run_cli("validate", "--artifacts", build, "--model", model, "--data", data, "--fail-under",
                 "parity.greedy_tokens_match=1.0", "--fail-under", "accuracy.full=0.8")
    assert ok.exit_code == 0, ok.output
    report = json.loads((build / "report.json").read_text())
    acc = report["accuracy"]
    assert acc["count"] == TAUGHT + 1 and acc["full"] >= TAUGHT / (TAUGHT + 1)  # the four taught answers at least
    kinds = {s.type for s in samples}
    assert {k: v["count"] for k, v in acc["per_type"].items()} == {k: sum(s.type == k for s in samples) for k in kinds}
    for row in [acc] + list(acc["per_type"].values()):
        assert row["engine"] == row["halfv"]  # the engines answer exactly what eager HalfV answers (parity)
        if row["full"]:
            assert row["retention"] == pytest.approx(row["halfv"] / row["full"])
        else:  # a type only the untaught question has, answered wrong: no retention to speak of
            assert row["retention"] is None
    assert report["fidelity"]["weights"] == "checkpoint"
    assert "accuracy" in ok.output and f"full {acc['full']:.4f}" in ok.output
    limit = acc["retention"] + 0.01
    failing = run_cli("validate", "--artifacts", build, "--model", model, "--data", data,
                      "--fail-under", f"accuracy.retention={limit}")
    assert failing.exit_code == 1 and "accuracy.retention" in failing.output
