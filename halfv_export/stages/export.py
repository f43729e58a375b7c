"""The export stage: every graph a deployment needs (graphs/specs.py lists the kinds), for every image-size bucket,
plus artifacts.json. Everything is written into a staging folder inside --out and renamed into place when all
graphs passed their checks; artifacts.json is written last.

Engines a previous export's graphs were built into (trt/, ort/: every engine target's folder) are removed when the
new graphs are renamed into place: they would run the old graphs' weights and schedule, and the manifest would
hash them as if they belonged. `halfv-export engine` rebuilds them from the new graphs.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from ..base.errors import BadInput
from ..graphs.adapter import BackboneAdapter, LoadedModel, Processing
from ..graphs.lint import TOPK_LIMIT
from ..graphs.pruning import PruneSchedule, VisionCut, budgets
from ..graphs.quantize import TENSOR_SUFFIXES, scheme_for
from ..graphs.shared_weights import WeightStore, parameter_names
from ..graphs.specs import PREFILL, VISION, VISION_FULL, decode_spec, embed_spec, prefill_spec, vision_spec
from ..base.atomic import prepare_out_dir, write_text_atomic
from ..base.kinds import SSRMode

ARTIFACTS_FORMAT = 1
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_image_size(text: str, flag: str = "--image-size") -> tuple[int, int]:
    """'HxW' -> (h, w)."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise BadInput(f"{flag} {text!r}: write it as HEIGHTxWIDTH, e.g. 448x448") from None
    if h <= 0 or w <= 0:
        raise BadInput(f"{flag} {text!r}: height and width must be positive")
    return h, w


def resolve_buckets(adapter: BackboneAdapter, processing: Processing, sizes: list[tuple[int, int]],
                    schedule: PruneSchedule, cut: VisionCut | None = None) -> list[dict]:
    """Image sizes -> distinct buckets with their static budgets; each must be one the processor produces. With a
    vision cut the HalfV prefill sees K = cut.tokens(N) visual rows, and --full runs the uncut tower."""
    buckets: dict[tuple[int, int], dict] = {}
    for size in sizes:
        bucket, n = adapter.bucket_for(processing, size)
        if bucket != size:
            raise BadInput(f"--image-size {size[0]}x{size[1]} is not a size the image processor produces (it resizes "
                           f"to {bucket[0]}x{bucket[1]}); use --image-size {bucket[0]}x{bucket[1]}")
        kept = n if cut is None else cut.tokens(n)
        plan = budgets(kept, schedule)
        after_cut = "" if cut is None else f", {kept} after the vision cut"
        if plan.k1 < 1 or (schedule.ssr_mode == SSRMode.TOPK and plan.k2 < 1):
            raise BadInput(f"bucket {size[0]}x{size[1]} has N={n} visual tokens{after_cut}: K1={plan.k1}, "
                           f"K2={plan.k2} at keep_ratio={schedule.keep_ratio}; use a larger image size or larger "
                           "ratios")
        topk = max(plan.k1, plan.k2, 0 if cut is None else kept)  # the cut tower's TopK keeps K too
        if topk > TOPK_LIMIT:
            raise BadInput(f"bucket {size[0]}x{size[1]} needs TopK with K={topk} > {TOPK_LIMIT} (TensorRT's limit); "
                           "use a smaller image size or a smaller keep ratio")
        buckets[bucket] = {"size": list(bucket), "num_visual": n, "kept_visual": kept,
                           **{k: v for k, v in asdict(plan).items() if k != "n"}, "vision": VISION.file(bucket),
                           "vision_full": VISION.file(bucket) if cut is None else VISION_FULL.file(bucket),
                           "prefill": PREFILL.file(bucket)}
    return list(buckets.values())


def export_artifacts(adapter: BackboneAdapter, loaded: LoadedModel, schedule: PruneSchedule, schedule_doc: dict,
                     sizes: list[tuple[int, int]], out: Path, step: Callable[[str], None] = lambda name: None,
                     precision: str = "fp32",
                     report: Callable[[str, str, object], None] = lambda graph, phase, detail: None,
                     log: Callable[[str], None] = lambda message: None, quantize: str | None = None,
                     cut: VisionCut | None = None) -> dict:
    """Export every graph. precision fp16/bf16 casts the weights; the graph code keeps scores, softmax, norms and
    the farthest-point fill in fp32 with explicit casts, which strongly typed TensorRT builds honour.

    Weights are stored once (graphs/shared_weights.py): every graph references weights.bin, indexed by
    weights.json. `report(graph, phase, detail)` follows each graph through tracing / writing / checking /
    sharing / done (detail: bytes written so far, or the graph's timing row when done).

    quantize int4|int8 quantises the LLM graphs' weight MatMuls (graphs/quantize.py); embed and vision stay float.

    cut: a vision cut (beyond the paper; graphs/vision_cut.py): each bucket's vision graph is the cut tower, a
    second one (VISION_FULL) the uncut tower for --full, and the HalfV prefill is traced for the K kept tokens."""
    if precision not in PRECISIONS:
        raise BadInput(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    scheme = check_quantize(quantize, precision)
    if cut is not None:
        adapter.check_vision_cut(loaded.config, cut)  # before anything is written
    dtype = PRECISIONS[precision]
    out = prepare_out_dir(out)
    processing = Processing(loaded.tokenizer, loaded.image_processor, loaded.config)
    buckets = resolve_buckets(adapter, processing, sizes, schedule, cut)
    stack = adapter.text_stack(loaded)
    staging = out / f".staging-{time.time_ns()}"
    staging.mkdir()
    try:
        files = adapter.save_processing(loaded, staging)
        write_text_atomic(staging / "schedule.json", json.dumps(schedule_doc, indent=2) + "\n")
        if any(t.dtype != dtype for t in loaded.model.parameters()):
            loaded.model.to(dtype)  # a checkpoint loaded at the export dtype is not copied
        specs = [embed_spec(stack)]
        for bucket in buckets:
            size = tuple(bucket["size"])
            pixels = adapter.host_inputs(processing, [_blank(size)], ["x"]).pixel_values[0].to(dtype)
            specs.append(vision_spec(adapter.vision_graph(loaded, size, cut), pixels, size))
            if cut is not None:
                specs.append(vision_spec(adapter.vision_graph(loaded, size), pixels, size, VISION_FULL))
            prefill = prefill_spec(stack, schedule, bucket["kept_visual"], size)
            bucket["groups"] = prefill.module.group_of_layer()
            specs.append(prefill)
        specs += [prefill_spec(stack, None, 0), decode_spec(stack, buckets[0]["groups"], pruned=True),
                  decode_spec(stack, [0] * stack.num_layers, pruned=False)]
        report("weights", "hashing", None)
        names = parameter_names(loaded.model)  # which stored tensors are parameters (and folded transposes of them)
        store = WeightStore(staging, names)
        timings = []
        try:
            for spec in specs:
                step(spec.file)
                started = time.perf_counter()
                spec.export(staging, store=store, report=lambda phase, detail, f=spec.file: report(f, phase, detail),
                            quantize=scheme if spec.kind.weights == "llm" else None)
                timings.append({"graph": spec.file, "seconds": round(time.perf_counter() - started, 2),
                                "graph_bytes": (staging / spec.file).stat().st_size,
                                "weights_bin_bytes": store.path.stat().st_size})
                report(spec.file, "done", timings[-1])
        finally:
            index = store.close()
        weights = {"file": index["file"], "bytes": index["bytes"], "tensors": len(index["tensors"]),
                   "parameters": sum(e["parameter"] for e in index["tensors"].values()),
                   "derived_bytes": sum(e["length"] for e in index["tensors"].values() if not e["parameter"]),
                   "referenced_bytes": store.bytes_absorbed,
                   "quantized_bytes": sum(e["length"] for n, e in index["tensors"].items()
                                          if scheme is not None and n.endswith(TENSOR_SUFFIXES))}

        meta = {
            "format": ARTIFACTS_FORMAT, "backbone": adapter.name, "source": loaded.source, "precision": precision,
            "schedule": asdict(schedule), "vision_cut": None if cut is None else asdict(cut), "buckets": buckets,
            "groups": buckets[0]["groups"],
            "num_layers": stack.num_layers, "num_kv_heads": stack.num_kv_heads, "head_dim": stack.head_dim,
            "hidden_size": stack.embed_tokens.embedding_dim, "position_rows": 3 if stack.mrope else 1,
            "eos_token_ids": sorted(adapter.eos_token_ids(loaded)), "processing_files": files,
            "graphs": [spec.file for spec in specs], "weights": weights, "export_seconds": timings,
            "quantize": None if scheme is None else {
                **scheme.describe(), "graphs": [spec.file for spec in specs if spec.kind.weights == "llm"],
                "float": "embed and vision graphs; norms, rotary tables and attention stay float everywhere"},
        }
        dropped = _drop_engines(out, staging.with_name(staging.name + "-engines"))
        for item in sorted(staging.iterdir()):
            item.replace(out / item.name)
        write_text_atomic(out / "artifacts.json", json.dumps(meta, indent=2) + "\n")
        if dropped:
            log(f"removed {' and '.join(d + '/' for d in dropped)} (engines built from the previous graphs); rebuild "
                f"with `halfv-export engine --artifacts {out} --target ...`")
        return meta
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(staging.with_name(staging.name + "-engines"), ignore_errors=True)


def check_quantize(quantize: str | None, precision: str):
    """--quantize with --precision: the scheme, or one line saying what to change (before anything is written)."""
    scheme = scheme_for(quantize)
    if scheme is not None and precision != "fp32":
        raise BadInput(f"--quantize {quantize} quantises fp32 weights (ONNX Runtime's weight-only kernels take fp32 "
                       f"activations here); drop --precision {precision} or --quantize")
    return scheme


def _drop_engines(out: Path, trash: Path) -> list[str]:
    """Move every engine target's folder out of `out` (one rename each, so a killed export never leaves half a
    folder); `trash` is removed afterwards. Returns the folders moved."""
    from ..engines import all_targets

    dropped = []
    for target in all_targets():
        engines = out / target.engine_dir
        if engines.is_dir():
            trash.mkdir(exist_ok=True)
            engines.rename(trash / target.engine_dir)
            dropped.append(target.engine_dir)
    return dropped


def _blank(size: tuple[int, int]):
    from PIL import Image

    return Image.new("RGB", (size[1], size[0]), (127, 127, 127))


# ------------------------------------------------------------------------------------------------ the library stage
def load_for_source(adapter: BackboneAdapter, source: str, model_dir: Path | None, dtype=None) -> LoadedModel:
    """The eager model an artifacts folder or schedule was made from: `model_dir` wins, else the recorded source.
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


def export(schedule: Path, out: Path, *, model: Path | None = None, image_sizes: list[tuple[int, int]] = (),
           precision: str = "fp32", quantize: str | None = None, progress=None):
    """-> Artifacts: the model traced with `schedule` (a schedule.json) baked in, one vision and one prefill graph
    per image-size bucket (default: the sizes an embedded default was trained on, else DEFAULT_IMAGE_SIZES mapped to
    the processor's buckets), embed / full prefill / decode graphs once, weights stored once, artifacts.json and
    manifest.json. `model`: the checkpoint (default: the one the schedule was calibrated on)."""
    from ..base.manifest import write_manifest
    from ..calibration.schedule import read_schedule, read_vision_cut
    from ..graphs.adapter import get_adapter
    from ..graphs.checkpoint import config_fingerprint
    from .calibrate import DEFAULT_IMAGE_SIZES
    from .progress import Reporter, Stage
    from .results import Artifacts

    report = Reporter(Stage.EXPORT, progress)
    check_quantize(quantize, precision)  # before the model is loaded
    _, doc = read_schedule(schedule)
    adapter = get_adapter(doc.get("backbone", "?"))
    cut = read_vision_cut(doc, where=f"schedule {schedule}")  # before the model is loaded
    with report.status("loading the model"):  # at the export dtype: a bf16 checkpoint is never upcast to fp32
        loaded = load_for_source(adapter, doc["model"].get("source", ""), model, dtype=PRECISIONS.get(precision))
    sched, doc = read_schedule(schedule, backbone=adapter.name, fingerprint=config_fingerprint(loaded.config),
                               depth=adapter.text_stack(loaded).num_layers)
    image_sizes = [tuple(s) for s in image_sizes]
    if not image_sizes:
        processing = Processing(loaded.tokenizer, loaded.image_processor, loaded.config)
        wanted = [tuple(s) for s in loaded.meta.get("image_sizes", [])] or DEFAULT_IMAGE_SIZES
        image_sizes = list(dict.fromkeys(adapter.bucket_for(processing, s)[0] for s in wanted))
    count = report.counted("exporting", (2 if cut is None else 3) * len(image_sizes) + 4)
    graph_progress = GraphProgress(report, count)
    meta = export_artifacts(adapter, loaded, sched, doc, image_sizes, out, precision=precision,
                            report=graph_progress, log=report.message, quantize=quantize, cut=cut)
    count.finish()
    with report.status("hashing the artifacts for manifest.json"):
        write_manifest(out, export_manifest_extra(out))
    return Artifacts(Path(out), meta)


class GraphProgress:
    """export_artifacts' per-graph report -> the export's counted task (one step per graph) and one line per graph."""

    def __init__(self, report, count):
        self.report, self.count, self.done = report, count, 0

    def __call__(self, graph: str, phase: str, detail) -> None:
        if phase == "done":
            self.done += 1
            self.count(self.done)
            self.report.message(f"  {graph}: {detail['seconds']:.1f} s, graph {_mib(detail['graph_bytes'])}, "
                                f"weights.bin {_mib(detail['weights_bin_bytes'])}")
            return
        written = f", {_mib(detail)} written" if isinstance(detail, int) else ""
        self.count(self.done, detail=f"{graph}: {phase}{written}")


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


def lint(artifacts: Path) -> tuple[list[str], list]:
    """TensorRT-readiness of every exported graph -> (graph files, findings)."""
    from ..graphs.lint import lint_file

    meta_path = Path(artifacts) / "artifacts.json"
    if not meta_path.exists():
        raise BadInput(f"{artifacts} has no artifacts.json; run `halfv-export export` into it first")
    graphs = json.loads(meta_path.read_text())["graphs"]
    return graphs, [f for g in graphs for f in lint_file(Path(artifacts) / g)]
