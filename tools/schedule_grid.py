"""Every (L1, L2, SSR mode) HalfV schedule of a shallow model on data with answers: accuracy against prefill FLOPs,
rho, alpha and sigma at the paper's values. The ground truth the calibration rules are judged by: where the rule's
pick and the paper's fall-back sit among all the schedules they could have been, and which schedules no other one
beats at both accuracy and FLOPs (the frontier, marked *).

    halfv-export make-task --backbone llava-1.5 --count 200 --out evalset/
    python tools/schedule_grid.py --backbone llava-1.5 --data evalset/ --out grid-llava-1.5.md

One eager greedy pass over the data per schedule and one unpruned (measure.compare.evaluate_methods, HalfV
only); 2(L-2)+2(L-3) schedules for L1 in {1, 2} (22 at 8 layers): 72 s for the LLaVA-1.5 default (0.875 weights) on
200 questions, one thread, a test run on the other core (2-core box; 201 s when every schedule re-ran the unpruned
model).
"""
import argparse
import json
from pathlib import Path

import torch

from halfv_export.base.data import load_data
from halfv_export.graphs import get_adapter
from halfv_export.graphs.pruning import PruneSchedule
from halfv_export.measure.compare import evaluate_methods
from halfv_export.calibration.rules import derive_schedule
from halfv_export.calibration.schedule import DEFAULT_SSR_RATIO


def grid(depth: int, paper: dict, ivr_layers) -> list[PruneSchedule]:
    sigma = paper["ssr_ratio"] or DEFAULT_SSR_RATIO
    return [PruneSchedule(ivr_layer=l1, keep_ratio=paper["keep_ratio"], anchor_ratio=paper["anchor_ratio"],
                          ssr_layer=l2, ssr_mode=mode, ssr_ratio=sigma if mode == "topk" else None)
            for l1 in ivr_layers for l2 in range(l1 + 1, depth) for mode in ("freeze", "topk")]


def frontier(rows: list[dict]) -> set[int]:
    """Indices of rows no other row matches or beats at both accuracy (higher) and FLOPs (lower), strictly in one."""
    return {i for i, r in enumerate(rows)
            if not any((o["accuracy"] >= r["accuracy"] and o["flops"] <= r["flops"])
                       and (o["accuracy"] > r["accuracy"] or o["flops"] < r["flops"]) for o in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--data", type=Path, required=True, help="make-task output: prompts.jsonl with answers")
    parser.add_argument("--schedule", type=Path, help="a calibrated schedule.json: its pick is marked 'rule'")
    parser.add_argument("--ivr-layers", default="1,2")
    parser.add_argument("--out", type=Path, required=True, help="markdown table; the rows also go to OUT.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    adapter = get_adapter(args.backbone)
    loaded = adapter.load()
    depth = adapter.text_stack(loaded).num_layers
    paper = derive_schedule(None, depth, adapter, {})[0]
    picked = json.loads(args.schedule.read_text())["schedule"] if args.schedule else None
    samples = load_data(args.data)
    schedules = grid(depth, paper, [int(x) for x in args.ivr_layers.split(",")])
    labels = [f"{s.ivr_layer}/{s.ssr_layer}/{s.ssr_mode}" for s in schedules]
    result = evaluate_methods(adapter, loaded, samples, schedules, methods=("halfv",), batch_size=16, labels=labels)
    full, rows = result["full"]["accuracy"], []
    for schedule, row in zip(schedules, result["points"]):
        point = row["methods"]["halfv"]
        marks = [name for name, values in (("paper", paper), ("rule", picked)) if values and all(
            values[k] == getattr(schedule, k) for k in ("ivr_layer", "ssr_layer", "ssr_mode"))]
        rows.append({"ivr_layer": schedule.ivr_layer, "ssr_layer": schedule.ssr_layer, "ssr_mode": schedule.ssr_mode,
                     "accuracy": point["accuracy"], "flops": point["flops_fraction"], "marks": marks})
        print(json.dumps(rows[-1]), flush=True)

    best = frontier(rows)
    lines = [f"{args.backbone}: unpruned accuracy {full:.3f} on {len(samples)} questions; rho {paper['keep_ratio']:g}, "
             f"alpha {paper['anchor_ratio']:g}, sigma {paper['ssr_ratio'] or DEFAULT_SSR_RATIO:g} (topk). "
             "* = on the frontier.", "",
             "| L1 | L2 | SSR | accuracy | prefill FLOPs (fraction of unpruned) | 1 / fraction | |", "|---|---|---|---|---|---|---|"]
    for i, r in sorted(enumerate(rows), key=lambda item: item[1]["flops"]):
        lines.append(f"| {r['ivr_layer']} | {r['ssr_layer']} | {r['ssr_mode']} | {r['accuracy']:.3f}"
                     f"{' *' if i in best else ''} | {r['flops']:.3f} | {1 / r['flops']:.2f}x | "
                     f"{', '.join(r['marks'])} |")
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"backbone": args.backbone, "full": full, "rows": rows},
                                                        indent=1) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
