"""validate: exported engines against the eager HalfV reference (parity), HalfV against the unpruned model
(fidelity), latency and FLOPs, on held-out samples -> report.json, report.md, latency.png.

Parity compares like with like: the same schedule, inputs, batch layout. Eager inputs come from the model's own
vision tower and embeddings; engine inputs from vision_*.onnx and embed.onnx.

Near-ties. A trained model's farthest-point fill meets distances that differ below fp32 rounding (identical-looking
background cells), so an engine that computes the same inputs with other rounding may break a tie the other way and
keep another, equally valid set. Exact kept-index agreement is still reported (kept_indices_match); the gate is
selection_valid: a sample whose kept set differs counts as valid when eager HalfV, forced to keep the engine's set,
finds that set within TIE_TOLERANCE of one its own rule could pick (pruning.selection_shortfall: score gaps
relative to the scores, whose scale is 1/N, so the tolerance means the same at N = 64 and N = 4096). The logits and
greedy tokens of such a sample are then compared with that forced eager run, so the parity numbers measure the
graphs, not which way a tie fell.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..base.errors import BadInput
from ..base.atomic import write_text_atomic
from ..base.data import Sample, synthetic_set
from ..graphs.halfv import HalfVReference
from ..graphs.pruning import PruneSchedule, VisionCut
from ..graphs.tme import kl_last_token
from .accuracy import AccuracyTable, accuracy_section, answer_budget, cut_at_eos
from .flops import LMShape, prefill_flops
from .vision_flops import bucket_grid, vision_flops
from .plots import latency_plot

GREEDY_TOKENS = 16
LATENCY_RUNS = 7
NOISY_SPREAD = 1.5  # median / fastest run above this: the timings shared their cores with something else
PICTURES = 4  # samples drawn in kept.png
TIE_TOLERANCE = 1e-5  # of pruning.selection_shortfall: score gaps relative to the scores, fill gaps in [0, 2];
# fp32 rounding is ~1e-7 of either


def held_out_samples(buckets: list[tuple[int, int]], per_bucket: int = 2, seed: int = 1000) -> list[Sample]:
    """Synthetic samples not seen by calibration (other seed), resized to each exported bucket."""
    samples = []
    for i, (h, w) in enumerate(buckets):
        for s in synthetic_set(per_bucket, seed=seed + i):
            samples.append(Sample(f"{s.name}@{h}x{w}", s.image.resize((w, h)), s.prompt))
    return samples


def timed(fn: Callable[[], object], runs: int = LATENCY_RUNS) -> dict:
    """One warm-up, then `runs` timed calls: median and min in ms."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return {"median_ms": round(statistics.median(times), 3), "min_ms": round(min(times), 3), "runs": runs}


def noisy_timing(latency: dict) -> tuple[str, float] | None:
    """The timing whose median is furthest above its fastest run, when that spread exceeds NOISY_SPREAD. A busy
    core shows up exactly so: torch's intra-op threads wait for one that another process has descheduled (on the
    2-core box, a LLaVA-1.5 validate beside a training run recorded 478 ms for an unpruned eager prefill that takes
    31 ms on one thread)."""
    fastest = latency.get("min_ms") or {}
    spreads = {k: latency[k] / v for k, v in fastest.items() if v > 0 and k in latency}
    if not spreads:
        return None
    key = max(spreads, key=spreads.get)
    return (key, spreads[key]) if spreads[key] > NOISY_SPREAD else None


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def run_validation(pipeline, loaded, samples: list[Sample], schedule: PruneSchedule, weights: str,
                   progress: Callable = iter, batch_size: int = 2, pictures: list | None = None) -> dict:
    """Parity and fidelity on every sample; where samples carry an answer, also task accuracy of the unpruned eager
    model ("full"), eager HalfV ("halfv") and the exported HalfV graphs ("engine"), from the same greedy tokens that
    parity compares (generated without stopping, then cut at the first EOS). `pictures`, when a list, receives
    (image, bucket, the engine's kept indices per stage, sample) of the first PICTURES samples with an image."""
    adapter = pipeline.adapter
    stack = adapter.text_stack(loaded)
    eager_halfv, eager_full = HalfVReference(stack, schedule), HalfVReference(stack, None)
    eos = adapter.eos_token_ids(loaded)
    cut = build_cut(pipeline)

    # group samples into batches of one bucket each
    groups: dict = {}
    for sample in samples:
        image = pipeline.fit_image(sample.image)
        key = None if image is None else adapter.bucket_for(pipeline.processing, (image.height, image.width))[0]
        groups.setdefault(key, []).append((sample, image))
    batches = [items[i:i + batch_size] for items in groups.values() for i in range(0, len(items), batch_size)]

    kept_match, max_abs, cos_min, tokens_match, top1, kls, n_samples = [], 0.0, 1.0, [], [], [], 0
    cosines, engine_top1, token_agreement, valid, shortfalls = [], [], [], [], []
    table, greedy_tokens = AccuracyTable(), GREEDY_TOKENS
    for batch in progress(batches):
        images, prompts = [im for _, im in batch], [s.prompt for s, _ in batch]
        answers = [s.answer for s, _ in batch]
        host = pipeline.host(images, prompts)  # the rows run / the API / serve run, padding included
        full_inputs = adapter.embed_host(loaded, host)  # ... and the eager side sees the same rows
        own_inputs = full_inputs if cut is None else adapter.embed_host(loaded, host, cut)  # a cut build's HalfV rows
        engine = pipeline.prefill(host, halfv=True)
        logits = pipeline.to_host(engine.logits)  # the engine's arrays may live on its device
        engine_kept = {stage: pipeline.to_host(k) for stage, k in engine.kept.items()}
        vision_same, ref_inputs = [], own_inputs
        if own_inputs.visual_tokens is not None:  # the cut's tokens first: the prefill's rows follow from them
            vision_same = [bool(np.array_equal(engine_kept["vision"][b], own_inputs.visual_tokens[b].numpy()))
                           for b in range(len(batch))]
            if not all(vision_same):  # a near-tie in the tower: the eager side keeps the engine's tokens instead
                ref_inputs = adapter.embed_host(loaded, host, cut, force_vision=engine_kept["vision"])
        eager_own = eager_halfv.prefill(own_inputs)
        eager = eager_own if ref_inputs is own_inputs else eager_halfv.prefill(ref_inputs)
        full = eager_full.prefill(full_inputs)
        ref_logits = eager.logits.numpy()
        same = [[bool(np.array_equal(engine_kept.get(stage, np.empty((len(batch), 0)))[b], kept[b].numpy()))
                 for stage, kept in eager.kept.items()] + vision_same[b:b + 1] for b in range(len(batch))]
        force, parity_ref = None, eager
        if not all(all(row[:len(eager.kept)]) for row in same):  # an IVR / SSR tie fell the other way somewhere
            force = {stage: torch.as_tensor(engine_kept[stage]) for stage in ("ivr", "ssr")
                     if stage in engine_kept and stage in eager.kept}
            parity_ref = eager_halfv.prefill(ref_inputs, force=force)
            ref_logits = parity_ref.logits.numpy()
        for b in range(len(batch)):
            if pictures is not None and len(pictures) < PICTURES and images[b] is not None:
                pictures.append((images[b], host.bucket, picture_kept({k: v[b] for k, v in engine_kept.items()}),
                                 batch[b][0]))
            cosines.append(_cosine(logits[b], ref_logits[b]))
            cos_min = min(cos_min, cosines[-1])
            engine_top1.append(bool(logits[b].argmax() == ref_logits[b].argmax()))
            kept_match += same[b]
            if not all(same[b]):
                gaps = [float(v[b]) for v in parity_ref.shortfall.values()]
                if ref_inputs.visual_shortfall is not None:
                    gaps.append(float(ref_inputs.visual_shortfall[b]))
                shortfalls.append(max(gaps, default=math.inf))
            valid += [all(same[b]) or shortfalls[-1] <= TIE_TOLERANCE] * len(same[b])
        max_abs = max(max_abs, float(np.abs(logits - ref_logits).max()))
        new_tokens = answer_budget(loaded.tokenizer, answers, floor=GREEDY_TOKENS)
        greedy_tokens = max(greedy_tokens, new_tokens)
        engine_tokens = pipeline.generate(images, prompts, new_tokens, stop_at_eos=False)
        eager_tokens = eager_halfv.generate(own_inputs, new_tokens).numpy()  # eager HalfV's own answers (accuracy)
        parity_tokens = (eager_tokens if force is None and ref_inputs is own_inputs
                         else eager_halfv.generate(ref_inputs, new_tokens, force=force).numpy())
        tokens_match += [bool(np.array_equal(engine_tokens[b], parity_tokens[b])) for b in range(len(batch))]
        token_agreement += [float(np.mean(np.asarray(engine_tokens[b]) == parity_tokens[b]))
                            for b in range(len(batch))]
        top1 += (eager_own.logits.argmax(-1) == full.logits.argmax(-1)).tolist()
        kls += kl_last_token(full.logits, eager_own.logits).tolist()
        if any(a is not None for a in answers):
            full_tokens = eager_full.generate(full_inputs, new_tokens, eos).numpy()
            for b, (sample, _) in enumerate(batch):
                if sample.answer is None:
                    continue
                for system, tokens in (("full", full_tokens), ("halfv", eager_tokens), ("engine", engine_tokens)):
                    text = adapter.decode_text(loaded, cut_at_eos(tokens[b], eos))
                    table.add(system, sample.type, text, sample.answer, sample.name)
        n_samples += len(batch)

    parity = {
        **({"kept_indices_match": float(np.mean(kept_match)),  # absent: nothing compared
            "selection_valid": float(np.mean(valid))} if kept_match else {}),
        "kept_pairs": len(kept_match),
        "selection_tolerance": TIE_TOLERANCE, "selection_differs": len(shortfalls),  # samples, not pairs
        "selection_shortfall_max": max(shortfalls, default=0.0),
        "logits_max_abs_diff": max_abs, "logits_cosine_min": cos_min, "logits_cosine_mean": float(np.mean(cosines)),
        "top1_agreement": float(np.mean(engine_top1)),  # the engine's first token vs eager HalfV's
        "greedy_tokens_match": float(np.mean(tokens_match)), "greedy_tokens": greedy_tokens,
        "greedy_token_agreement": float(np.mean(token_agreement)),  # share of the greedy positions that agree
    }
    fidelity = {"top1_agreement": float(np.mean(top1)), "kl_mean": float(np.mean(kls)), "weights": weights,
                "note": ("random weights: agreement with the unpruned model measures the graphs, not accuracy"
                         if weights == "random" else "first-token agreement with the unpruned model")}
    result = {"samples": n_samples, "parity": parity, "fidelity": fidelity}
    if table.hits:
        result["accuracy"] = accuracy_section(table)
    return result


def build_cut(pipeline) -> VisionCut | None:
    """The vision cut a build was exported with (artifacts.json), or None."""
    return None if not pipeline.vision_cut else VisionCut(**pipeline.vision_cut)


def picture_kept(kept: dict) -> dict:
    """One sample's kept indices per stage, as token indices of the image: after a vision cut, IVR / SSR index the
    K rows the cut kept, so they are mapped through the cut's tokens."""
    if "vision" not in kept:
        return kept
    tokens = np.asarray(kept["vision"])
    return {stage: tokens if stage == "vision" else tokens[np.asarray(k)] for stage, k in kept.items()}


def measure_latency(pipeline, loaded, sample: Sample, schedule: PruneSchedule,
                    runs: int = LATENCY_RUNS) -> tuple[dict, dict]:
    """Medians of `runs` runs after a warm-up, batch 1, on one sample: prefill (LLM only, embeddings
    ready) eager/engine x full/HalfV, time to first token (host inputs + embedding + vision tower + prefill: what a
    user waits for; HalfV leaves everything but the prefill unchanged, unless the build has a vision cut, which
    also shortens the tower), and one engine decode step on the pruned cache. Also that sample's FLOPs,
    prefill-only and end to end (vision encoder included)."""
    adapter = pipeline.adapter
    stack = adapter.text_stack(loaded)
    cut = build_cut(pipeline)
    image = pipeline.fit_image(sample.image)
    host = pipeline.host([image], [sample.prompt])
    inputs_full = adapter.embed_host(loaded, host)
    inputs = inputs_full if cut is None else adapter.embed_host(loaded, host, cut)
    prompt_full = pipeline.prompt(host, halfv=False)
    prompt = prompt_full if cut is None else pipeline.prompt(host, halfv=True)
    halfv, full = HalfVReference(stack, schedule), HalfVReference(stack, None)
    state = pipeline.prefill(host, halfv=True, prompt=prompt)
    token = pipeline.arrays.argmax(state.logits, -1)  # stays on the engine's device

    def decode_once():
        saved = (list(state.past), list(state.valid), state.next_positions.copy())
        pipeline.decode_step(token, state)
        state.past, state.valid, state.next_positions = saved

    timings = {
        "eager_full_prefill": lambda: full.prefill(inputs_full),
        "eager_halfv_prefill": lambda: halfv.prefill(inputs),
        "engine_full_prefill": lambda: pipeline.prefill(host, halfv=False, prompt=prompt_full),
        "engine_halfv_prefill": lambda: pipeline.prefill(host, halfv=True, prompt=prompt),
        "engine_decode_step": decode_once,
        "eager_embed_vision": lambda: adapter.prepare(loaded, [image], [sample.prompt]),
        "engine_embed_vision": lambda: pipeline.prompt(pipeline.host([image], [sample.prompt]), halfv=False),
        "eager_full_ttft": lambda: full.prefill(adapter.prepare(loaded, [image], [sample.prompt])),
        "eager_halfv_ttft": lambda: halfv.prefill(adapter.prepare(loaded, [image], [sample.prompt], cut)),
        "engine_full_ttft": lambda: pipeline.prefill(pipeline.host([image], [sample.prompt]), halfv=False),
        "engine_halfv_ttft": lambda: pipeline.prefill(pipeline.host([image], [sample.prompt]), halfv=True),
    }
    if cut is not None:  # the cut tower and the cut rows: HalfV's own embedding + vision
        timings["eager_halfv_embed_vision"] = lambda: adapter.prepare(loaded, [image], [sample.prompt], cut)
        timings["engine_halfv_embed_vision"] = lambda: pipeline.prompt(pipeline.host([image], [sample.prompt]))
    measured = {key: timed(fn, runs) for key, fn in timings.items()}
    sequence = int(host.attention_mask[0].sum())  # the prompt's own tokens; FLOPs count these
    latency = {key: m["median_ms"] for key, m in measured.items()}
    latency.update({
        # the fastest run beside each median: a wide spread says the cores were shared (see noisy_timing)
        "min_ms": {key: m["min_ms"] for key, m in measured.items()}, "torch_threads": torch.get_num_threads(),
        "runs": runs, "batch": 1, "visual_tokens": host.num_visual, "sequence": sequence,
        "sequence_padded": int(host.input_ids.shape[1]),  # the rows the graphs ran (prompts.PAD_MULTIPLE)
    })
    if cut is not None and host.num_visual > 0:
        latency["kept_visual"] = inputs.num_visual
    shape = LMShape.from_config(loaded.config.to_dict())
    text = sequence - host.num_visual
    f_full = prefill_flops(shape, host.num_visual, text, None)  # the unpruned model sees all N tokens
    f = prefill_flops(shape, inputs.num_visual, text, schedule)  # HalfV sees K after a cut, else N
    flops = {"full": f_full.full, "halfv": f.halfv, "overhead": f.overhead, "ratio": f_full.full / f.halfv,
             "visual_tokens": host.num_visual, "text_tokens": text}
    if host.num_visual > 0:
        config = loaded.config.to_dict()
        grid = bucket_grid(config, host.bucket)
        v = vision_flops(config, shape.hidden, host.num_visual, grid)
        v_halfv = v if cut is None else vision_flops(config, shape.hidden, host.num_visual, grid, cut)
        flops.update({"vision": v.total, "e2e_ratio": (v.total + f_full.full) / (v_halfv.total + f.halfv)})
        if cut is not None:
            flops.update({"vision_halfv": v_halfv.total, "kept_visual": inputs.num_visual})
    return latency, flops


def lookup(report: dict, key: str):
    if key.split(".")[0] in ("accuracy", "baselines") and key.split(".")[0] not in report:
        raise BadInput(f"threshold names '{key}', but this validation scored no answers; pass --data with an "
                       "\"answer\" on each line (e.g. a folder written by `halfv-export make-task`)")
    node = report
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise BadInput(f"threshold names unknown metric '{key}'; e.g. parity.kept_indices_match")
        node = node[part]
    if node is None:
        raise BadInput(f"metric '{key}' has no value in this report (e.g. a retention when the unpruned accuracy "
                       "is 0); gate on another metric")
    if not isinstance(node, (int, float)) or isinstance(node, bool):
        raise BadInput(f"metric '{key}' is not a number")
    return float(node)


# every number a report can carry, so a gate naming anything else is refused before the validation runs
METRICS = (
    "parity.kept_indices_match", "parity.kept_pairs", "parity.selection_valid", "parity.selection_differs",
    "parity.selection_shortfall_max", "parity.logits_max_abs_diff", "parity.logits_cosine_min",
    "parity.logits_cosine_mean", "parity.top1_agreement", "parity.greedy_tokens_match",
    "parity.greedy_token_agreement", "fidelity.top1_agreement", "fidelity.kl_mean", "latency_ms.eager_full_prefill",
    "latency_ms.eager_halfv_prefill", "latency_ms.engine_full_prefill", "latency_ms.engine_halfv_prefill",
    "latency_ms.engine_decode_step", "latency_ms.eager_embed_vision", "latency_ms.engine_embed_vision",
    "latency_ms.eager_full_ttft", "latency_ms.eager_halfv_ttft", "latency_ms.engine_full_ttft",
    "latency_ms.engine_halfv_ttft", "latency_ms.eager_halfv_embed_vision", "latency_ms.engine_halfv_embed_vision",
    "flops.full", "flops.halfv", "flops.overhead", "flops.ratio", "flops.vision",
    "flops.e2e_ratio", "flops.vision_halfv",
)
CUT_ONLY = ("latency_ms.eager_halfv_embed_vision", "latency_ms.engine_halfv_embed_vision", "flops.vision_halfv")
OPEN_SECTIONS = ("accuracy.",)  # keys that depend on the data (e.g. per question type)


def parse_thresholds(items: tuple[str, ...], flag: str) -> list[tuple[str, float]]:
    """KEY=VALUE gates; an unknown metric name is refused here, before anything is loaded."""
    parsed = []
    for item in items:
        key, sep, value = item.partition("=")
        try:
            parsed.append((key.strip(), float(value)))
        except ValueError:
            raise BadInput(f"{flag} {item!r}: write KEY=VALUE, e.g. parity.kept_indices_match=1.0") from None
        if not sep:
            raise BadInput(f"{flag} {item!r}: write KEY=VALUE, e.g. parity.kept_indices_match=1.0")
        if key.strip() not in METRICS and not key.strip().startswith(OPEN_SECTIONS):
            raise BadInput(f"{flag} {item!r}: threshold names unknown metric '{key.strip()}'; e.g. "
                           "parity.kept_indices_match (the metrics are listed in the README's validate section)")
    return parsed


def check_thresholds(report: dict, under: list[tuple[str, float]], over: list[tuple[str, float]]) -> list[str]:
    """Failures as 'metric value < limit' lines (fail-under: value must be >= limit; fail-over: <= limit)."""
    failures = []
    for key, limit in under + over:
        if key in NOT_MEASURED and lookup_optional(report, key) is None:
            failures.append(f"{key} was not measured ({NOT_MEASURED[key]}); a gate on it cannot pass")
    for key, limit in under:
        if lookup_optional(report, key) is not None and (value := lookup(report, key)) < limit:
            failures.append(f"{key} = {value:.6g} is under {limit:g}")
    for key, limit in over:
        if lookup_optional(report, key) is not None and (value := lookup(report, key)) > limit:
            failures.append(f"{key} = {value:.6g} is over {limit:g}")
    return failures


# metrics a report may lack because nothing was there to compare, and why
NOT_MEASURED = {"parity.kept_indices_match": "no sample had an image, so no kept indices were compared",
                "parity.selection_valid": "no sample had an image, so no kept indices were compared",
                "flops.vision": "the latency sample had no image", "flops.e2e_ratio": "the latency sample had no image",
                **{key: "the build has no vision cut (HalfV runs the same tower), or the latency sample had no image"
                   for key in CUT_ONLY}}


def lookup_optional(report: dict, key: str):
    """lookup for a metric that may be absent (NOT_MEASURED); unknown names are still refused."""
    try:
        return lookup(report, key)
    except BadInput:
        if key in NOT_MEASURED:
            return None
        raise


def _value(section: dict, key: str) -> str:
    return f"{section[key]:.4f}" if key in section else "not measured"


def _quantize_note(quantize: dict | None) -> list[str]:
    if not quantize:
        return []
    return [f"Quantised export ({quantize['scheme']}, {quantize['op']}, {quantize['granularity']}) against the fp32 "
            "eager reference: these rows are its distance to the float model, not exactness. Quantised logits move "
            "the relevance scores too, so kept indices may legitimately differ; the default exactness gates "
            "(kept indices 1.0, greedy 1.0, logits 1e-3) do not apply — gate on logits_cosine_min, top1_agreement "
            "or greedy_token_agreement instead.", ""]


def render_markdown(report: dict) -> str:
    p, f, lat, fl = report["parity"], report["fidelity"], report["latency_ms"], report["flops"]
    lines = [
        f"# halfv-export validation: {report['backbone']} ({report['source']})", "",
        f"{report['samples']} held-out samples, buckets {', '.join(report['buckets'])}; schedule "
        f"`{json.dumps(report['schedule'])}`" + (f"; vision cut `{json.dumps(report['vision_cut'])}` (HalfV's "
                                                  "tower keeps K of N tokens; the kept pairs include it)"
                                                  if report.get("vision_cut") else "") + ".", "",
        "## Parity: exported engines vs eager HalfV", "", *_quantize_note(report.get("quantize")),
        "| metric | value |", "|---|---|",
        f"| kept_indices_match ({p['kept_pairs']} sample-stage pairs) | {_value(p, 'kept_indices_match')} |",
        f"| selection_valid (exact, or within {p['selection_tolerance']:g} of a near-tie) | "
        f"{_value(p, 'selection_valid')} |",
        f"| samples whose kept set differs / largest shortfall | {p['selection_differs']} / "
        f"{p['selection_shortfall_max']:.3g} |",
        f"| logits_max_abs_diff | {p['logits_max_abs_diff']:.3g} |",
        f"| logits_cosine_min | {p['logits_cosine_min']:.6f} |",
        f"| logits_cosine_mean | {p['logits_cosine_mean']:.6f} |",
        f"| top1_agreement (first token) | {p['top1_agreement']:.4f} |",
        f"| greedy_tokens_match ({p['greedy_tokens']} tokens, whole sequence) | {p['greedy_tokens_match']:.4f} |",
        f"| greedy_token_agreement (share of positions) | {p['greedy_token_agreement']:.4f} |", "",
        f"## Fidelity: eager HalfV vs the unpruned model ({f['weights']} weights)", "",
        f"top-1 agreement {f['top1_agreement']:.4f}, mean KL {f['kl_mean']:.4g}. {f['note']}.", "",
        f"## Latency (ms, median of {lat['runs']} after warm-up, batch 1, N = {lat['visual_tokens']}"
        + (f", K = {lat['kept_visual']} after the vision cut" if "kept_visual" in lat else "") + ", "
        f"S = {lat['sequence']}, {report['device']})", "", "| | full | HalfV | full/HalfV |", "|---|---|---|---|",
        f"| eager prefill | {lat['eager_full_prefill']:.2f} | {lat['eager_halfv_prefill']:.2f} | "
        f"{lat['eager_full_prefill'] / lat['eager_halfv_prefill']:.2f}x |",
        f"| engine prefill | {lat['engine_full_prefill']:.2f} | {lat['engine_halfv_prefill']:.2f} | "
        f"{lat['engine_full_prefill'] / lat['engine_halfv_prefill']:.2f}x |",
        f"| engine decode step | | {lat['engine_decode_step']:.2f} | |",
    ]
    if "engine_full_ttft" in lat:
        lines += [
            _embed_row(lat, "eager"), _embed_row(lat, "engine"),
            f"| eager time to first token | {lat['eager_full_ttft']:.2f} | {lat['eager_halfv_ttft']:.2f} | "
            f"{lat['eager_full_ttft'] / lat['eager_halfv_ttft']:.2f}x |",
            f"| engine time to first token | {lat['engine_full_ttft']:.2f} | {lat['engine_halfv_ttft']:.2f} | "
            f"{lat['engine_full_ttft'] / lat['engine_halfv_ttft']:.2f}x |",
        ]
    noisy = noisy_timing(lat)
    if noisy is not None:
        lines += ["", f"**Noisy timings:** the median of {noisy[0]} is {noisy[1]:.1f}x its fastest run "
                      f"(torch threads: {lat.get('torch_threads')}): something else was using these cores. Re-run "
                      "validate on an idle machine before reading the latencies; the FLOPs below do not depend on it."]
    lines += [
        "", "## FLOPs (that sample)", "",
        f"LLM prefill: full {fl['full'] / 1e9:.3f} GFLOP, HalfV {fl['halfv'] / 1e9:.3f} GFLOP, ratio "
        f"{fl['ratio']:.2f}x (selection overhead {fl['overhead'] / 1e6:.2f} MFLOP, not in the ratio).",
    ]
    if "vision_halfv" in fl:
        lines += [f"End to end: vision encoder {fl['vision'] / 1e9:.3f} GFLOP unpruned, {fl['vision_halfv'] / 1e9:.3f} "
                  f"GFLOP with the vision cut (the LLM gets {fl['kept_visual']} of {fl['visual_tokens']} visual tokens);"
                  f" ratio {fl['e2e_ratio']:.2f}x."]
    elif "e2e_ratio" in fl:
        lines += [f"End to end (vision encoder {fl['vision'] / 1e9:.3f} GFLOP added to both): ratio "
                  f"{fl['e2e_ratio']:.2f}x."]
    lines += [""]
    if report.get("accuracy"):
        lines += accuracy_markdown(report["accuracy"])
    if report.get("baselines"):
        lines += baselines_markdown(report["baselines"])
    if report.get("search_check"):
        lines += search_check_markdown(report["search_check"])
    if report.get("thresholds"):
        lines += ["## Gates", ""] + [f"- {line}" for line in report["thresholds"]["failures"] or ["all passed"]]
    return "\n".join(lines) + "\n"


def _embed_row(lat: dict, side: str) -> str:
    """The embedding + vision row: the same for both columns, unless a vision cut gave HalfV its own tower."""
    full = lat[f"{side}_embed_vision"]
    halfv = lat.get(f"{side}_halfv_embed_vision", full)
    ratio = f"{full / halfv:.2f}x" if f"{side}_halfv_embed_vision" in lat else ""
    return f"| {side} embedding + vision | {full:.2f} | {halfv:.2f} | {ratio} |"


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def accuracy_markdown(acc: dict) -> list[str]:
    lines = ["## Task accuracy (greedy answers, exact match)", "",
             f"Normalisation: {acc['normalisation']}. retention = eager HalfV / unpruned.", "",
             "| question type | count | unpruned (eager) | HalfV (eager) | HalfV (engine) | retention |",
             "|---|---|---|---|---|---|"]
    for kind, row in [("all", acc)] + list(acc["per_type"].items()):
        lines.append(f"| {kind} | {row['count']} | {_pct(row.get('full'))} | {_pct(row.get('halfv'))} | "
                     f"{_pct(row.get('engine'))} | {_pct(row.get('retention'))} |")
    return lines + [""]


def baselines_markdown(base: dict) -> list[str]:
    lines = ["## Baselines at the same prefill FLOPs (eager, greedy, exact match)", "",
             f"Every baseline prunes once before layer {base['layer']} and keeps the K visual rows whose prefill "
             "FLOPs come closest to HalfV's. FLOPs: LLM prefill, fraction of the unpruned model; TTFT adds the vision "
             "tower.", "",
             "| method | visual rows kept at L1 (per N) | FLOPs fraction | TTFT FLOPs fraction | accuracy | retention |",
             "|---|---|---|---|---|---|"]
    cut = base.get("vision_cut")
    if cut:
        lines[2:2] = [f"This build cuts the vision tower (after block {cut['block']}, keep {cut['keep']:g}): every "
                      "method selects from the cut's rows; the unpruned model runs the whole tower.", ""]
    tower = (cut or {}).get("kept", {})  # N -> the K rows the cut leaves the LLM
    for row in base["methods"].values():
        kept = ", ".join(f"{k} of {tower[n]} (N {n})" if n in tower else f"{k} of {n}" for n, k in row["kept"].items())
        lines.append(f"| {row['label']} | {kept} | {row['flops_fraction']:.3f} | {row['ttft_flops_fraction']:.3f} | "
                     f"{_pct(row['accuracy'])} | {_pct(row['retention'])} |")
    return lines + [""]


def search_check_markdown(check: dict) -> list[str]:
    bucket = "x".join(str(v) for v in check["bucket"])
    lines = ["## Searched schedule vs the paper's, held out (eager)", "",
             f"The schedule was searched for a {check['ratio_kind']} FLOPs ratio >= {check['target_ratio']:g} at "
             f"{bucket} on calibration samples; here both run on these {check['samples']} samples, which the search "
             f"never saw (unpruned accuracy {_pct(check.get('full_accuracy'))}).", "",
             f"| schedule | FLOPs ratio at {bucket} | mean KL to unpruned | top-1 agreement | accuracy |",
             "|---|---|---|---|---|"]
    for name in ("searched", "paper"):
        row = check[name]
        lines.append(f"| {name} `{json.dumps(row['schedule'])}` | {row['ratio']:.2f} | {row['kl_mean']:.4g} | "
                     f"{row['top1_agreement']:.3f} | {_pct(row.get('accuracy'))} |")
    return lines + [""]


def write_report(out: Path, report: dict) -> None:
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "report.md", render_markdown(report))
    latency_plot(report["latency_ms"], f"{report['backbone']}: prefill latency, N = "
                 f"{report['latency_ms']['visual_tokens']} ({report['device']})", out / "latency.png")
