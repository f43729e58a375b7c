"""The stages as library functions the CLI calls: calibrate (now), export / engine / validate / build (later).
Nothing here knows a backbone by name: everything backbone-specific comes through the adapter."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..base.version import VERSION
from ..base.errors import BadInput
from ..graphs.adapter import adapter_for_model_type, get_adapter
from ..graphs.checkpoint import config_fingerprint, read_config_json
from ..validate.flops import LMShape, prefill_flops
from ..validate.plots import tme_plot
from ..validate.vision_flops import vision_flops
from ..base.atomic import prepare_out_dir
from ..base.data import load_data, synthetic_set
from ..base.manifest import verify_manifest, write_manifest
from ..engines.api import open_pipeline
from .calibrate import (choose_anchor_ratio, choose_ssr_mode, derive_schedule, measure_anchor_ratios, measure_probes,
                        measure_ssr_modes)
from .schedule import (FIELDS, apply_overrides, build_document, check_values, paper_schedule, read_schedule,
                       write_schedule)

console = Console(stderr=True)


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def default_samples(loaded, count: int, seed: int, split: str, sizes: list | None = None,
                    any_size: bool = False) -> list | None:
    """Data for a stage run without --data on the trained embedded default: its own task (digit grids or pages, as
    its training record says, with answers, at `sizes` or else the image sizes it was trained on; `split` scans: "train" for calibration, "eval" for
    validation). None for any other model, or (unless any_size) sizes it was not trained on."""
    trained = [tuple(s) for s in loaded.meta.get("image_sizes", [])]
    sizes = [tuple(s) for s in sizes] if sizes else trained
    if not trained or not (any_size or all(s in trained for s in sizes)):
        return None
    from ..base.tasks import DEFAULT_SLOT, task_set

    task = loaded.meta.get("task", {})
    return task_set(count, seed=seed, split=split, sizes=sizes, slot=task.get("slot", DEFAULT_SLOT),
                    task=task.get("kind", "grid"))


def task_kind(data: Path | None, loaded) -> str | None:
    """Which digit task the answers come from: the data folder's task.json (make-task), else the embedded
    default's own task (what default_samples drew)."""
    if data is None:
        return loaded.meta.get("task", {}).get("kind", "grid")
    info = (Path(data) if Path(data).is_dir() else Path(data).parent) / "task.json"
    return json.loads(info.read_text()).get("task", "grid") if info.exists() else None


def sized_tracker(progress: Progress, task):
    """A progress callback for a stage that batches its own items: the bar's total is set from the batch list."""
    def track(items):
        items = list(items)
        progress.update(task, total=len(items))
        for item in items:
            yield item
            progress.advance(task)

    return track


def run_calibrate(backbone: str, model_dir: Path | None, data: Path | None, samples: int | None, seed: int,
                  tme_k: int, kl_probe: bool, use_rules: bool, overrides: dict, out: Path,
                  weights_seed: int | None = None, target_ratio: float | None = None, ratio_kind: str = "prefill",
                  bucket: tuple[int, int] | None = None) -> dict:
    """weights_seed: None loads the embedded default's trained weights; a number, seeded random ones.
    target_ratio: search the schedule that keeps the most fidelity at that FLOPs ratio (exporter.search) instead of
    applying the rules; the probes still run for tme.png. samples None: 8 (rules) or 32 (search)."""
    adapter = get_adapter(backbone)
    if target_ratio is not None and not use_rules:
        raise BadInput("--target-ratio searches the schedule; --paper-values asks for the paper's: pass one of them")
    if target_ratio is not None and not target_ratio > 1:
        raise BadInput(f"--target-ratio {target_ratio:g}: a FLOPs ratio (unpruned / HalfV) must be above 1")
    samples = samples or (32 if target_ratio is not None else 8)
    out = prepare_out_dir(out)
    started = time.perf_counter()
    if not use_rules:  # paper values need the depth and the config's fingerprint only: no weights are read
        config, source = adapter.load_config(model_dir, seed=weights_seed)
        depth = config.get_text_config().num_hidden_layers
    else:
        with console.status(f"loading {backbone} from {model_dir or 'the embedded default'}"):
            loaded = adapter.load(model_dir, seed=weights_seed)
        config, source = loaded.config, loaded.source
        depth = adapter.text_stack(loaded).num_layers
        if target_ratio is not None:
            bucket = search_bucket(adapter, loaded, bucket)
        calib = (load_data(data) if data is not None
                 else default_samples(loaded, samples, seed, split="train", sizes=[bucket] if bucket else None,
                                      any_size=bucket is not None)  # a search measures at its bucket
                 or synthetic_set(samples, seed))
        if target_ratio is not None:  # a target no schedule reaches is refused before the probes run
            from .search import plan_search

            search_plan = plan_search(adapter, loaded, calib, target_ratio, ratio_kind, bucket, overrides)

    curves = None
    if use_rules:
        with _progress() as progress:
            task = progress.add_task("calibrating (TME + KL probe)" if kl_probe else "calibrating (TME)",
                                     total=len(calib))

            def track(items):
                for item in items:
                    yield item
                    progress.advance(task)

            prepared: list = []
            curves = measure_probes(adapter, loaded, calib, k=tme_k, kl_probe=kl_probe, progress=track,
                                    keep_inputs=prepared)
    values, chosen = derive_schedule(curves, depth, adapter, overrides, use_rules=use_rules)
    ssr_modes = anchor_ratios = None
    if use_rules and kl_probe and target_ratio is None:
        with _progress() as progress:
            task = progress.add_task("calibrating (anchor share probe)", total=None)
            anchor_ratios = measure_anchor_ratios(adapter.text_stack(loaded), prepared, values,
                                                  progress=sized_tracker(progress, task))
        choose_anchor_ratio(values, chosen, anchor_ratios, overrides)
        with _progress() as progress:
            task = progress.add_task("calibrating (SSR mode probe)", total=None)
            ssr_modes = measure_ssr_modes(adapter.text_stack(loaded), prepared, values,
                                          progress=sized_tracker(progress, task))
        choose_ssr_mode(values, chosen, ssr_modes, overrides)
        check_values(values, depth, where="calibrated schedule")
    search = None
    if target_ratio is not None:
        values, chosen, search = _search(adapter, loaded, search_plan, overrides, values)
    calibration = None
    if curves is not None:
        calibration = {
            "samples": [s.name for s in calib], "tme_k": tme_k, "tme_clip_gram": False,
            "curves": curves, "anchor_ratios": anchor_ratios, "ssr_modes": ssr_modes,
            "weights": {"random": f"random (seed {weights_seed})", "trained": "trained (shipped)",
                        "checkpoint": "checkpoint"}[loaded.weights],
            "data": str(data) if data is not None else ("digit-grid task, training scans"
                                                        if loaded.meta.get("image_sizes") else "synthetic"),
            "seconds": round(time.perf_counter() - started, 2),
        }
    doc = build_document(backbone, config_fingerprint(config), source, depth, values, chosen, calibration, VERSION)
    if curves is not None:
        tme_plot(curves, doc["schedule"], f"{backbone} ({source}): truncated matrix entropy per layer",
                 out / "tme.png")
    if search is not None:
        from .search import pareto
        from ..validate.plots import pareto_plot

        search["pareto"] = pareto(search["log"])
        doc["search"] = search
        pareto_plot(search, search["pareto"], f"{backbone} ({source}): schedule search, {search['samples']} "
                    "calibration samples", out / "pareto.png")
    write_schedule(out / "schedule.json", doc)  # last: a schedule.json on disk means calibration finished
    return doc


def search_bucket(adapter, loaded, bucket: tuple[int, int] | None) -> tuple[int, int]:
    """The image size a search measures FLOPs at: as given (it must be one of the processor's buckets), else the
    first size the embedded default was trained on, else the first default export size."""
    from ..graphs.adapter import Processing

    processing = Processing(loaded.tokenizer, loaded.image_processor, loaded.config)
    if bucket is None:
        trained = loaded.meta.get("image_sizes") or []
        return adapter.bucket_for(processing, tuple(trained[0]) if trained else DEFAULT_IMAGE_SIZES[0])[0]
    resized, _ = adapter.bucket_for(processing, tuple(bucket))
    if resized != tuple(bucket):
        raise BadInput(f"--bucket {bucket[0]}x{bucket[1]}: the image processor turns it into {resized[0]}x{resized[1]}; "
                       f"use --bucket {resized[0]}x{resized[1]}")
    return resized


def _search(adapter, loaded, plan, overrides, rules_values):
    """Run the schedule search -> (values, chosen_by, the search record); the paper's and the rules' schedules are
    evaluated beside the candidates."""
    from .search import run_search

    depth = adapter.text_stack(loaded).num_layers
    references = {"paper": paper_schedule(adapter, depth),
                  "rules": check_values(rules_values, depth, where="calibrated schedule")}
    with _progress() as progress:
        def stage(description):
            return sized_tracker(progress, progress.add_task(description, total=None))

        values, record = run_search(adapter, loaded, plan, references, progress=stage, log=console.print)
    fixed = {key for key, value in overrides.items() if value is not None}
    why = (f"search: {record['objective']}, {record['ratio_kind']} FLOPs ratio >= {plan.target:g} at "
           f"{record['bucket'][0]}x{record['bucket'][1]} (schedule.json \"search\")")
    chosen = {key: ("cli" if key in fixed else why) for key in FIELDS}
    if values["ssr_mode"] == "freeze" and "ssr_ratio" not in fixed:
        chosen["ssr_ratio"] = "unused in freeze mode"
    return values, chosen, record


def describe(values: dict) -> str:
    text = (f"IVR before layer {values['ivr_layer']} keep {values['keep_ratio']} anchors {values['anchor_ratio']}; "
            f"SSR {values['ssr_mode']} from layer {values['ssr_layer']}")
    return text + (f" keep {values['ssr_ratio']}" if values.get("ssr_ratio") is not None else "")


def flops_table(config_path: Path, schedule_path: Path | None, overrides: dict, visual: list[int],
                text_tokens: int, end_to_end: bool = False) -> tuple[list[dict], str]:
    config = read_config_json(config_path)
    shape = LMShape.from_config(config)
    if schedule_path is not None:
        sched, _ = read_schedule(schedule_path, depth=shape.layers)
        values = {key: getattr(sched, key) for key in FIELDS}
    else:
        adapter = adapter_for_model_type(str(config.get("model_type")))
        if adapter is not None:
            values = adapter.paper.at_depth(shape.layers)
        elif all(overrides.get(k) is not None for k in FIELDS if k != "ssr_ratio"):
            values = {}
        else:
            raise BadInput(f"no paper schedule for model_type '{config.get('model_type')}'; pass --schedule or "
                           "--ivr-layer/--keep-ratio/--anchor-ratio/--ssr-layer/--ssr-mode")
    apply_overrides(values, overrides)
    sched = check_values(values, shape.layers, where="flops schedule")
    rows = []
    for n in visual:
        f = prefill_flops(shape, n, text_tokens, sched)
        row = {"visual": n, "text": text_tokens, "full": f.full, "halfv": f.halfv, "overhead": f.overhead,
               "ratio": f.ratio, "ratio_with_overhead": f.ratio_with_overhead}
        if end_to_end:  # TTFT: the vision encoder runs the same in both; HalfV prunes only inside the LLM
            v = vision_flops(config, shape.hidden, n)
            row.update({"vision": v.total, "vision_windowed_attention": v.windowed_attention,
                        "vision_full_attention": v.full_attention, "vision_grid": list(v.grid),
                        "e2e_full": v.total + f.full, "e2e_halfv": v.total + f.halfv,
                        "e2e_ratio": (v.total + f.full) / (v.total + f.halfv)})
        rows.append(row)
    return rows, describe(values)


# ------------------------------------------------------------------------------------------------ export .. build
# Mapped to the processor's buckets when --image-size is not given; a trained embedded default exports the image
# sizes it was trained on instead (training.json "image_sizes").
DEFAULT_IMAGE_SIZES = ((448, 448), (336, 504))
DEFAULT_GATES_UNDER = (("parity.selection_valid", 1.0), ("parity.greedy_tokens_match", 1.0))
DEFAULT_GATES_OVER = (("parity.logits_max_abs_diff", 1e-3),)


def load_for_source(adapter, source: str, model_dir: Path | None, dtype=None):
    """The eager model an artifacts folder or schedule was made from: --model wins, else the recorded source.
    `dtype` loads a checkpoint's weights at that dtype (default fp32); the embedded default is seeded in fp32."""
    if model_dir is not None:
        return adapter.load(model_dir, dtype=dtype)
    if source.startswith("embedded:"):
        if "seed=" in source:
            return adapter.load(None, seed=int(source.rsplit("seed=", 1)[-1]))
        return adapter.load(None)
    if not Path(source).is_dir():
        raise BadInput(f"the model these artifacts were made from ({source}) is not here; pass --model DIR")
    return adapter.load(Path(source), dtype=dtype)


def run_export(schedule_path: Path, model_dir: Path | None, image_sizes: list[tuple[int, int]], out: Path,
               precision: str = "fp32", quantize: str | None = None) -> dict:
    from .export import check_quantize, export_artifacts

    check_quantize(quantize, precision)  # before the model is loaded
    _, doc = read_schedule(schedule_path)
    adapter = get_adapter(doc.get("backbone", "?"))
    from .export import PRECISIONS

    with console.status("loading the model"):  # at the export dtype: a bf16 checkpoint is never upcast to fp32
        loaded = load_for_source(adapter, doc["model"].get("source", ""), model_dir, dtype=PRECISIONS.get(precision))
    depth = adapter.text_stack(loaded).num_layers
    sched, doc = read_schedule(schedule_path, backbone=adapter.name, fingerprint=config_fingerprint(loaded.config),
                               depth=depth)
    if not image_sizes:
        from ..graphs.adapter import Processing

        processing = Processing(loaded.tokenizer, loaded.image_processor, loaded.config)
        wanted = [tuple(s) for s in loaded.meta.get("image_sizes", [])] or DEFAULT_IMAGE_SIZES
        image_sizes = list(dict.fromkeys(adapter.bucket_for(processing, s)[0] for s in wanted))
    with _progress() as progress:
        task = progress.add_task("exporting", total=2 * len(image_sizes) + 4)

        def report(graph, phase, detail):
            if phase == "done":
                progress.advance(task)
                console.print(f"  {graph}: {detail['seconds']:.1f} s, graph {_mib(detail['graph_bytes'])}, "
                              f"weights.bin {_mib(detail['weights_bin_bytes'])}")
                return
            written = f", {_mib(detail)} written" if isinstance(detail, int) else ""
            progress.update(task, description=f"{graph}: {phase}{written}")

        meta = export_artifacts(adapter, loaded, sched, doc, image_sizes, out, precision=precision, report=report,
                                log=console.print, quantize=quantize)
    with console.status("hashing the artifacts for manifest.json"):
        write_manifest(out, export_manifest_extra(out))
    return meta


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def export_manifest_extra(artifacts: Path) -> dict:
    """What each engine target records at export time (e.g. TensorRT's trtexec lines), computed without it."""
    from ..engines import EngineOptions, all_targets

    extra = {}
    for target in all_targets():
        if target.manifest_extra is not None:
            extra.update(target.manifest_extra(artifacts, EngineOptions()))
    return extra


def run_engine(artifacts: Path, target: str, options=None) -> dict:
    from ..engines import EngineOptions, get_target

    options = options or EngineOptions()
    engine_target = get_target(target)
    with console.status("checking every artifact's sha256"):
        verified = verify_manifest(artifacts)
    with console.status(f"building {target} engines"):
        info = engine_target.build(artifacts, options, lambda m: console.print(m))
    extra = engine_target.manifest_extra(artifacts, options) if engine_target.manifest_extra else None
    write_manifest(artifacts, extra, verified=verified)
    return info


def run_validate(artifacts: Path, data: Path | None, model_dir: Path | None, fail_under: list, fail_over: list,
                 weights: str | None = None, target: str = "onnxruntime",
                 latency_runs: int | None = None, baselines: bool = False) -> tuple[dict, list[str]]:
    """Parity, fidelity, latency, FLOPs; task accuracy when the samples carry answers; with `baselines`, the eager
    ablation baselines at HalfV's FLOPs on the same samples."""
    from ..validate.report import LATENCY_RUNS, check_thresholds, held_out_samples, measure_latency, run_validation, write_report

    pipeline = open_pipeline(artifacts, target)
    meta = pipeline.meta
    adapter = pipeline.adapter
    with console.status("loading the eager reference"):
        loaded = load_for_source(adapter, meta["source"], model_dir)
    from ..graphs.pruning import PruneSchedule

    schedule = PruneSchedule(**meta["schedule"])
    buckets = [tuple(b["size"]) for b in meta["buckets"]]
    # without --data: the embedded default's own task, at least 32 answers (a standard error near 0.08 at most)
    samples = (load_data(data) if data is not None
               else default_samples(loaded, max(32, 8 * len(buckets)), 1000, split="eval", sizes=buckets)
               or held_out_samples(buckets))
    task = task_kind(data, loaded) if any(s.answer is not None for s in samples) else None
    if baselines and not any(s.answer is not None for s in samples):
        raise BadInput("--baselines needs data with answers; pass --data DIR written by `halfv-export make-task`")
    # a checkpoint folder may hold random weights too (tools/shaped_checkpoint.py): say where they came from only
    weights = weights or {"random": "random", "trained": "trained"}.get(loaded.weights, "checkpoint")
    with _progress() as progress:
        track = sized_tracker(progress, progress.add_task("validating (parity, fidelity)", total=None))
        pictures: list = []
        report = run_validation(pipeline, loaded, samples, schedule, weights, progress=track, pictures=pictures)
    with console.status("measuring latency"):
        largest = max(buckets, key=lambda b: b[0] * b[1])
        # timed on a question of the evaluated task where there is one at the largest bucket (its prompt length)
        timed_sample = next((s for s in samples if s.image is not None and s.answer is not None
                             and (s.image.height, s.image.width) == largest), None)
        latency, flops = measure_latency(pipeline, loaded, timed_sample or held_out_samples([largest], 1, seed=2000)[0],
                                         schedule, runs=latency_runs or LATENCY_RUNS)
    if baselines:
        from ..validate.compare import evaluate_methods

        with console.status("baselines at the same FLOPs (eager)"):
            result = evaluate_methods(adapter, loaded, samples, [schedule])
        report["baselines"] = {"layer": schedule.ivr_layer, "full_accuracy": result["full"]["accuracy"],
                               "methods": result["points"][0]["methods"]}
    schedule_file = Path(artifacts) / "schedule.json"
    schedule_doc = json.loads(schedule_file.read_text()) if schedule_file.exists() else {}
    with_images = [s for s in samples if s.image is not None]
    if schedule_doc.get("search") and with_images:  # pruning needs images; text-only data has nothing to compare
        from .search import held_out_check

        with _progress() as progress:
            track = sized_tracker(progress, progress.add_task("searched vs paper schedule (eager)", total=None))
            report["search_check"] = held_out_check(adapter, loaded, with_images, schedule, schedule_doc["search"],
                                                    progress=track)
    report = {"backbone": meta["backbone"], "source": meta["source"], "schedule": meta["schedule"],
              "precision": meta.get("precision", "fp32"), "quantize": meta.get("quantize"),
              "buckets": [f"{h}x{w}" for h, w in buckets], "device": pipeline.runner.describe(), **report,
              **({"task": task} if task else {}),
              "latency_ms": latency,
              "flops": flops}
    failures = check_thresholds(report, fail_under, fail_over)
    report["thresholds"] = {"fail_under": dict(fail_under), "fail_over": dict(fail_over), "failures": failures}
    write_report(Path(artifacts), report)
    draw_kept(pipeline, pictures, Path(artifacts) / "kept.png")
    write_manifest(artifacts, verified=pipeline.verified)
    return report, failures


def draw_kept(pipeline, pictures: list, path: Path) -> None:
    """kept.png: what the engine kept on the first validated images, where the backbone maps its visual rows to
    image boxes (not LLaVA-NeXT's anyres tiles)."""
    from ..validate.plots import kept_tokens_plot

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


def run_lint(artifacts: Path) -> tuple[list[str], list]:
    from ..graphs.lint import lint_file

    meta_path = Path(artifacts) / "artifacts.json"
    if not meta_path.exists():
        raise BadInput(f"{artifacts} has no artifacts.json; run `halfv-export export` into it first")
    graphs = json.loads(meta_path.read_text())["graphs"]
    return graphs, [f for g in graphs for f in lint_file(Path(artifacts) / g)]


# ------------------------------------------------------------------------------------------------ task data, compare
def task_settings(backbone: str | None, image_sizes: list[tuple[int, int]], slot: int | None,
                  task: str | None = None) -> tuple[list[tuple[int, int]], int, str]:
    """Image sizes, digit slot and task kind of a task set: as given (sizes checked against the backbone's processor
    when one is named), else what the backbone's embedded default was trained on, else 224x224, the default slot
    and the page task."""
    from ..base.tasks import DEFAULT_SLOT

    if backbone is None:
        return image_sizes or [(224, 224)], slot or DEFAULT_SLOT, task or "page"
    from ..graphs.adapter import read_training_record

    adapter = get_adapter(backbone)
    record = read_training_record(adapter.embedded_dir)
    slot = slot or record.get("task", {}).get("slot", DEFAULT_SLOT)
    task = task or record.get("task", {}).get("kind", "grid")
    if not image_sizes:
        if not record.get("image_sizes"):
            raise BadInput(f"the embedded {backbone} has no training record; pass --image-size HxW")
        return [tuple(s) for s in record["image_sizes"]], slot, task
    processing = adapter.load_processing(adapter.embedded_dir)
    for size in image_sizes:
        bucket, _ = adapter.bucket_for(processing, size)
        if bucket != tuple(size):
            raise BadInput(f"--image-size {size[0]}x{size[1]}: {backbone}'s image processor turns it into "
                           f"{bucket[0]}x{bucket[1]} (resize/crop would move the grid cells); use "
                           f"--image-size {bucket[0]}x{bucket[1]}")
    return image_sizes, slot, task


def run_make_task(out: Path, backbone: str | None, image_sizes: list[tuple[int, int]], count: int, seed: int,
                  split: str, mix: str | None, slot: int | None = None, task: str | None = None) -> dict:
    import shutil

    from ..base.tasks import parse_mix, task_set, write_task_set

    sizes, slot, task = task_settings(backbone, image_sizes, slot, task)
    mix_weights = parse_mix(mix)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "task.json").exists():
        raise BadInput(f"{out} is not empty and holds no earlier task; choose an empty or new --out")
    samples = task_set(count, seed=seed, split=split, sizes=sizes, mix=mix_weights, slot=slot, task=task)
    prepare_out_dir(out)
    (out / "prompts.jsonl").unlink(missing_ok=True)  # an interrupted rewrite leaves no stale, complete-looking set
    shutil.rmtree(out / "images", ignore_errors=True)
    info = {"generator": "halfv_export.base.tasks", "task": task, "seed": seed, "split": split, "count": count,
            "image_sizes": [list(s) for s in sizes], "slot": slot, "mix": mix_weights, "backbone": backbone}
    write_task_set(samples, out, info)
    return {**info, "types": {t: sum(s.type == t for s in samples) for t in mix_weights}}


def run_compare(backbone: str, model_dir: Path | None, data: Path | None, schedule_path: Path | None,
                keep_ratios: list[float], seed: int, out: Path, weights_seed: int | None = None,
                samples: int = 200) -> dict:
    """HalfV vs random / attention-only / IVR-without-SSR at HalfV's FLOPs, over a keep-ratio sweep (eager)."""
    from ..base.atomic import write_text_atomic
    from ..validate.compare import evaluate_methods, sweep_schedules
    from ..validate.plots import accuracy_flops_plot

    adapter = get_adapter(backbone)
    out = prepare_out_dir(out)
    with console.status(f"loading {backbone}"):
        loaded = adapter.load(model_dir, seed=weights_seed)
    depth = adapter.text_stack(loaded).num_layers
    if schedule_path is not None:
        base, doc = read_schedule(schedule_path, backbone=adapter.name, fingerprint=config_fingerprint(loaded.config),
                                  depth=depth)
        origin = str(schedule_path)
    else:
        base, origin = paper_schedule(adapter, depth), "paper values at this depth"
    data_samples = load_data(data) if data is not None else default_samples(loaded, samples, 1000, split="eval")
    if data_samples is None:
        raise BadInput("this model has no built-in task; pass --data DIR with answers (halfv-export make-task)")
    schedules = sweep_schedules(base, keep_ratios)
    with _progress() as progress:
        track = sized_tracker(progress, progress.add_task("comparing (eager)", total=None))
        result = evaluate_methods(adapter, loaded, data_samples, schedules, seed=seed, progress=track)
    result = {"backbone": backbone, "source": loaded.source, "weights": loaded.weights, "schedule_from": origin,
              "base_schedule": base.__dict__.copy(), "samples": result["full"]["count"],
              "data": str(data) if data is not None else "digit-grid task, evaluation scans (seed 1000)", **result}
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
             "| keep ratio ρ | method | FLOPs fraction | accuracy | retention |", "|---|---|---|---|---|"]
    for point in result["points"]:
        for row in point["methods"].values():
            lines.append(f"| {point['keep_ratio']:g} | {row['label']} | {row['flops_fraction']:.3f} | "
                         f"{_fmt(row['accuracy'])} | {_fmt(row['retention'])} |")
    return "\n".join(lines) + "\n"
