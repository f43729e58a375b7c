"""calibrate(): measure the model's per-layer redundancy and write schedule.json (+ tme.png), by the rules or by a
search under a FLOPs budget. Nothing here knows a backbone by name: the adapter brings everything specific."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ..base.atomic import prepare_out_dir
from ..base.data import load_data, synthetic_set
from ..base.errors import BadInput
from ..base.kinds import RATIO_KINDS, RatioKind, SSRMode
from ..base.version import VERSION
from ..calibration.rules import (choose_anchor_ratio, choose_ssr_mode, derive_schedule, measure_anchor_ratios,
                                 measure_probes, measure_ssr_modes)
from ..calibration.schedule import (FIELDS, ChosenBy, Choice, build_document, check_values, paper_schedule,
                                    write_schedule)
from ..graphs.adapter import Processing, get_adapter
from ..graphs.checkpoint import config_fingerprint
from ..graphs.pruning import VisionCut
from ..measure.plots import tme_plot
from .data import default_samples
from .progress import ProgressCallback, Reporter, Stage
from .results import Calibration

# Mapped to the processor's buckets when no image size is given; a trained embedded default exports the image
# sizes it was trained on instead (training.json "image_sizes").
DEFAULT_IMAGE_SIZES = ((448, 448), (336, 504))


@dataclass(frozen=True)
class Probes:
    """What calibration measures: `samples` images (None: 8 for the rules, 32 for a search; drawn with `seed` when
    no data is given), TME over `tme_k` eigenvalues, and the KL probes (visual update per layer, anchor share, SSR
    mode) unless `kl` is off."""

    samples: int | None = None
    seed: int = 0
    tme_k: int = 50
    kl: bool = True


@dataclass(frozen=True)
class Search:
    """Search the schedule with the best fidelity whose FLOPs ratio (unpruned / HalfV, of the LLM prefill or of time
    to first token) is at least `target_ratio`, measured at `bucket` (HxW; default: the first size the embedded
    default was trained on, else 448x448)."""

    target_ratio: float
    ratio_kind: RatioKind = RatioKind.PREFILL
    bucket: tuple[int, int] | None = None

    def __post_init__(self):
        if self.ratio_kind not in RATIO_KINDS:
            raise BadInput(f"--ratio-kind {self.ratio_kind!r}: use one of {', '.join(RATIO_KINDS)}")
        object.__setattr__(self, "ratio_kind", RatioKind(self.ratio_kind))
        if self.bucket is not None:
            object.__setattr__(self, "bucket", tuple(self.bucket))


def calibrate(backbone: str, out: Path, *, model: Path | None = None, data: Path | None = None,
              random_weights: int | None = None, paper_values: bool = False, overrides: dict | None = None,
              search: Search | None = None, probes: Probes = Probes(), vision_cut: VisionCut | None = None,
              progress: ProgressCallback | None = None) -> Calibration:
    """-> the schedule in `out`/schedule.json. `model`: a checkpoint folder (default: the backbone's embedded
    default, its trained weights, or seeded random ones with `random_weights`). `overrides`: schedule fields
    ({"ssr_layer": 5, ...}) that win over the rules and hold still in a search. `paper_values`: the paper's
    schedule at this depth, no probes. `vision_cut` (beyond the paper): recorded in schedule.json for export, and
    held fixed by a search; a --ratio-kind ttft search without one pairs the schedules with the tower's cuts
    (calibration/search.vision_cut_grid). The rules' probes measure the uncut prompt."""
    report = Reporter(Stage.CALIBRATE, progress)
    adapter = get_adapter(backbone)
    overrides = checked_overrides(overrides)
    if random_weights is not None and model is not None:
        raise BadInput("--random-weights applies to the embedded default only; drop it or --model")
    if search is not None and paper_values:
        raise BadInput("--target-ratio searches the schedule; --paper-values asks for the paper's: pass one of them")
    if search is not None and not search.target_ratio > 1:
        raise BadInput(f"--target-ratio {search.target_ratio:g}: a FLOPs ratio (unpruned / HalfV) must be above 1")
    samples = probes.samples or (32 if search is not None else 8)
    if vision_cut is not None:  # from the config alone: before any weights are read or anything is written
        adapter.check_vision_cut(adapter.load_config(model, seed=random_weights)[0], vision_cut)
    out = prepare_out_dir(out)
    started = time.perf_counter()
    if paper_values:  # paper values need the depth and the config's fingerprint only: no weights are read
        config, source = adapter.load_config(model, seed=random_weights)
        depth = config.get_text_config().num_hidden_layers
        values, chosen = derive_schedule(None, depth, adapter, overrides, use_rules=False)
        doc = build_document(backbone, config_fingerprint(config), source, depth, values, chosen, None, VERSION,
                             vision_cut)
        write_schedule(out / "schedule.json", doc)
        return Calibration.from_document(out, doc)

    with report.status(f"loading {backbone} from {model or 'the embedded default'}"):
        loaded = adapter.load(model, seed=random_weights)
    depth = adapter.text_stack(loaded).num_layers
    bucket = search_bucket(adapter, loaded, search.bucket) if search is not None else None
    calib = (load_data(data) if data is not None
             else default_samples(loaded, samples, probes.seed, split="train", sizes=[bucket] if bucket else None,
                                  any_size=bucket is not None)  # a search measures at its bucket
             or synthetic_set(samples, probes.seed))
    if search is not None:  # a target no schedule reaches is refused before the probes run
        from ..calibration.search import plan_search

        plan = plan_search(adapter, loaded, calib, search.target_ratio, search.ratio_kind, bucket, overrides,
                           vision_cut)

    prepared: list = []
    curves = measure_probes(adapter, loaded, calib, k=probes.tme_k, kl_probe=probes.kl, keep_inputs=prepared,
                            progress=report.tracker("calibrating (TME + KL probe)" if probes.kl
                                                    else "calibrating (TME)"))
    values, chosen = derive_schedule(curves, depth, adapter, overrides)
    anchor_ratios = ssr_modes = record = None
    if probes.kl and search is None:
        stack = adapter.text_stack(loaded)
        anchor_ratios = measure_anchor_ratios(stack, prepared, values,
                                              progress=report.tracker("calibrating (anchor share probe)"))
        choose_anchor_ratio(values, chosen, anchor_ratios, overrides)
        ssr_modes = measure_ssr_modes(stack, prepared, values, progress=report.tracker("calibrating (SSR mode probe)"))
        choose_ssr_mode(values, chosen, ssr_modes, overrides)
        check_values(values, depth, where="calibrated schedule")
    if search is not None:
        values, chosen, record = _search(adapter, loaded, plan, overrides, values, report)
        if record.get("vision_cut") and vision_cut is None:  # the joint search paired the schedule with a cut
            vision_cut = VisionCut(**record["vision_cut"])
            chosen["vision_cut"] = Choice(ChosenBy.SEARCH, next((c.why for c in chosen.values()
                                                                 if c.by == ChosenBy.SEARCH), ""))
    calibration = {
        "samples": [s.name for s in calib], "tme_k": probes.tme_k, "tme_clip_gram": False,
        "curves": curves, "anchor_ratios": anchor_ratios, "ssr_modes": ssr_modes,
        "weights": {"random": f"random (seed {random_weights})", "trained": "trained (shipped)",
                    "checkpoint": "checkpoint"}[loaded.weights],
        "data": str(data) if data is not None else (f"digit {loaded.meta.get('task', {}).get('kind', 'grid')} task, "
                                                    "training scans" if loaded.meta.get("image_sizes")
                                                    else "synthetic"),
        "seconds": round(time.perf_counter() - started, 2),
    }
    doc = build_document(backbone, config_fingerprint(loaded.config), loaded.source, depth, values, chosen,
                         calibration, VERSION, vision_cut)
    tme_plot(curves, doc["schedule"], f"{backbone} ({loaded.source}): truncated matrix entropy per layer",
             out / "tme.png")
    if record is not None:
        from ..calibration.search import pareto
        from ..measure.plots import pareto_plot

        record["pareto"] = pareto(record["log"])
        doc["search"] = record
        pareto_plot(record, record["pareto"], f"{backbone} ({loaded.source}): schedule search, {record['samples']} "
                    "calibration samples", out / "pareto.png")
    write_schedule(out / "schedule.json", doc)  # last: a schedule.json on disk means calibration finished
    return Calibration.from_document(out, doc)


def checked_overrides(overrides: dict | None) -> dict:
    """All six schedule fields, None where not given; a key that is not a field is refused (a misspelt one would
    otherwise leave the rules' value in place without a word)."""
    unknown = sorted(set(overrides or {}) - set(FIELDS))
    if unknown:
        raise BadInput(f"overrides {unknown}: not schedule fields; use {', '.join(FIELDS)}")
    return {key: (overrides or {}).get(key) for key in FIELDS}


def search_bucket(adapter, loaded, bucket: tuple[int, int] | None) -> tuple[int, int]:
    """The image size a search measures FLOPs at: as given (it must be one of the processor's buckets), else the
    first size the embedded default was trained on, else the first default export size."""
    processing = Processing(loaded.tokenizer, loaded.image_processor, loaded.config)
    if bucket is None:
        trained = loaded.meta.get("image_sizes") or []
        return adapter.bucket_for(processing, tuple(trained[0]) if trained else DEFAULT_IMAGE_SIZES[0])[0]
    resized, _ = adapter.bucket_for(processing, tuple(bucket))
    if resized != tuple(bucket):
        raise BadInput(f"--bucket {bucket[0]}x{bucket[1]}: the image processor turns it into {resized[0]}x{resized[1]}; "
                       f"use --bucket {resized[0]}x{resized[1]}")
    return resized


def _search(adapter, loaded, plan, overrides: dict, rules_values: dict, report: Reporter):
    """Run the schedule search -> (values, chosen_by, the search record); the paper's and the rules' schedules are
    evaluated beside the candidates."""
    from ..calibration.search import run_search

    depth = adapter.text_stack(loaded).num_layers
    references = {"paper": paper_schedule(adapter, depth),
                  "rules": check_values(rules_values, depth, where="calibrated schedule")}
    values, record = run_search(adapter, loaded, plan, references, progress=report.tracker, log=report.message)
    fixed = {key for key, value in overrides.items() if value is not None}
    why = (f"{record['objective']}, {record['ratio_kind']} FLOPs ratio >= {plan.target:g} at "
           f"{record['bucket'][0]}x{record['bucket'][1]} (schedule.json \"search\")")
    chosen = {key: Choice(ChosenBy.CLI) if key in fixed else Choice(ChosenBy.SEARCH, why) for key in FIELDS}
    if values["ssr_mode"] == SSRMode.FREEZE and "ssr_ratio" not in fixed:
        chosen["ssr_ratio"] = Choice(ChosenBy.DEFAULT, "unused in freeze mode")
    return values, chosen, record
