"""Eager prefill latency of an embedded default at a given torch thread count: with inputs prepared once, and
prepared per call. On a box whose cores are busy, more intra-op threads than free cores make the median jump far
above the fastest run (validate's `latency_ms.min_ms` and its noisy-timing line).

    python tools/eager_threads.py --backbone llava-1.5 --threads 1
    python tools/eager_threads.py --backbone llava-1.5 --threads 2
"""
import argparse

import torch

from halfv_export.tasks.digits import task_set
from halfv_export.graphs import get_adapter
from halfv_export.graphs.halfv import HalfVReference
from halfv_export.measure.report import timed  # validate's own: one warm-up, then the runs


def spread(fn, runs: int) -> str:
    t = timed(fn, runs)
    return f"median {t['median_ms']:.1f} ms, fastest {t['min_ms']:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="llava-1.5")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    adapter = get_adapter(args.backbone)
    loaded = adapter.load(None)
    full = HalfVReference(adapter.text_stack(loaded), None)
    sample = task_set(1, seed=2000, split="eval", sizes=[(224, 224)])[0]
    inputs = adapter.prepare(loaded, [sample.image], [sample.prompt])
    with torch.no_grad():
        print(f"{args.backbone}, {args.threads} thread(s), unpruned eager prefill, inputs ready: "
              + spread(lambda: full.prefill(inputs), args.runs))
        print(f"{args.backbone}, {args.threads} thread(s), prepare + prefill: "
              + spread(lambda: full.prefill(adapter.prepare(loaded, [sample.image], [sample.prompt])), args.runs))


if __name__ == "__main__":
    main()
