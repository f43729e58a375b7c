"""The schedule search (calibrate --target-ratio): the shared-prefix evaluation reproduces the eager prefill exactly,
the FLOPs pruning keeps only schedules that reach the target, the CLI records and plots the search, a target no
schedule reaches is refused before any model work, and validate puts the searched schedule beside the paper's."""

import json

import numpy as np

import pytest
import torch

from halfv_export.stages.data import default_samples
from halfv_export.calibration.search import (BATCH, candidate_grid, candidate_logits, held_out_check,
                                          make_budget, prune_grid, tokens)
from halfv_export.graphs.halfv import HalfVReference
from halfv_export.graphs.pruning import PruneSchedule
from halfv_export.measure.compare import bucket_batches
from halfv_export.measure.flops import LMShape, prefill_flops
from tests.conftest import EMBEDDED_KIND


def _inputs(adapter, loaded, count, split="train", seed=0, sizes=((224, 224),)):
    samples = default_samples(loaded, count, seed, split, sizes=list(sizes), any_size=True)
    if samples is None:
        pytest.skip("the embedded default has no task (no trained weights shipped)")
    return samples, [adapter.prepare(loaded, [s.image for s in b], [s.prompt for s in b])
                     for b in bucket_batches(adapter, loaded, samples, batch_size=3)]


SCHEDULES = [  # two share (L1, rho, alpha) and so a prefix; freeze and topk; SSR right after IVR and at the last layer
    PruneSchedule(1, 0.5, 0.25, 2, "freeze", None),
    PruneSchedule(1, 0.5, 0.25, 5, "topk", 0.1),
    PruneSchedule(1, 0.25, 0.1, 7, "topk", 0.05),
    PruneSchedule(3, 0.3, 0.5, 4, "topk", 0.02),
    PruneSchedule(2, 0.15, 0.1, 6, "freeze", None),
]


def test_shared_prefix_logits_equal_the_eager_prefill(qwen):
    adapter, loaded, stack = qwen
    _, batches = _inputs(adapter, loaded, 5)  # batches of 3 and 2, left-padded prompts of different lengths
    assert len(batches) == 2 and len({int(m.sum()) for m in batches[0].attention_mask}) > 1
    seen = set()
    for b, full_logits, i, logits in candidate_logits(stack, batches, SCHEDULES):
        assert torch.equal(full_logits, HalfVReference(stack, None).prefill(batches[b]).logits)
        assert torch.equal(logits, HalfVReference(stack, SCHEDULES[i]).prefill(batches[b]).logits), SCHEDULES[i]
        seen.add((b, i))
    assert seen == {(b, i) for b in range(2) for i in range(len(SCHEDULES))}


def _shape_and_budget(loaded, n=64, text=38, kind="prefill"):
    config = loaded.config.to_dict()
    shape = LMShape.from_config(config)
    return shape, make_budget(kind, config, shape, (224, 224), n, text)


def test_grid_pruning_keeps_the_frontier_of_what_reaches_the_target(qwen):
    _, loaded, _ = qwen
    shape, budget = _shape_and_budget(loaded)
    grid = candidate_grid(8, {})
    frontier, counts = prune_grid(grid, shape, budget, {64}, 2.0)
    assert counts["grid"] == len(grid) and 0 < counts["frontier"] == len(frontier) < counts["reach_target"] < len(grid)
    assert all(ratio >= 2.0 and abs(ratio - budget.ratio(shape, s)) < 1e-12 for s, ratio in frontier)
    structure = lambda s: (s.ivr_layer, s.anchor_ratio, s.ssr_layer, s.ssr_mode)  # noqa: E731
    keys = [(structure(s), tokens(s, 64)) for s, _ in frontier]
    assert len(set(keys)) == len(keys)  # one run per distinct computation
    for s, _ in frontier:  # nothing on the frontier keeps fewer tokens at both stages than another feasible member
        k1, _, k2 = tokens(s, 64)
        assert not any(structure(o) == structure(s) and tokens(o, 64)[0] >= k1 and tokens(o, 64)[2] >= k2
                       and tokens(o, 64) != tokens(s, 64) for o, _ in frontier)
    # every feasible grid schedule left out is the same computation as, or dominated by, a frontier member
    kept = {(structure(s), tokens(s, 64)) for s, _ in frontier}
    for s in grid:
        if min(tokens(s, 64)[0], tokens(s, 64)[2]) < 1 or budget.ratio(shape, s) < 2.0:
            continue
        k1, _, k2 = tokens(s, 64)
        assert any(st == structure(s) and t[0] >= k1 and t[2] >= k2 for st, t in kept), s
    # fields given on the command line hold
    fixed, _ = prune_grid(candidate_grid(8, {"ssr_mode": "topk", "ivr_layer": 2}), shape, budget, {64}, 1.5)
    assert fixed and all(s.ssr_mode == "topk" and s.ivr_layer == 2 for s, _ in fixed)
    # time to first token: the unpruned tower dilutes every ratio
    _, ttft = _shape_and_budget(loaded, kind="ttft")
    assert ttft.vision > 0 and all(ttft.ratio(shape, s) < budget.ratio(shape, s) for s, _ in frontier[:10])


def test_calibrate_target_ratio_records_and_plots_the_search(run_cli, tmp_path):
    if EMBEDDED_KIND != "trained":
        pytest.skip("the search's accuracy step needs the trained default's task")
    result = run_cli("calibrate", "--backbone", "qwen2.5-vl", "--target-ratio", 2, "--samples", 12,
                     "--out", tmp_path)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "schedule.json").read_text())
    search = doc["search"]
    chosen = search["log"][search["chosen"]]
    assert chosen["role"] == "candidate" and chosen["ratio"] >= 2 and search["target_ratio"] == 2
    assert {k: chosen[k] for k in doc["schedule"]} == doc["schedule"]
    assert all(why["by"] == "search" for key, why in doc["chosen_by"].items()
               if not (key == "ssr_ratio" and doc["schedule"]["ssr_mode"] == "freeze"))
    assert search["samples"] == search["samples_with_answers"] == 12 and search["bucket"] == [224, 224]
    # the accuracy step re-ranked the lowest-KL shortlist; the winner is its most accurate member
    shortlist = [search["log"][i] for i in search["shortlist"]]
    assert search["chosen"] in search["shortlist"] and len(shortlist) == min(8, search["counts"]["frontier"])
    assert chosen["accuracy"] == max(e["accuracy"] for e in shortlist)
    assert max(e["kl_mean"] for e in shortlist) <= min(e["kl_mean"] for e in search["log"]
                                                       if e["role"] == "candidate" and e not in shortlist)
    roles = {e["role"] for e in search["log"]}
    assert roles == {"candidate", "paper", "rules"} and len(search["log"]) == search["counts"]["frontier"] + 2
    front = [search["log"][i] for i in search["pareto"]]
    assert [e["ratio"] for e in front] == sorted(e["ratio"] for e in front) and chosen["kl_mean"] >= min(
        e["kl_mean"] for e in front)
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "tme.png").exists()
    assert "FLOPs ratio" in result.output and "pareto.png" in result.output


def test_unreachable_target_is_refused_before_the_probes(run_cli, tmp_path, monkeypatch):
    import halfv_export.stages.calibrate as stage

    def no_probes(*args, **kwargs):
        raise AssertionError("the probes ran before the target was checked")

    monkeypatch.setattr(stage, "measure_probes", no_probes)
    result = run_cli("calibrate", "--backbone", "qwen2.5-vl", "--target-ratio", 3, "--samples", 2,
                     "--out", tmp_path / "out")
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    line = errors[0]
    assert "no schedule reaches a prefill FLOPs ratio of 3 at 224x224" in line
    assert "the most any schedule of the grid reaches is" in line and "--bucket" in line
    assert not (tmp_path / "out" / "schedule.json").exists()
    for args, message in ((["--paper-values"], "pass one of them"), (["--bucket", "230x230"], "use --bucket 224x224"),
                          (["--bucket", "big"], "HEIGHTxWIDTH")):
        result = run_cli("calibrate", "--backbone", "qwen2.5-vl", "--target-ratio", 2, *args, "--out", tmp_path / "x")
        assert result.exit_code == 2 and message in result.output, result.output
    result = run_cli("calibrate", "--backbone", "qwen2.5-vl", "--target-ratio", 1, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "must be above 1" in result.output
    result = run_cli("calibrate", "--backbone", "qwen2.5-vl", "--bucket", "224x224", "--out", tmp_path / "y")
    assert result.exit_code == 2 and "add --target-ratio R or drop --bucket" in result.output


def test_held_out_check_puts_the_paper_schedule_beside_the_searched_one(qwen):
    adapter, loaded, stack = qwen
    samples, _ = _inputs(adapter, loaded, 4, split="eval", seed=1000)
    searched = SCHEDULES[0]
    search = {"ratio_kind": "prefill", "bucket": [224, 224], "visual_tokens": 64, "target_ratio": 2.0}
    check = held_out_check(adapter, loaded, samples, searched, search)
    assert check["samples"] == 4 and check["searched"]["schedule"]["ssr_mode"] == "freeze"
    paper = PruneSchedule(**check["paper"]["schedule"])
    assert paper == PruneSchedule(1, 0.25, 0.1, 6, "topk", 0.05)  # the paper's values at depth 8
    (batch,) = bucket_batches(adapter, loaded, samples, BATCH)
    inputs = adapter.prepare(loaded, [s.image for s in batch], [s.prompt for s in batch])
    eos = adapter.eos_token_ids(loaded)
    # new tokens: the longest reference answer, its end-of-sequence token and one spare
    budget = max(len(loaded.tokenizer.encode(" " + s.answer, add_special_tokens=False)) for s in batch) + 2
    text_rows = round(float((inputs.attention_mask.sum(1) - inputs.num_visual).float().mean()))
    shape = LMShape.from_config(loaded.config.to_dict())

    def accuracy(schedule):  # exact match after the normalisation README states
        norm = lambda text: " ".join(text.strip().lower().rstrip(".").split())  # noqa: E731
        right = 0
        for row, sample in zip(HalfVReference(stack, schedule).generate(inputs, budget).tolist(), batch):
            answer = loaded.tokenizer.decode(row[:next((j for j, t in enumerate(row) if t in eos), len(row))],
                                             skip_special_tokens=True)
            right += norm(answer) == norm(sample.answer)
        return right / len(batch)

    full = HalfVReference(stack, None).prefill(inputs).logits.double()
    assert check["full_accuracy"] == accuracy(None)
    for name, schedule in (("searched", searched), ("paper", paper)):
        row = check[name]
        cut = HalfVReference(stack, schedule).prefill(inputs).logits.double()
        assert row["top1_agreement"] == (cut.argmax(-1) == full.argmax(-1)).double().mean().item()
        p, q = full.log_softmax(-1), cut.log_softmax(-1)  # KL(unpruned || pruned) of the last token
        assert row["kl_mean"] == pytest.approx((p.exp() * (p - q)).sum(-1).mean().item(), rel=1e-6)
        assert row["accuracy"] == accuracy(schedule)
        flops = prefill_flops(shape, inputs.num_visual, text_rows, schedule)
        assert row["ratio"] == round(flops.full / flops.halfv, 4)
    # at 224x224 the searched freeze schedule (K1 = 32 from layer 1, frozen from 2) prunes more than the paper's
    assert check["searched"]["ratio"] > check["paper"]["ratio"] > 1 and check["paper_ratio_at_most_searched"]


@pytest.mark.slow
def test_build_target_ratio_validates_against_the_paper_schedule(run_cli, tiny_qwen_dir, tmp_path):
    out = tmp_path / "build"
    result = run_cli("build", "--backbone", "qwen2.5-vl", "--model", tiny_qwen_dir, "--image-size", "252x336",
                     "--target-ratio", 1.5, "--latency-runs", 1, "--out", out)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "schedule.json").read_text())
    assert doc["search"]["bucket"] == [252, 336] and doc["search"]["samples_with_answers"] == 0
    assert doc["search"]["objective"].startswith("lowest mean KL")  # synthetic data: no answers, fidelity decides
    report = json.loads((out / "report.json").read_text())
    check = report["search_check"]
    assert check["searched"]["schedule"] == report["schedule"] == doc["schedule"]
    assert check["searched"]["ratio"] >= 1.5 and check["searched"]["accuracy"] is None
    assert "Searched schedule vs the paper's, held out" in (out / "report.md").read_text()
    assert "paper schedule (held out, eager)" in result.output
    # text-only data has nothing to prune: validate still runs, without the searched-vs-paper check
    (tmp_path / "plain.jsonl").write_text(json.dumps({"image": None, "prompt": "Tell me about circles."}) + "\n")
    result = run_cli("validate", "--artifacts", out, "--data", tmp_path / "plain.jsonl", "--latency-runs", 1)
    assert result.exit_code == 0, result.output
    assert "search_check" not in json.loads((out / "report.json").read_text())


def test_a_ttft_search_pairs_schedules_with_vision_cuts(run_cli, qwen, tmp_path):
    # beyond the paper: --ratio-kind ttft on Qwen searches the tower's cuts with the LLM schedule. A target no
    # LLM-only schedule reaches at 224x224 is met by a cut; the chosen cut goes into schedule.json for export, and a
    # cut candidate's fidelity is the eager reference's own, recomputed here sample by sample on the cut's rows
    # against the uncut unpruned model
    from halfv_export.graphs.halfv import HalfVReference
    from halfv_export.graphs.pruning import PruneSchedule, VisionCut
    from halfv_export.graphs.tme import kl_last_token
    from halfv_export.stages.data import default_samples

    adapter, loaded, stack = qwen
    result = run_cli("calibrate", "--backbone", "qwen2.5-vl", "--target-ratio", 1.6, "--ratio-kind", "ttft",
                     "--samples", 4, "--no-kl-probe", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "schedule.json").read_text())
    search = doc["search"]
    chosen = search["log"][search["chosen"]]
    candidates = [e for e in search["log"] if e["role"] == "candidate"]
    assert all(e["vision_cut"] is not None for e in candidates)  # LLM-only tops out below 1.6 at 64 tokens
    assert {e["vision_cut"]["keep"] for e in candidates} <= {0.25, 0.5, 0.75} and search["counts"]["vision_cuts"] == 4
    assert doc["vision_cut"] == chosen["vision_cut"] == search["vision_cut"] and chosen["ratio"] >= 1.6
    assert doc["chosen_by"]["vision_cut"]["by"] == "search"
    entry = max(candidates, key=lambda e: e["kl_mean"])
    cut, schedule = VisionCut(**entry["vision_cut"]), PruneSchedule(**{k: entry[k] for k in doc["schedule"]})
    samples = default_samples(loaded, 4, 0, split="train", sizes=[(224, 224)], any_size=True)
    kls = []
    for s in samples:
        full = HalfVReference(stack, None).prefill(adapter.prepare(loaded, [s.image], [s.prompt])).logits
        pruned = HalfVReference(stack, schedule).prefill(adapter.prepare(loaded, [s.image], [s.prompt], cut)).logits
        kls.append(float(kl_last_token(full, pruned)[0]))
    assert entry["kl_mean"] == pytest.approx(np.mean(kls), rel=1e-4, abs=1e-6)
    # its ratio by hand: the whole tower and all N tokens over the cut tower and the schedule on K tokens
    from halfv_export.measure.vision_flops import vision_flops

    config = loaded.config.to_dict()
    shape = LMShape.from_config(config)
    n, text = search["visual_tokens"], search["text_tokens"]
    full = vision_flops(config, shape.hidden, n, (8, 8)).total + prefill_flops(shape, n, text, None).full
    halfv = (vision_flops(config, shape.hidden, n, (8, 8), cut).total
             + prefill_flops(shape, cut.tokens(n), text, schedule).halfv)
    assert entry["ratio"] == pytest.approx(full / halfv, abs=1e-4)
    shortlist = [search["log"][i] for i in search["shortlist"]]  # answers re-rank the shortlist, across cuts
    assert chosen["accuracy"] == max(e["accuracy"] for e in shortlist) and search["vision_keeps"] == [0.25, 0.5, 0.75]
    # a cut given on the command line is held fixed, for a prefill ratio too (the LLM on the K kept tokens)
    fixed = run_cli("calibrate", "--backbone", "qwen2.5-vl", "--target-ratio", 2.5, "--vision-cut", "1:0.5",
                    "--samples", 4, "--no-kl-probe", "--out", tmp_path / "fixed")
    assert fixed.exit_code == 0, fixed.output
    doc = json.loads((tmp_path / "fixed" / "schedule.json").read_text())
    assert {str(e["vision_cut"]) for e in doc["search"]["log"] if e["role"] == "candidate"} == {str({"block": 1, "keep": 0.5})}
    assert doc["vision_cut"] == {"block": 1, "keep": 0.5} and doc["chosen_by"]["vision_cut"]["by"] == "cli"
    assert doc["search"]["vision_keeps"] is None and "vision cut after tower block 1 keeping 0.5" in fixed.output
