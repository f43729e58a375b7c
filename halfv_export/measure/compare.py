"""HalfV against ablation baselines at the same prefill FLOPs, on data with answers (eager PyTorch, greedy).

For each HalfV schedule (one per keep ratio rho; the other fields as given) and each N, the baselines prune once,
before HalfV's IVR layer L1, and keep the K visual rows whose single-cut prefill FLOPs come closest to HalfV's
(flops.matched_keep), so every method spends the same compute:

    halfv      IVR at L1 (anchors + farthest-point fill, K1 = floor(N rho)) + SSR at L2 (top-K2 or freeze)
    ivr        the same IVR selection, K rows, no SSR
    attention  the top-K last-token relevance scores at L1 - 1 (FastV-like), no diversity fill, no SSR
    random     K rows drawn uniformly, a fresh draw per image from one stream per (method, rho) seeded with
               `seed`: the same data in the same order draws the same subsets; no SSR

With a vision cut (beyond the paper, graphs/vision_cut.py) every method runs on the cut tower's K kept tokens and
the baselines match HalfV's prefill FLOPs on those K rows; the unpruned model stays uncut.

Accuracy is exact match of the greedy answer (measure.accuracy); FLOPs are the analytic LLM prefill count
(measure.flops), as a fraction of the unpruned model's, averaged over samples; the TTFT fraction adds the vision
tower (measure.vision_flops: the cut one where there is a cut) to both sides.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from ..base.data import Sample
from ..base.errors import BadInput
from ..graphs.adapter import Processing
from ..graphs.halfv import HalfVReference
from ..graphs.pruning import PruneSchedule, SingleCut, VisionCut, budgets
from .accuracy import AccuracyTable, answer_budget, cut_at_eos, retention
from .flops import LMShape, matched_keep, prefill_flops, single_cut_flops
from .vision_flops import bucket_grid, vision_flops

METHODS = ("halfv", "ivr", "attention", "random")
LABELS = {"halfv": "HalfV (IVR + SSR)", "ivr": "IVR without SSR", "attention": "attention only (FastV-like)",
          "random": "random"}


def bucket_batches(adapter, loaded, samples: list[Sample], batch_size: int,
                   needs: str = "comparing pruning methods") -> list[list[Sample]]:
    """Samples grouped by the image-size bucket they resize to (a batch shares N), in batches of batch_size; a
    sample without an image is refused, naming what `needs` one."""
    processing = Processing(loaded.tokenizer, loaded.image_processor, loaded.config)
    groups: dict = {}
    for sample in samples:
        if sample.image is None:
            raise BadInput(f"sample {sample.name} has no image; {needs} needs an image per sample")
        key = adapter.bucket_for(processing, (sample.image.height, sample.image.width))[0]
        groups.setdefault(key, []).append(sample)
    return [items[i:i + batch_size] for items in groups.values() for i in range(0, len(items), batch_size)]


def _batches(adapter, loaded, samples: list[Sample], batch_size: int) -> list[list[Sample]]:
    answered = [s for s in samples if s.answer is not None]
    if not answered:
        raise BadInput("no sample carries an \"answer\"; compare needs data with answers (halfv-export make-task)")
    return bucket_batches(adapter, loaded, answered, batch_size)


def evaluate_methods(adapter, loaded, samples: list[Sample], schedules: list[PruneSchedule],
                     methods: tuple[str, ...] = METHODS, seed: int = 0, batch_size: int = 8,
                     progress: Callable = iter, labels: list[str] | None = None,
                     cut: VisionCut | None = None) -> dict:
    """Accuracy and FLOPs of the unpruned model and of every (schedule, method) pair on the same samples; the
    unpruned model runs once per batch whatever the number of schedules. `cut`: every method runs on the cut
    tower's rows (the unpruned model on the whole tower's).

    labels name the schedules in the systems' names ("halfv@<label>"); the default, each keep ratio, suits a sweep
    over rho and must be replaced when two schedules share one.
    Returns {"full": {...}, "points": [{"keep_ratio", "schedule", "methods": {method: {...}}}]}."""
    stack = adapter.text_stack(loaded)
    shape = LMShape.from_config(loaded.config.to_dict())
    eos = adapter.eos_token_ids(loaded)
    table = AccuracyTable()
    fractions: dict[str, list[float]] = {}
    kept: dict[str, dict[str, int]] = {}
    labels = labels or [f"{s.keep_ratio:g}" for s in schedules]
    if len(set(labels)) != len(labels):
        raise ValueError(f"schedule labels must be unique, got {labels}")
    draws = {f"random@{label}": torch.Generator().manual_seed(seed) for label in labels}  # across batches
    config = loaded.config.to_dict()
    processing = Processing(loaded.tokenizer, loaded.image_processor, loaded.config)
    ttft: dict[str, list[float]] = {}
    tower_kept: dict[str, int] = {}  # the image's N -> the tokens the tower hands the LLM (K after a cut)
    for batch in progress(_batches(adapter, loaded, samples, batch_size)):
        images, prompts = [s.image for s in batch], [s.prompt for s in batch]
        inputs = adapter.prepare(loaded, images, prompts)
        pruned_inputs = inputs if cut is None else adapter.prepare(loaded, images, prompts, cut)
        n_full, n = inputs.num_visual, pruned_inputs.num_visual  # N, and the K a vision cut keeps (else N)
        text = float((inputs.attention_mask.sum(dim=1) - n_full).float().mean())  # mean real text rows
        n_text = int(round(text))
        full_flops = prefill_flops(shape, n_full, n_text, None).full
        grid = bucket_grid(config, adapter.bucket_for(processing, (images[0].height, images[0].width))[0], n_full)
        vision_full = vision_flops(config, shape.hidden, n_full, grid).total
        vision_pruned = vision_full if cut is None else vision_flops(config, shape.hidden, n_full, grid, cut).total
        tower_kept[str(n_full)] = n
        new_tokens = answer_budget(loaded.tokenizer, [s.answer for s in batch])

        def score(system: str, reference: HalfVReference, inputs=pruned_inputs) -> None:
            tokens = reference.generate(inputs, new_tokens, eos).numpy()
            for b, sample in enumerate(batch):
                table.add(system, sample.type, adapter.decode_text(loaded, cut_at_eos(tokens[b], eos)), sample.answer,
                          sample.name)

        score("full", HalfVReference(stack, None), inputs)
        for schedule, label in zip(schedules, labels):
            halfv_flops = prefill_flops(shape, n, n_text, schedule).halfv
            for method in methods:
                system = f"{method}@{label}"
                if method == "halfv":
                    reference, spent, k = HalfVReference(stack, schedule), halfv_flops, budgets(n, schedule).k1
                else:
                    k = matched_keep(shape, n, n_text, schedule.ivr_layer, halfv_flops)
                    single = SingleCut(method, schedule.ivr_layer, k, schedule.anchor_ratio, seed)
                    reference, spent = HalfVReference(stack, None, cut=single, draws=draws.get(system)), single_cut_flops(
                        shape, n, n_text, schedule.ivr_layer, k)
                score(system, reference)
                fractions.setdefault(system, []).extend([spent / full_flops] * len(batch))
                ttft.setdefault(system, []).extend([(vision_pruned + spent) / (vision_full + full_flops)] * len(batch))
                kept.setdefault(system, {})[str(n_full)] = k  # the image's N -> visual rows kept at L1

    def summary(system: str) -> dict:
        acc = table.accuracy(system)
        return {"accuracy": acc, "count": table.count(system),
                "per_type": {t: {"accuracy": table.accuracy(system, t), "count": table.count(system, t)}
                             for t in table.types()}}

    full = summary("full")
    points = []
    for schedule, label in zip(schedules, labels):
        row = {"keep_ratio": schedule.keep_ratio, "schedule": schedule.__dict__.copy(), "methods": {}}
        for method in methods:
            system = f"{method}@{label}"
            entry = summary(system)
            entry.update({"label": LABELS[method], "flops_fraction": float(np.mean(fractions[system])),
                          "ttft_flops_fraction": float(np.mean(ttft[system])), "kept": kept[system],
                          "retention": retention(entry["accuracy"], full["accuracy"])})
            row["methods"][method] = entry
        points.append(row)
    return {"full": full, "points": points, "examples": table.examples,
            "vision_cut": None if cut is None else {"block": cut.block, "keep": cut.keep, "kept": tower_kept}}


def sweep_schedules(base: PruneSchedule, keep_ratios: list[float]) -> list[PruneSchedule]:
    """The base schedule at each keep ratio (everything else unchanged; K2 = min(floor(N sigma), K1) as always)."""
    return [replace(base, keep_ratio=float(r)) for r in keep_ratios]
