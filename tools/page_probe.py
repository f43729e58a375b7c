"""Where HalfV's IVR cut spends its budget on the page task: eager greedy accuracy of the unpruned model and of
HalfV schedules that differ only in the anchor share alpha (and keep ratio), beside the share of the digits' tokens
each schedule's IVR cut keeps (a token whose box overlaps a drawn digit).

    python tools/page_probe.py --model CHECKPOINT_DIR --image-size 224x224 --count 40
    python tools/page_probe.py --image-size 224x224 --task grid --count 200      # the embedded default, grid task
    python tools/page_probe.py --model CHECKPOINT_DIR --image-size 448x448 --count 100 --vision-cut 1:0.25

--vision-cut BLOCK:KEEP (repeatable) adds rows with the cut inside the tower (graphs/vision_cut.py): the LLM
unpruned on the K kept tokens, the same with SSR freeze from layer 6, and the same K tokens dropped after an uncut
tower (their features as the whole tower computes them), which separates what dropping tokens costs from what
running the later blocks on fewer tokens costs. Every row has its time-to-first-token
FLOPs ratio (vision + prefill, unpruned / the row; measure/vision_flops.py and measure/flops.py), at the first
question's text length.

Schedules: IVR before layer 1 (keep 0.25 or 0.5), SSR freeze or topk from layer 6, alpha 0.1 (the paper's), 0.5,
1.0 (attention alone). Qwen2.5-VL only (its token boxes are a grid over the image)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from halfv_export.tasks.digits import normalise_answer, task_set  # noqa: E402
from halfv_export.graphs import get_adapter  # noqa: E402
from halfv_export.graphs.adapter import Processing  # noqa: E402
from halfv_export.graphs.halfv import HalfVReference  # noqa: E402
from halfv_export.graphs.pruning import PruneSchedule, VisionCut  # noqa: E402
from halfv_export.measure.flops import LMShape, prefill_flops  # noqa: E402
from halfv_export.measure.vision_flops import vision_flops  # noqa: E402
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
    parser.add_argument("--vision-cut", action="append", default=[], metavar="BLOCK:KEEP")
    parser.add_argument("--only-cuts", action="store_true", help="skip the alpha rows (unpruned and paper's stay)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = tuple(int(v) for v in args.image_size.lower().split("x"))
    adapter = get_adapter("qwen2.5-vl")
    loaded = adapter.load(args.model)
    stack, eos = adapter.text_stack(loaded), adapter.eos_token_ids(loaded)
    boxes = adapter.token_boxes(Processing(loaded.tokenizer, loaded.image_processor, loaded.config), size)
    samples = task_set(args.count, seed=args.seed, split="eval", sizes=[size], task=args.task)
    chosen = {k: v for k, v in SCHEDULES.items() if not args.only_cuts or k == "alpha 0.1 (paper), freeze"}
    schedules = {"unpruned": (None, None), **{k: (PruneSchedule(**{**BASE, **v}), None) for k, v in chosen.items()}}
    for text in args.vision_cut:
        cut = VisionCut.parse(text)
        schedules[f"vision cut {cut.block}:{cut.keep}, LLM unpruned"] = (None, cut)
        schedules[f"vision cut {cut.block}:{cut.keep}, SSR freeze from 6"] = (
            PruneSchedule(**{**BASE, "keep_ratio": 1.0}), cut)  # IVR keeps every kept token: SSR alone prunes
        schedules[f"same tokens dropped after the whole tower {cut.block}:{cut.keep}"] = (None, ("after", cut))
    right = {k: [] for k in schedules}
    kept = {k: [] for k in schedules if k != "unpruned"}
    config = loaded.config.to_dict()
    shape, ttft = LMShape.from_config(config), {}
    grid = adapter._grid(loaded.image_processor, size)[1:]  # patches (rows, cols) ...
    grid = (grid[0] // 2, grid[1] // 2)  # ... in 2x2 merged tokens
    for sample in samples:
        prepared = {}
        digits = digit_tokens(sample, boxes)
        for name, (schedule, cut) in schedules.items():
            if cut not in prepared and isinstance(cut, tuple):  # the cut's rows, the uncut tower's features there
                inputs = dataclasses.replace(prepared[cut[1]], embeds=prepared[cut[1]].embeds.clone())
                s, k = int(inputs.visual_start[0]), inputs.num_visual
                whole = prepared[None].embeds[0, int(prepared[None].visual_start[0]):][:len(boxes)]
                inputs.embeds[0, s:s + k] = whole[inputs.visual_tokens[0]]
                prepared[cut] = inputs
            if cut not in prepared:
                prepared[cut] = adapter.prepare(loaded, [sample.image], [sample.prompt], cut)
            inputs = prepared[cut]
            after = isinstance(cut, tuple)  # the tower ran whole: its FLOPs are the uncut tower's
            cut = cut[1] if after else cut
            reference = HalfVReference(stack, schedule)
            tokens = reference.generate(inputs, 24, eos).numpy()[0]
            answer = adapter.decode_text(loaded, cut_at_eos(tokens, eos))
            right[name].append(normalise_answer(answer) == normalise_answer(sample.answer))
            rows = inputs.visual_tokens[0] if cut is not None else torch.arange(len(boxes))  # raster index per row
            if schedule is not None and schedule.keep_ratio < 1:  # IVR's kept rows, as raster token indices
                rows = rows[reference.prefill(inputs).kept["ivr"][0]]
            if name in kept:
                kept[name].append(len(set(rows.tolist()) & digits) / len(digits))
            if name not in ttft:  # every sample of the bucket has the same N and K; the text length is the first's
                n, text = len(boxes), inputs.seq_len - inputs.num_visual
                full = vision_flops(config, shape.hidden, n, grid).total + prefill_flops(shape, n, text, None).full
                ttft[name] = full / (vision_flops(config, shape.hidden, n, grid, None if after else cut).total
                                     + prefill_flops(shape, inputs.num_visual, text, schedule).halfv)
    print(f"{args.task} task, {size[0]}x{size[1]} ({len(boxes)} visual tokens), {len(samples)} eval questions, "
          f"seed {args.seed}, {args.model or 'embedded default'}")
    print("| schedule | accuracy ± s.e. | digit tokens kept (IVR / cut) | TTFT FLOPs ratio |\n|---|---|---|---|")
    for name, hits in right.items():
        p = float(np.mean(hits))
        share = f"{np.mean(kept[name]):.3f}" if name in kept else ""
        print(f"| {name} | {p:.3f} ± {np.sqrt(p * (1 - p) / len(hits)):.3f} | {share} | {ttft[name]:.2f}× |")


if __name__ == "__main__":
    main()
