"""validate(): the engines against the eager PyTorch reference -> report.json / report.md / latency.png / kept.png,
and the thresholds that make it a CI gate."""

from __future__ import annotations

import json
from pathlib import Path

from ..base.data import load_data
from ..base.errors import BadInput
from ..base.manifest import write_manifest
from ..engines import DEFAULT_TARGET
from ..engines.api import open_pipeline
from ..graphs.pruning import PruneSchedule
from ..measure.report import (LATENCY_RUNS, build_cut, check_thresholds, held_out_samples, measure_latency,
                              run_validation, write_report)
from .data import default_samples, task_kind
from .export import load_for_source
from .progress import ProgressCallback, Reporter, Stage
from .results import Report

# the gates `build` applies to an fp32 build: exact parity with the eager reference
DEFAULT_GATES_UNDER = (("parity.selection_valid", 1.0), ("parity.greedy_tokens_match", 1.0))
DEFAULT_GATES_OVER = (("parity.logits_max_abs_diff", 1e-3),)


def validate(artifacts: Path, *, data: Path | None = None, model: Path | None = None,
             fail_under: list | tuple = (), fail_over: list | tuple = (), target: str = DEFAULT_TARGET,
             latency_runs: int | None = None, baselines: bool = False, weights: str | None = None,
             progress: ProgressCallback | None = None) -> Report:
    """-> Report: parity, fidelity, latency and FLOPs of the engines in `artifacts`; task accuracy when the samples
    carry answers (`data`: a make-task folder or prompts.jsonl; default: the embedded default's own task, else
    synthetic held-out images); with `baselines`, the eager ablation baselines at HalfV's FLOPs on the same
    samples. `fail_under` / `fail_over`: (metric, value) pairs, e.g. ("accuracy.retention", 0.95); the ones that
    fail are in `Report.failures` (nothing is raised: the caller decides)."""
    report_progress = Reporter(Stage.VALIDATE, progress)
    pipeline = open_pipeline(artifacts, target)
    meta, adapter = pipeline.meta, pipeline.adapter
    with report_progress.status("loading the eager reference"):
        loaded = load_for_source(adapter, meta["source"], model)
    schedule = PruneSchedule(**meta["schedule"])
    buckets = [tuple(b["size"]) for b in meta["buckets"]]
    # without data: the embedded default's own task, at least 32 answers (a standard error near 0.08 at most)
    samples = (load_data(data) if data is not None
               else default_samples(loaded, max(32, 8 * len(buckets)), 1000, split="eval", sizes=buckets)
               or held_out_samples(buckets))
    answered = any(s.answer is not None for s in samples)
    if baselines and not answered:
        raise BadInput("--baselines needs data with answers; pass --data DIR written by `halfv-export make-task`")
    # a checkpoint folder may hold random weights too (tools/shaped_checkpoint.py): say where they came from only
    weights = weights or {"random": "random", "trained": "trained"}.get(loaded.weights, "checkpoint")
    pictures: list = []
    report = run_validation(pipeline, loaded, samples, schedule, weights, pictures=pictures,
                            progress=report_progress.tracker("validating (parity, fidelity)"))
    with report_progress.status("measuring latency"):
        largest = max(buckets, key=lambda b: b[0] * b[1])
        # timed on a question of the evaluated task where there is one at the largest bucket (its prompt length)
        timed_sample = next((s for s in samples if s.image is not None and s.answer is not None
                             and (s.image.height, s.image.width) == largest), None)
        latency, flops = measure_latency(pipeline, loaded, timed_sample or held_out_samples([largest], 1, seed=2000)[0],
                                         schedule, runs=latency_runs or LATENCY_RUNS)
    if baselines:
        from ..measure.compare import evaluate_methods

        with report_progress.status("baselines at the same FLOPs (eager)"):
            # a cut build's baselines select inside the LLM from the same cut rows as its HalfV (measure.compare)
            result = evaluate_methods(adapter, loaded, samples, [schedule], cut=build_cut(pipeline))
        report["baselines"] = {"layer": schedule.ivr_layer, "full_accuracy": result["full"]["accuracy"],
                               "methods": result["points"][0]["methods"], "vision_cut": result["vision_cut"]}
    schedule_file = Path(artifacts) / "schedule.json"
    schedule_doc = json.loads(schedule_file.read_text()) if schedule_file.exists() else {}
    with_images = [s for s in samples if s.image is not None]
    if schedule_doc.get("search") and with_images:  # pruning needs images; text-only data has nothing to compare
        from ..calibration.search import held_out_check

        report["search_check"] = held_out_check(adapter, loaded, with_images, schedule, schedule_doc["search"],
                                                progress=report_progress.tracker("searched vs paper schedule (eager)"))
    task = task_kind(data, loaded) if answered else None
    report = {"backbone": meta["backbone"], "source": meta["source"], "schedule": meta["schedule"],
              "vision_cut": meta.get("vision_cut"),
              "precision": meta.get("precision", "fp32"), "quantize": meta.get("quantize"),
              "buckets": [f"{h}x{w}" for h, w in buckets], "device": pipeline.runner.describe(), **report,
              **({"task": task} if task else {}), "latency_ms": latency, "flops": flops}
    failures = check_thresholds(report, list(fail_under), list(fail_over))
    report["thresholds"] = {"fail_under": dict(fail_under), "fail_over": dict(fail_over), "failures": failures}
    write_report(Path(artifacts), report)
    draw_kept(pipeline, pictures, Path(artifacts) / "kept.png")
    write_manifest(artifacts, verified=pipeline.verified)
    return Report(Path(artifacts), report, failures)


def draw_kept(pipeline, pictures: list, path: Path) -> None:
    """kept.png: what the engine kept on the first validated images, where the backbone maps its visual rows to
    image boxes (not LLaVA-NeXT's anyres tiles)."""
    from ..measure.plots import kept_tokens_plot

    items = []
    for image, bucket, kept, sample in pictures:
        boxes = pipeline.adapter.token_boxes(pipeline.processing, bucket)
        if boxes is None or not kept:
            continue
        answer = f" | answer {sample.answer}" if sample.answer is not None else ""
        counts = ", ".join(f"{stage} {len(k)}" for stage, k in kept.items())
        items.append((image, boxes, kept, f"{sample.prompt}{answer}\n{len(boxes)} tokens, kept {counts}"))
    if items:
        kept_tokens_plot(items, path)
