"""Trained embedded defaults and task accuracy: the shipped weights load through the safe loader and answer held-out
questions; validate scores accuracy (full / eager HalfV / engine / retention, per type) and gates on it; compare
puts the baselines at HalfV's FLOPs."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from halfv_export.base.errors import BadInput
from halfv_export.tasks.digits import normalise_answer, task_set
from halfv_export.graphs import get_adapter
from halfv_export.graphs.adapter import EMBEDDED_WEIGHTS, read_training_record
from halfv_export.graphs.halfv import HalfVReference
from halfv_export.graphs.pruning import PruneSchedule
from halfv_export.measure.accuracy import cut_at_eos

BACKBONES = ["qwen2.5-vl", "llava-1.5", "llava-next"]
QUESTIONS = 24  # enough that at_least() asks for some right answers from a model at the shipped accuracy


def at_least(recorded: float, n: int) -> float:
    """Right answers out of n that a model with held-out accuracy `recorded` reaches but for bad luck: three binomial
    standard deviations below n * recorded."""
    return n * recorded - 3 * math.sqrt(n * recorded * (1 - recorded))


def _trained(backbone):
    adapter = get_adapter(backbone)
    if not (adapter.embedded_dir / EMBEDDED_WEIGHTS).exists():
        pytest.skip(f"{backbone}: no trained weights shipped")
    return adapter


@pytest.mark.parametrize("backbone", BACKBONES)
def test_shipped_weights_load_through_the_safe_loader(backbone, tmp_path):
    adapter = _trained(backbone)
    loaded = adapter.load(None)
    assert loaded.source == f"embedded:{backbone}:trained" and loaded.weights == "trained"
    record = read_training_record(adapter.embedded_dir)
    assert loaded.meta == record and record["image_sizes"] and 0 < record["held_out"]["accuracy"] <= 1
    assert record["held_out"]["count"] >= 100 and record["held_out"]["split"] == "eval"
    shipped = load_file(str(adapter.embedded_dir / EMBEDDED_WEIGHTS))
    assert {t.dtype for t in shipped.values()} == {torch.float16}
    def saved(model, directory):  # the names save_pretrained writes (the checkpoint convention, not state_dict's)
        half = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
        model.save_pretrained(directory, state_dict=half)
        return load_file(str(directory / EMBEDDED_WEIGHTS))

    again = saved(loaded.model, tmp_path / "trained")
    assert again.keys() == shipped.keys()
    for name, tensor in shipped.items():  # fp16 on disk, fp32 in memory, the same values
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=0)
    random = adapter.load(None, seed=0)
    assert random.weights == "random" and random.source.endswith(":seed=0")
    other = saved(random.model, tmp_path / "random")
    assert sum(not torch.equal(other[k], shipped[k]) for k in shipped) > len(shipped) // 2


def test_damaged_shipped_weights_are_refused(tmp_path, monkeypatch):
    adapter = _trained("qwen2.5-vl")
    copy = tmp_path / "embedded"
    shutil.copytree(adapter.embedded_dir, copy)
    weights = copy / EMBEDDED_WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    monkeypatch.setattr(type(adapter), "embedded_dir", copy)
    with pytest.raises(BadInput, match="truncated"):
        adapter.load(None)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_trained_model_answers_held_out_questions(backbone):
    """Behaviour, not plumbing: greedy answers of the unpruned eager model on 24 questions about evaluation scans it
    never saw (another seed than the training log's held-out set)."""
    adapter = _trained(backbone)
    loaded = adapter.load(None)
    sizes = [tuple(s) for s in loaded.meta["image_sizes"]]
    samples = task_set(24, seed=424242, split="eval", sizes=sizes[:1])
    stack = adapter.text_stack(loaded)
    inputs = adapter.prepare(loaded, [s.image for s in samples], [s.prompt for s in samples])
    eos = adapter.eos_token_ids(loaded)
    tokens = HalfVReference(stack, None).generate(inputs, 16, eos)
    answers = [adapter.decode_text(loaded, cut_at_eos(row, eos)) for row in tokens.tolist()]
    right = [normalise_answer(a) == normalise_answer(s.answer) for a, s in zip(answers, samples)]
    recorded = loaded.meta["held_out"]["accuracy"]
    assert sum(right) >= at_least(recorded, len(samples)), list(zip([s.prompt for s in samples], answers,
                                                                    [s.answer for s in samples]))
    random = adapter.load(None, seed=0)  # the same questions, the same machinery, no training
    tokens = HalfVReference(adapter.text_stack(random), None).generate(
        adapter.prepare(random, [s.image for s in samples], [s.prompt for s in samples]), 16, eos)
    guessed = [normalise_answer(adapter.decode_text(random, cut_at_eos(row, eos))) == normalise_answer(s.answer)
               for row, s in zip(tokens.tolist(), samples)]
    assert sum(guessed) < sum(right)


@pytest.fixture(scope="module")
def task_build(tmp_path_factory):
    """The trained Qwen default exported at its first trained bucket with the paper schedule, and a small
    evaluation set at that size."""
    from click.testing import CliRunner

    from halfv_export.cli.main import cli

    adapter = _trained("qwen2.5-vl")
    size = "x".join(str(v) for v in read_training_record(adapter.embedded_dir)["image_sizes"][0])
    root = tmp_path_factory.mktemp("task-build")
    runner = CliRunner()
    for args in (["calibrate", "--backbone", "qwen2.5-vl", "--paper-values", "--out", root / "b"],
                 ["export", "--schedule", root / "b" / "schedule.json", "--image-size", size, "--out", root / "b"],
                 ["make-task", "--backbone", "qwen2.5-vl", "--image-size", size, "--count", QUESTIONS, "--seed", 3,
                  "--out", root / "data"]):
        result = runner.invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    return root


def exact_match(answer: str, reference: str) -> bool:
    """The scoring README states, written out here: stripped, lower-case, whitespace collapsed, a trailing full stop
    dropped, then equal."""
    norm = lambda text: " ".join(text.strip().lower().rstrip(".").split())  # noqa: E731
    return norm(answer) == norm(reference)


@pytest.mark.slow
def test_validate_scores_accuracy_and_gates_on_retention(task_build, run_cli):
    build, data = task_build / "b", task_build / "data"
    adapter = get_adapter("qwen2.5-vl")
    recorded = read_training_record(adapter.embedded_dir)["held_out"]["accuracy"]
    floor = at_least(recorded, QUESTIONS) / QUESTIONS
    assert floor > 0  # a gate that can fail at this many questions
    ok = run_cli("validate", "--artifacts", build, "--data", data, "--fail-under", f"accuracy.full={floor}",
                 "--fail-under", "parity.greedy_tokens_match=1.0", "--latency-runs", 1)
    assert ok.exit_code == 0, ok.output
    report = json.loads((build / "report.json").read_text())
    acc = report["accuracy"]
    lines = [json.loads(x) for x in (data / "prompts.jsonl").read_text().splitlines()]
    assert acc["count"] == len(lines) == QUESTIONS
    # score the eager answers here: greedy tokens of validate's batches (pairs, in file order), cut at the first
    # end-of-sequence token, decoded and matched against the references
    loaded = adapter.load(None)
    stack, eos = adapter.text_stack(loaded), adapter.eos_token_ids(loaded)
    schedules = {"full": None, "halfv": PruneSchedule(**report["schedule"])}
    hits = {system: [] for system in schedules}
    for i in range(0, len(lines), 2):
        pair = lines[i:i + 2]
        inputs = adapter.prepare(loaded, [Image.open(data / x["image"]).convert("RGB") for x in pair],
                                 [x["prompt"] for x in pair])
        for system, schedule in schedules.items():
            rows = HalfVReference(stack, schedule).generate(inputs, report["parity"]["greedy_tokens"]).tolist()
            for row, line in zip(rows, pair):
                answer = row[:next((j for j, t in enumerate(row) if t in eos), len(row))]
                hits[system].append((line["type"], exact_match(adapter.decode_text(loaded, answer), line["answer"])))
    for system, scored in hits.items():
        assert acc[system] == pytest.approx(sum(ok for _, ok in scored) / len(scored)), system
        for kind, row in acc["per_type"].items():
            mine = [ok for t, ok in scored if t == kind]
            assert row["count"] == len(mine) and row[system] == pytest.approx(sum(mine) / len(mine)), (system, kind)
    assert set(acc["per_type"]) == {x["type"] for x in lines}
    assert acc["engine"] == acc["halfv"]  # the engines answer exactly what eager HalfV answers (parity)
    assert acc["retention"] == pytest.approx(acc["halfv"] / acc["full"])
    assert "Task accuracy" in (build / "report.md").read_text()
    limit = acc["retention"] + 0.01
    failing = run_cli("validate", "--artifacts", build, "--data", data, "--fail-under", f"accuracy.retention={limit}",
                      "--latency-runs", 1)
    assert failing.exit_code == 1 and f"accuracy.retention = {acc['retention']:.6g} is under {limit:g}" in failing.output


def test_a_gate_passes_at_its_limit_and_fails_past_it():
    """Gates on a constructed report: fail-under keeps a value equal to its limit, fail-over likewise."""
    from halfv_export.measure.report import check_thresholds

    report = {"accuracy": {"retention": 0.8, "full": 0.5}}
    assert check_thresholds(report, [("accuracy.retention", 0.8)], [("accuracy.full", 0.5)]) == []
    assert check_thresholds(report, [("accuracy.retention", 0.81)], []) == ["accuracy.retention = 0.8 is under 0.81"]
    assert check_thresholds(report, [], [("accuracy.full", 0.49)]) == ["accuracy.full = 0.5 is over 0.49"]


@pytest.mark.slow
def test_accuracy_gate_without_answers_says_what_is_missing(task_build, run_cli, tmp_path):
    lines = [json.loads(x) for x in (task_build / "data" / "prompts.jsonl").read_text().splitlines()][:2]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps({"image": str(task_build / "data" / x["image"]),
                                                                   "prompt": x["prompt"]}) for x in lines))
    result = run_cli("validate", "--artifacts", task_build / "b", "--data", tmp_path,
                     "--fail-under", "accuracy.retention=0.95")
    assert result.exit_code == 2 and "scored no answers" in result.output


@pytest.mark.slow
def test_compare_puts_baselines_at_halfvs_flops(task_build, run_cli, tmp_path):
    result = run_cli("compare", "--backbone", "qwen2.5-vl", "--data", task_build / "data", "--keep-ratio", 0.5,
                     "--out", tmp_path)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "compare.json").read_text())
    (point,) = doc["points"]
    assert set(point["methods"]) == {"halfv", "ivr", "attention", "random"}
    halfv = point["methods"]["halfv"]["flops_fraction"]
    for name, row in point["methods"].items():
        assert abs(row["flops_fraction"] - halfv) < 0.05, name  # the same budget, to one visual row
        assert row["count"] == QUESTIONS and 0 <= row["accuracy"] <= 1
    assert doc["full"]["count"] == QUESTIONS and (tmp_path / "accuracy_flops.png").stat().st_size > 10_000
    assert np.isclose(point["methods"]["halfv"]["retention"],
                      point["methods"]["halfv"]["accuracy"] / doc["full"]["accuracy"])


def test_schedules_sharing_a_keep_ratio_are_told_apart_by_label():
    """The schedule grid's use: several schedules at one rho in one call, the unpruned model run once; each scores
    exactly what it scores alone."""
    from halfv_export.graphs.pruning import PruneSchedule
    from halfv_export.measure.compare import evaluate_methods

    adapter = _trained("qwen2.5-vl")
    loaded = adapter.load(None)
    sizes = [tuple(s) for s in loaded.meta["image_sizes"]]
    samples = task_set(8, seed=5, split="eval", sizes=sizes[:1])
    schedules = [PruneSchedule(ivr_layer=1, keep_ratio=0.25, anchor_ratio=0.1, ssr_layer=l2, ssr_mode="freeze",
                               ssr_ratio=None) for l2 in (2, 6)]
    together = evaluate_methods(adapter, loaded, samples, schedules, methods=("halfv",), labels=["a", "b"])
    for schedule, point in zip(schedules, together["points"]):
        alone = evaluate_methods(adapter, loaded, samples, [schedule], methods=("halfv",))["points"][0]
        assert point["schedule"] == alone["schedule"] == schedule.__dict__
        assert point["methods"]["halfv"]["accuracy"] == alone["methods"]["halfv"]["accuracy"]
        assert point["methods"]["halfv"]["flops_fraction"] == alone["methods"]["halfv"]["flops_fraction"]
    fractions = [p["methods"]["halfv"]["flops_fraction"] for p in together["points"]]
    assert fractions[0] < fractions[1]  # freeze from layer 2 spends less than from layer 6: not one system twice
    with pytest.raises(ValueError, match="unique"):
        evaluate_methods(adapter, loaded, samples, schedules, methods=("halfv",))  # both would be "halfv@0.25"
