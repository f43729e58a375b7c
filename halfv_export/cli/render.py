"""What the CLI draws from the library's results and progress events: rich progress bars on stderr, the summary
lines and tables. Nothing here measures; it formats what the stages return (at most the ratio of two returned
timings)."""

from __future__ import annotations

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..base.kinds import SSRMode
from ..calibration.schedule import MOVED
from ..stages.progress import ProgressEvent

console = Console(stderr=True)


class RichProgress:
    """A ProgressCallback that draws one bar per task (a pulsing bar while the total is unknown; a step that never
    counts is removed when it ends) and prints the stage's messages above the bars."""

    def __enter__(self) -> "RichProgress":
        self.bars = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), console=console, transient=False)
        self.bars.start()
        self.ids: dict = {}
        return self

    def __exit__(self, *exc) -> None:
        self.bars.stop()

    def __call__(self, event: ProgressEvent) -> None:
        if event.message is not None:
            self.bars.console.print(event.message, markup=False, highlight=False)
            return
        key = (event.stage, event.task)
        if event.finished:
            task = self.ids.pop(key, None)
            if task is None:
                return
            total = next(bar.total for bar in self.bars.tasks if bar.id == task)
            if total is None:  # a step without a count (loading, hashing) leaves no line behind, as a spinner would
                self.bars.remove_task(task)
            else:
                self.bars.update(task, completed=total, description=event.task)
            return
        if key not in self.ids:
            self.ids[key] = self.bars.add_task(event.task, total=event.total)
        self.bars.update(self.ids[key], total=event.total, completed=event.done or 0,
                         description=event.detail or event.task)


def num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def with_stderr(accuracy: dict, system: str) -> str:
    value, err = accuracy.get(system), (accuracy.get("stderr") or {}).get(system)
    return num(value) if value is None or err is None else f"{value:.3f} ± {err:.3f}"


def kept_text(parity: dict) -> str:
    """Exact kept-index agreement, and the near-tie verdict when some kept set differs."""
    if "kept_indices_match" not in parity:
        return "not measured"
    text = f"{parity['kept_indices_match']:.4f}"
    if parity.get("selection_differs"):
        text += (f" (selection_valid {parity['selection_valid']:.4f}: {parity['selection_differs']} sample(s) broke "
                 f"a tie the other way, shortfall <= {parity['selection_shortfall_max']:.2g})")
    return text


def layer_fallbacks(calibration, err: bool = False) -> None:
    """One line per layer the TME rules could not place (no turn of the curve), naming the measured alternative."""
    for field, why in calibration.unplaced().items():
        value = getattr(calibration.schedule, field)
        whose = ("L1 + 1 (the paper's was not below IVR's layer)" if calibration.chosen_by[field].why.endswith(MOVED)
                 else "the paper's")
        click.echo(f"note: {field} {value} is {whose}: no {why}; --target-ratio R picks the layers by measurement "
                   "instead", err=err)


def calibration_summary(calibration) -> None:
    click.echo(f"schedule: {calibration.describe()}")
    layer_fallbacks(calibration)
    search = calibration.search
    if search:
        chosen = search["log"][search["chosen"]]
        click.echo(f"search: {search['ratio_kind']} FLOPs ratio {chosen['ratio']:.2f} (target "
                   f"{search['target_ratio']:g}), mean KL {chosen['kl_mean']:.4g}, top-1 agreement "
                   f"{chosen['top1_agreement']:.3f}" + (f", accuracy {chosen['accuracy']:.3f}"
                                                        if chosen.get("accuracy") is not None else "")
                   + f"; {len(search['log'])} schedules run in {search['seconds']:.0f} s")
    curves = (calibration.document.get("calibration") or {}).get("curves") or {}
    tower_png = f", {calibration.out / 'tme_tower.png'}" if curves.get("tower") else ""  # tme_plot draws it
    if search:
        click.echo(f"wrote {calibration.path}, {calibration.out / 'tme.png'}{tower_png} and "
                   f"{calibration.out / 'pareto.png'}")
    else:
        click.echo(f"wrote {calibration.path}" + (f", {calibration.out / 'tme.png'}{tower_png}"
                                                   if calibration.document.get("calibration") else ""))
    if curves.get("tower"):
        click.echo("vision tower TME per block (beyond the paper; a --vision-cut may follow block "
                   f"{', '.join(map(str, curves['tower_cut_blocks']))}): "
                   + " ".join(f"{v:.3f}" for v in curves["tower"]))


def validation_summary(report: dict) -> None:
    p, lat = report["parity"], report["latency_ms"]
    click.echo(f"kept_indices_match {kept_text(p)}  logits_max_abs_diff {p['logits_max_abs_diff']:.3g}"
               f"  greedy_tokens_match {p['greedy_tokens_match']:.4f}  top1_agreement "
               f"{report['fidelity']['top1_agreement']:.4f} ({report['fidelity']['weights']} weights)")
    if report.get("quantize"):
        click.echo(f"quantised {report['quantize']['scheme']} vs the fp32 eager reference: logits cosine min "
                   f"{p['logits_cosine_min']:.4f} mean {p['logits_cosine_mean']:.4f}, first-token top-1 agreement "
                   f"{p['top1_agreement']:.4f}, greedy token agreement {p['greedy_token_agreement']:.4f}")
    if report.get("accuracy"):
        a = report["accuracy"]
        click.echo(f"accuracy ({a['count']} answers): full {num(a.get('full'))}  halfv {num(a.get('halfv'))}  "
                   f"engine {num(a.get('engine'))}  retention {num(a.get('retention'))}")
    for row in (report.get("baselines") or {}).get("methods", {}).values():
        click.echo(f"  {row['label']}: accuracy {num(row['accuracy'])} at FLOPs fraction {row['flops_fraction']:.3f}")
    check = report.get("search_check")
    if check:
        for name in ("searched", "paper"):
            row = check[name]
            click.echo(f"{name} schedule (held out, eager): FLOPs ratio {row['ratio']:.2f}, KL {row['kl_mean']:.4g}, "
                       f"top-1 agreement {row['top1_agreement']:.3f}, accuracy {num(row.get('accuracy'))}")
    click.echo(f"prefill ms: engine full {lat['engine_full_prefill']:.1f} / HalfV {lat['engine_halfv_prefill']:.1f};"
               f" eager full {lat['eager_full_prefill']:.1f} / HalfV {lat['eager_halfv_prefill']:.1f};"
               f" FLOPs ratio {report['flops']['ratio']:.2f}")


def build_table(meta: dict, report: dict) -> None:
    from rich.table import Table

    table = Table(title="halfv-export build")
    table.add_column("metric")
    table.add_column("value", justify="right")
    s = meta["schedule"]
    ssr_keep = f" keep {s['ssr_ratio']}" if s["ssr_mode"] == SSRMode.TOPK else ""
    table.add_row("schedule", f"IVR@{s['ivr_layer']} keep {s['keep_ratio']} anchors {s['anchor_ratio']} | "
                              f"SSR {s['ssr_mode']}@{s['ssr_layer']}{ssr_keep}")
    for b in meta["buckets"]:
        cut = f" -> cut {b['kept_visual']}" if meta.get("vision_cut") else ""
        table.add_row(f"bucket {b['size'][0]}x{b['size'][1]}", f"N {b['num_visual']}{cut} -> {b['k1']} -> {b['k2']}")
    p, lat = report["parity"], report["latency_ms"]
    table.add_row("kept_indices_match", kept_text(p))
    table.add_row("logits_max_abs_diff", f"{p['logits_max_abs_diff']:.2e}")
    table.add_row("greedy_tokens_match", f"{p['greedy_tokens_match']:.4f}")
    table.add_row(f"top1_agreement ({report['fidelity']['weights']} weights)",
                  f"{report['fidelity']['top1_agreement']:.4f}")
    if report.get("accuracy"):
        a = report["accuracy"]
        task = f"{report['task']} " if report.get("task") else ""
        table.add_row(f"{task}accuracy full / HalfV / engine ({a['count']} answers, ± 1 s.e.)",
                      " / ".join(with_stderr(a, s) for s in ("full", "halfv", "engine")))
        table.add_row("accuracy retention (HalfV / full)", num(a.get("retention")))
    for name in ("searched", "paper") if report.get("search_check") else ():
        row = report["search_check"][name]
        table.add_row(f"{name} schedule (held out, eager): ratio / top-1 / accuracy",
                      f"{row['ratio']:.2f}x / {row['top1_agreement']:.3f} / {num(row.get('accuracy'))}")
    table.add_row("engine prefill full / HalfV (ms)",
                  f"{lat['engine_full_prefill']:.1f} / {lat['engine_halfv_prefill']:.1f}")
    table.add_row("LLM prefill: FLOPs ratio / measured time ratio",
                  f"{report['flops']['ratio']:.2f}x / {lat['engine_full_prefill'] / lat['engine_halfv_prefill']:.2f}x")
    if "engine_full_ttft" in lat and "e2e_ratio" in report["flops"]:
        table.add_row("time to first token: FLOPs ratio / measured time ratio",
                      f"{report['flops']['e2e_ratio']:.2f}x / "
                      f"{lat['engine_full_ttft'] / lat['engine_halfv_ttft']:.2f}x")
    Console().print(table)
