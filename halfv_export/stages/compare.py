"""compare(): HalfV against random / attention-only / IVR-without-SSR selection at HalfV's prefill FLOPs, over a
keep-ratio sweep (eager) -> compare.json, compare.md, accuracy_flops.png. With a vision cut (--vision-cut, or the
schedule's) every method runs on the cut tower's tokens."""

from __future__ import annotations

import json
from pathlib import Path

from ..base.atomic import prepare_out_dir, write_text_atomic
from ..base.data import load_data
from ..base.errors import BadInput
from ..calibration.schedule import paper_schedule, read_schedule, read_vision_cut
from ..graphs.adapter import get_adapter
from ..graphs.checkpoint import config_fingerprint
from ..graphs.pruning import VisionCut
from ..measure.compare import evaluate_methods, sweep_schedules
from ..measure.plots import accuracy_flops_plot
from .data import default_samples, trained_task
from .progress import ProgressCallback, Reporter, Stage

DEFAULT_KEEP_RATIOS = (0.1, 0.25, 0.5, 0.75)


def compare(backbone: str, out: Path, *, model: Path | None = None, data: Path | None = None,
            schedule: Path | None = None, keep_ratios: list[float] = DEFAULT_KEEP_RATIOS, seed: int = 0,
            random_weights: int | None = None, samples: int = 200, vision_cut: VisionCut | None = None,
            progress: ProgressCallback | None = None) -> dict:
    """-> compare.json as a dict. `schedule`: the base schedule whose keep ratio is swept (default: the paper's at
    this depth); `data`: questions with answers (default: `samples` of the embedded default's own task);
    `vision_cut`: cut the tower for every method (default: the schedule file's cut, if it has one)."""
    report = Reporter(Stage.COMPARE, progress)
    adapter = get_adapter(backbone)
    if vision_cut is None and schedule is not None:  # the schedule's own cut, read before the model is loaded
        vision_cut = read_vision_cut(read_schedule(schedule)[1], where=f"schedule {schedule}")
    if vision_cut is not None:  # from the config alone: before any weights are read or anything is written
        adapter.check_vision_cut(adapter.load_config(model, seed=random_weights)[0], vision_cut)
    out = prepare_out_dir(out)
    with report.status(f"loading {backbone}"):
        loaded = adapter.load(model, seed=random_weights)
    depth = adapter.text_stack(loaded).num_layers
    if schedule is not None:
        base, _ = read_schedule(schedule, backbone=adapter.name, fingerprint=config_fingerprint(loaded.config),
                                depth=depth)
        origin = str(schedule)
    else:
        base, origin = paper_schedule(adapter, depth), "paper values at this depth"
    data_samples = load_data(data) if data is not None else default_samples(loaded, samples, 1000, split="eval")
    if data_samples is None:
        raise BadInput("this model has no built-in task; pass --data DIR with answers (halfv-export make-task)")
    result = evaluate_methods(adapter, loaded, data_samples, sweep_schedules(base, list(keep_ratios)), seed=seed,
                              progress=report.tracker("comparing (eager)"), cut=vision_cut)
    result = {"backbone": backbone, "source": loaded.source, "weights": loaded.weights, "schedule_from": origin,
              "base_schedule": base.__dict__.copy(), "samples": result["full"]["count"],
              "data": str(data) if data is not None else f"digit {trained_task(loaded.meta)[0]} task, evaluation "
                                                          "scans (seed 1000)", **result}
    accuracy_flops_plot(result, f"{backbone} ({loaded.source}): accuracy vs prefill FLOPs, "
                        f"{result['samples']} held-out questions", out / "accuracy_flops.png")
    write_text_atomic(out / "compare.md", compare_markdown(result))
    write_text_atomic(out / "compare.json", json.dumps(result, indent=2) + "\n")
    return result


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def compare_markdown(result: dict) -> str:
    full = result["full"]["accuracy"]
    lines = [f"# {result['backbone']}: HalfV vs baselines at the same prefill FLOPs", "",
             f"{result['samples']} questions ({result['data']}), {result['weights']} weights ({result['source']}); "
             f"base schedule from {result['schedule_from']}: `{json.dumps(result['base_schedule'])}`. "
             f"Unpruned accuracy {_fmt(full)}.", "",
             "| keep ratio ρ | method | prefill FLOPs fraction | TTFT FLOPs fraction | accuracy | retention |",
             "|---|---|---|---|---|---|"]
    cut = result.get("vision_cut")
    if cut:
        kept = ", ".join(f"{n} -> {k}" for n, k in cut["kept"].items())
        lines[2:2] = [f"Every method runs on a vision cut after tower block {cut['block']} keeping {cut['keep']:g} of "
                      f"the tokens ({kept}); the unpruned model runs the whole tower.", ""]
    for point in result["points"]:
        for row in point["methods"].values():
            lines.append(f"| {point['keep_ratio']:g} | {row['label']} | {row['flops_fraction']:.3f} | "
                         f"{row['ttft_flops_fraction']:.3f} | {_fmt(row['accuracy'])} | {_fmt(row['retention'])} |")
    return "\n".join(lines) + "\n"
