"""How often bf16 changes the eager reference's own HalfV selection, against the same reference in fp32.

    python tools/bf16_selection_drift.py --threads 1

The embedded Qwen2.5-VL default (its shipped trained weights) is loaded twice: fp32, and the same weights cast to
bf16 (the whole model: vision tower, embeddings and decoder layers, as a bf16 deployment runs it; the selection maths
in graphs/pruning.py then scores and fills in fp32 from bf16 projections and norms). --fp32-vision casts only the
language model and feeds it the fp32 run's embeddings. For each image size and each IVR layer, the digit task's
images and questions (halfv_export.tasks.digits.task_set, the generator behind `halfv-export make-task`) are prefilled
by HalfVReference with the paper's Qwen ratios (keep 0.25, anchors 0.1, SSR top-K 0.05 of N) and the SSR layer given,
and the kept sets of both stages are compared.

A case is one (image, size, IVR layer). Per (size, IVR layer) and stage it reports how many cases kept a different
set in bf16 and the largest number of tokens by which one set differs (|fp32 set - bf16 set|, which equals
|bf16 set - fp32 set| since both have K rows). The SSR set is chosen among the IVR survivors, so an IVR difference
usually carries into SSR; the table also counts SSR differences under an identical IVR set. Output: one JSON line
per (size, IVR layer), then a markdown table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from halfv_export.tasks.digits import task_set
from halfv_export.graphs import get_adapter
from halfv_export.graphs.halfv import HalfVReference
from halfv_export.graphs.pruning import PruneSchedule


def parse_size(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--size", action="append", type=parse_size,
                        help="image size HxW (repeatable; default 224x224 and 448x448)")
    parser.add_argument("--ivr-layer", action="append", type=int, help="IVR layer L1 (repeatable; default 1 and 2)")
    parser.add_argument("--ssr-layer", type=int, default=6, help="SSR top-K layer L2 (default 6: 21/28 of 8 layers)")
    parser.add_argument("--samples", type=int, default=20, help="images / questions per size (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="task_set seed (default 0)")
    parser.add_argument("--split", default="eval", choices=["train", "eval"], help="task_set split (default eval)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--fp32-vision", action="store_true",
                        help="bf16 language model only: feed it the fp32 run's embeddings (visual features included) "
                             "cast to bf16, instead of running the vision tower in bf16 too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = args.size or [(224, 224), (448, 448)]
    ivr_layers = args.ivr_layer or [1, 2]

    adapter = get_adapter("qwen2.5-vl")
    models = {"fp32": adapter.load(None)}
    models["bf16"] = adapter.load(None)
    models["bf16"].model.to(torch.bfloat16)
    stacks = {name: adapter.text_stack(m) for name, m in models.items()}
    started = time.perf_counter()
    rows = []
    for size in sizes:
        samples = task_set(args.samples, seed=args.seed, split=args.split, sizes=[size])
        inputs = {"fp32": [adapter.prepare(models["fp32"], [s.image], [s.prompt]) for s in samples]}
        if args.fp32_vision:
            inputs["bf16"] = [dataclasses.replace(x, embeds=x.embeds.to(torch.bfloat16)) for x in inputs["fp32"]]
        else:
            inputs["bf16"] = [adapter.prepare(models["bf16"], [s.image], [s.prompt]) for s in samples]
        for ivr_layer in ivr_layers:
            schedule = PruneSchedule(ivr_layer, 0.25, 0.1, args.ssr_layer, "topk", 0.05)
            kept = {name: [HalfVReference(stacks[name], schedule).prefill(x).kept for x in inputs[name]]
                    for name in models}
            row = {"size": f"{size[0]}x{size[1]}", "ivr_layer": ivr_layer, "ssr_layer": args.ssr_layer,
                   "cases": len(samples), "n": inputs["fp32"][0].num_visual}
            either = [False] * len(samples)
            for stage in ("ivr", "ssr"):
                diffs = [len(set(a[stage][0].tolist()) - set(b[stage][0].tolist()))
                         for a, b in zip(kept["fp32"], kept["bf16"])]
                row[f"k_{stage}"] = int(kept["fp32"][0][stage].shape[1])
                row[f"{stage}_differs"] = sum(d > 0 for d in diffs)
                row[f"{stage}_max_tokens"] = max(diffs)
                either = [e or d > 0 for e, d in zip(either, diffs)]
            row["either_differs"] = sum(either)
            row["ssr_differs_same_ivr"] = sum(torch.equal(a["ivr"], b["ivr"]) and not torch.equal(a["ssr"], b["ssr"])
                                              for a, b in zip(kept["fp32"], kept["bf16"]))
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(f"\n{sum(r['cases'] for r in rows)} cases in {time.perf_counter() - started:.0f} s "
          f"({args.threads} torch thread(s), vision tower in {'fp32' if args.fp32_vision else 'bf16'})\n")
    print("| size | N | IVR before layer | cases | IVR K1 | IVR sets differ | max tokens | "
          f"SSR K2 (layer {args.ssr_layer}) | SSR sets differ (of which with the same IVR set) | max tokens | "
          "either stage differs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['n']} | {r['ivr_layer']} | {r['cases']} | {r['k_ivr']} | {r['ivr_differs']} | "
              f"{r['ivr_max_tokens']} | {r['k_ssr']} | {r['ssr_differs']} ({r['ssr_differs_same_ivr']}) | "
              f"{r['ssr_max_tokens']} | {r['either_differs']} |")
    total = {k: sum(r[k] for r in rows)
             for k in ("cases", "ivr_differs", "ssr_differs", "ssr_differs_same_ivr", "either_differs")}
    print(f"| all | | | {total['cases']} | | {total['ivr_differs']} | {max(r['ivr_max_tokens'] for r in rows)} | | "
          f"{total['ssr_differs']} ({total['ssr_differs_same_ivr']}) | {max(r['ssr_max_tokens'] for r in rows)} | "
          f"{total['either_differs']} |")


if __name__ == "__main__":
    main()
