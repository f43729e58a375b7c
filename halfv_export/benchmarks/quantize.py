"""`halfv-export bench --quantize int4|int8`: the quantised LLM graphs beside fp32, in one process, on the same inputs.

For each variant (fp32, then the scheme) the bench model's embed, HalfV prefill (at the reference N) and pruned decode
graphs are exported the way `export` writes them: one WeightStore (weights.bin + weights.json), the LLM graphs
quantised by graphs/quantize.py. Then, in ONNX Runtime CPU with its default session options (weight prepacking on for
both: each variant at its best speed), the HalfV prefill and one decode step on the cache that prefill produced are
timed, and the artifact bytes (every file the variant wrote) are summed. The prefill logits of the two variants are
compared (cosine, same top-1) as a first look at the quantisation error on random weights. The vision tower is not
part of it (it stays float in a quantised export, so it adds the same bytes to both)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..base.atomic import prepare_out_dir, write_text_atomic
from ..graphs.adapter import BackboneAdapter
from ..graphs.pruning import PruneSchedule
from ..graphs.quantize import scheme_for
from ..graphs.shared_weights import WeightStore, parameter_names
from ..graphs.specs import decode_spec, embed_spec, prefill_spec
from .bench import BenchShape, bench_inputs, bench_model, decode_feeds, feeds_of, measure_ort, ort_session


def export_variant(model, stack, sched: PruneSchedule, visual: int, directory: Path, scheme) -> dict:
    """embed + HalfV prefill + pruned decode into `directory` with shared weights; returns the graphs' paths."""
    directory.mkdir(parents=True, exist_ok=True)
    store = WeightStore(directory, parameter_names(model))
    try:
        paths = {"embed": embed_spec(stack).export(directory, store=store)}
        paths["prefill"] = prefill_spec(stack, sched, visual, label=f"n{visual}").export(directory, store=store,
                                                                                         quantize=scheme)
        paths["decode"] = decode_spec(stack, sched.cache_groups(stack.num_layers), pruned=True).export(
            directory, store=store, quantize=scheme)
    finally:
        store.close()
    return paths


def time_variant(paths: dict, stack, inputs, runs: int) -> tuple[dict, np.ndarray]:
    feeds = feeds_of(inputs)
    prefill = measure_ort(paths["prefill"], feeds, runs, ["logits"])
    session = ort_session(paths["prefill"])
    outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    del session
    spec_inputs = [i.name for i in ort_session(paths["decode"]).get_inputs()]
    decode = measure_ort(paths["decode"], decode_feeds(spec_inputs, stack.num_layers, inputs, outs), runs, ["logits"])
    return {"prefill": prefill, "decode_step": decode}, outs["logits"]


def run_quant_bench(out: Path, adapter: BackboneAdapter, shape: BenchShape, visual: int, text: int, runs: int,
                    scheme_name: str, log: Callable[[str], None] = print) -> dict:
    import onnxruntime as ort

    scheme = scheme_for(scheme_name)
    out = prepare_out_dir(out)
    log(f"building a random-weight {adapter.name} LLM: {shape}")
    config, model, stack = bench_model(adapter, shape)
    sched = PruneSchedule(**adapter.paper.at_depth(shape.layers))
    inputs, _ = bench_inputs(adapter, config, stack, visual, text)
    variants, logits = {}, {}
    for name, variant_scheme in (("fp32", None), (scheme_name, scheme)):
        log(f"{name}: exporting embed, HalfV prefill (N={visual}) and decode with shared weights")
        directory = out / name
        with torch.no_grad():
            paths = export_variant(model, stack, sched, visual, directory, variant_scheme)
        log(f"{name}: timing the prefill and a decode step")
        timing, logits[name] = time_variant(paths, stack, inputs, runs)
        files = [p for p in directory.iterdir() if p.is_file()]
        variants[name] = {**timing, "artifact_bytes": sum(p.stat().st_size for p in files),
                          "weights_bin_bytes": (directory / "weights.bin").stat().st_size}
    a, b = logits["fp32"].reshape(-1), logits[scheme_name].reshape(-1)
    result = {
        "backbone": adapter.name, "shape": asdict(shape), "visual": visual, "text_tokens": text, "runs": runs,
        "weights": "random", "quantize": scheme.describe(),
        "device": f"CPU ({os.cpu_count()} cores), ONNX Runtime {ort.__version__} CPU, ORT_ENABLE_ALL, prepacking on",
        "variants": variants,
        "size_ratio": round(variants["fp32"]["artifact_bytes"] / variants[scheme_name]["artifact_bytes"], 3),
        "prefill_speedup": round(variants["fp32"]["prefill"]["median_ms"]
                                 / variants[scheme_name]["prefill"]["median_ms"], 3),
        "decode_speedup": round(variants["fp32"]["decode_step"]["median_ms"]
                                / variants[scheme_name]["decode_step"]["median_ms"], 3),
        "prefill_logits_cosine": round(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), 6),
        "same_top1": bool(logits["fp32"].argmax() == logits[scheme_name].argmax()),
    }
    write_text_atomic(out / "quantize.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(out / "quantize.md", render_quant_bench(result))
    return result


def render_quant_bench(r: dict) -> str:
    s, q = r["shape"], r["quantize"]
    lines = [f"Quantised ({q['scheme']}, {q['op']}, {q['granularity']}) vs fp32 LLM graphs: {r['backbone']} LLM "
             f"hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab']}, random weights; HalfV prefill at "
             f"N = {r['visual']} + {r['text_tokens']} text tokens, batch 1; median of {r['runs']} after a warm-up; "
             f"{r['device']}.", "",
             "| variant | artifact bytes (embed + HalfV prefill + decode, weights.bin) | prefill ms | decode step ms |",
             "|---|---|---|---|"]
    for name, v in r["variants"].items():
        lines.append(f"| {name} | {v['artifact_bytes']:,} | {v['prefill']['median_ms']:.1f} | "
                     f"{v['decode_step']['median_ms']:.2f} |")
    lines += ["", f"fp32 / {q['scheme']}: size {r['size_ratio']:.2f}x, prefill {r['prefill_speedup']:.2f}x, decode "
              f"step {r['decode_speedup']:.2f}x; prefill logits cosine {r['prefill_logits_cosine']:.4f}, same top-1: "
              f"{r['same_top1']}.", ""]
    return "\n".join(lines)
