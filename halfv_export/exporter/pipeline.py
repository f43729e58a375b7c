"""The stages as library functions the CLI calls: calibrate (now), export / engine / validate / build (later).
Nothing here knows a backbone by name: everything backbone-specific comes through the adapter."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .. import __version__
from ..errors import BadInput
from ..graphs.adapter import adapter_for_model_type, get_adapter
from ..graphs.checkpoint import config_fingerprint, read_config_json
from ..validate.flops import LMShape, prefill_flops
from ..validate.plots import tme_plot
from .atomic import prepare_out_dir
from .calib_data import load_data, synthetic_set
from .calibrate import KL_FREEZE_THRESHOLD, derive_schedule, measure_probes
from .schedule import FIELDS, build_document, check_values, paper_fallback, read_schedule, write_schedule

console = Console(stderr=True)


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def run_calibrate(backbone: str, model_dir: Path | None, data: Path | None, samples: int, seed: int, tme_k: int,
                  kl_probe: bool, use_rules: bool, overrides: dict, out: Path) -> dict:
    adapter = get_adapter(backbone)
    out = prepare_out_dir(out)
    calib = load_data(data) if data is not None else synthetic_set(samples, seed)
    started = time.perf_counter()
    with console.status(f"loading {backbone} from {model_dir or 'the embedded default'}"):
        loaded = adapter.load(model_dir, seed=seed)
    depth = adapter.text_stack(loaded).num_layers

    curves = None
    if use_rules:
        with _progress() as progress:
            task = progress.add_task("calibrating (TME + KL probe)" if kl_probe else "calibrating (TME)",
                                     total=len(calib))

            def track(items):
                for item in items:
                    yield item
                    progress.advance(task)

            curves = measure_probes(adapter, loaded, calib, k=tme_k, kl_probe=kl_probe, progress=track)
    values, chosen = derive_schedule(curves, depth, adapter, overrides, use_rules=use_rules)
    calibration = None
    if curves is not None:
        calibration = {
            "samples": [s.name for s in calib], "tme_k": tme_k, "tme_clip_gram": False,
            "kl_freeze_threshold": KL_FREEZE_THRESHOLD, "curves": curves,
            "weights": "random (seeded)" if model_dir is None else "checkpoint",
            "seconds": round(time.perf_counter() - started, 2),
        }
    doc = build_document(backbone, config_fingerprint(loaded.config), loaded.source, depth, values, chosen,
                         calibration, __version__)
    if curves is not None:
        tme_plot(curves, doc["schedule"], f"{backbone} ({loaded.source}): truncated matrix entropy per layer",
                 out / "tme.png", kl_threshold=KL_FREEZE_THRESHOLD if kl_probe else None)
    write_schedule(out / "schedule.json", doc)  # last: a schedule.json on disk means calibration finished
    return doc


def describe(values: dict) -> str:
    text = (f"IVR before layer {values['ivr_layer']} keep {values['keep_ratio']} anchors {values['anchor_ratio']}; "
            f"SSR {values['ssr_mode']} from layer {values['ssr_layer']}")
    return text + (f" keep {values['ssr_ratio']}" if values.get("ssr_ratio") is not None else "")


def flops_table(config_path: Path, schedule_path: Path | None, overrides: dict, visual: list[int],
                text_tokens: int) -> tuple[list[dict], str]:
    config = read_config_json(config_path)
    shape = LMShape.from_config(config)
    if schedule_path is not None:
        sched, _ = read_schedule(schedule_path, depth=shape.layers)
        values = {key: getattr(sched, key) for key in FIELDS}
    else:
        adapter = adapter_for_model_type(str(config.get("model_type")))
        if adapter is not None:
            values = paper_fallback(adapter.paper, shape.layers)
        elif all(overrides.get(k) is not None for k in FIELDS if k != "ssr_ratio"):
            values = {}
        else:
            raise BadInput(f"no paper schedule for model_type '{config.get('model_type')}'; pass --schedule or "
                           "--ivr-layer/--keep-ratio/--anchor-ratio/--ssr-layer/--ssr-mode")
    values.update({k: v for k, v in overrides.items() if v is not None})
    values.setdefault("ssr_ratio", None)
    if values.get("ssr_mode") == "freeze" and overrides.get("ssr_ratio") is None:
        values["ssr_ratio"] = None
    sched = check_values(values, shape.layers, where="flops schedule")
    rows = []
    for n in visual:
        f = prefill_flops(shape, n, text_tokens, sched)
        rows.append({"visual": n, "text": text_tokens, "full": f.full, "halfv": f.halfv, "overhead": f.overhead,
                     "ratio": f.ratio, "ratio_with_overhead": f.ratio_with_overhead})
    return rows, describe(values)
