"""Where HalfV's IVR cut spends its budget on the page task: eager greedy accuracy of the unpruned model and of
HalfV schedules that differ only in the anchor share alpha (and keep ratio), beside the share of the digits' tokens
each schedule's IVR cut keeps (a token whose box overlaps a drawn digit).

    python tools/page_probe.py --model CHECKPOINT_DIR --image-size 224x224 --count 40
    python tools/page_probe.py --image-size 224x224 --task grid --count 200      # the embedded default, grid task

Schedules: IVR before layer 1 (keep 0.25 or 0.5), SSR freeze or topk from layer 6, alpha 0.1 (the paper's), 0.5,
1.0 (attention alone). Qwen2.5-VL only (its token boxes are a grid over the image)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from halfv_export.tasks.digits import normalise_answer, task_set  # noqa: E402
from halfv_export.graphs import get_adapter  # noqa: E402
from halfv_export.graphs.adapter import Processing  # noqa: E402
from halfv_export.graphs.halfv import HalfVReference  # noqa: E402
from halfv_export.graphs.pruning import PruneSchedule  # noqa: E402
from halfv_export.measure.accuracy import cut_at_eos  # noqa: E402

BASE = dict(ivr_layer=1, keep_ratio=0.25, anchor_ratio=0.1, ssr_layer=6, ssr_mode="freeze", ssr_ratio=0.05)
SCHEDULES = {
    "alpha 0.1 (paper), freeze": {},
    "alpha 0.1 (paper), topk": {"ssr_mode": "topk"},
    "alpha 0.5, freeze": {"anchor_ratio": 0.5},
    "alpha 0.5, topk": {"anchor_ratio": 0.5, "ssr_mode": "topk"},
    "alpha 1.0, freeze": {"anchor_ratio": 1.0},
    "alpha 0.1, keep 0.5, freeze": {"keep_ratio": 0.5},
}


def digit_tokens(sample, boxes) -> set[int]:
    return {i for _, _, top, left, side in sample.boxes for i, (t, l, b, r) in enumerate(boxes)
            if t < top + side and top < b and l < left + side and left < r}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="Checkpoint folder (default: the embedded Qwen2.5-VL).")
    parser.add_argument("--image-size", default="224x224")
    parser.add_argument("--task", choices=("page", "grid"), default="page")
    parser.add_argument("--count", type=int, default=40)
    parser.add_argument("--seed", type=int, default=77)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = tuple(int(v) for v in args.image_size.lower().split("x"))
    adapter = get_adapter("qwen2.5-vl")
    loaded = adapter.load(args.model)
    stack, eos = adapter.text_stack(loaded), adapter.eos_token_ids(loaded)
    boxes = adapter.token_boxes(Processing(loaded.tokenizer, loaded.image_processor, loaded.config), size)
    samples = task_set(args.count, seed=args.seed, split="eval", sizes=[size], task=args.task)
    schedules = {"unpruned": None, **{k: PruneSchedule(**{**BASE, **v}) for k, v in SCHEDULES.items()}}
    right = {k: [] for k in schedules}
    kept = {k: [] for k in SCHEDULES}
    for sample in samples:
        inputs = adapter.prepare(loaded, [sample.image], [sample.prompt])
        digits = digit_tokens(sample, boxes)
        for name, schedule in schedules.items():
            reference = HalfVReference(stack, schedule)
            tokens = reference.generate(inputs, 24, eos).numpy()[0]
            answer = adapter.decode_text(loaded, cut_at_eos(tokens, eos))
            right[name].append(normalise_answer(answer) == normalise_answer(sample.answer))
            if schedule is not None:
                ivr = set(reference.prefill(inputs).kept["ivr"][0].tolist())
                kept[name].append(len(ivr & digits) / len(digits))
    print(f"{args.task} task, {size[0]}x{size[1]} ({len(boxes)} visual tokens), {len(samples)} eval questions, "
          f"seed {args.seed}, {args.model or 'embedded default'}")
    print("| schedule | accuracy ± s.e. | digit tokens kept by IVR |\n|---|---|---|")
    for name, hits in right.items():
        p = float(np.mean(hits))
        share = f"{np.mean(kept[name]):.3f}" if name in kept else ""
        print(f"| {name} | {p:.3f} ± {np.sqrt(p * (1 - p) / len(hits)):.3f} | {share} |")


if __name__ == "__main__":
    main()
