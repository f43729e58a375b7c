"""Where a digit-grid answer lives in the visual rows: accuracy of the unpruned LLM when one cut before a layer keeps a
chosen set of rows, and accuracy by the grid row a question asks about under IVR, random and attention-only cuts.

    python tools/keep_set_probe.py --backbone llava-1.5 --layer 2 --keep 128 --samples 200

Keep sets (one cut before --layer, nothing after it): the rows over the drawn digits only; those plus a random
0.25 / 0.5 of the other rows; every row except those over a digit ("background only"); a random half. Then, on
digit_at / row_digits questions (both name a row), the accuracy per asked row with --keep rows (default half)
kept by each single-cut baseline. The cut is HalfVReference's own `force` path: a schedule whose IVR stage is handed the rows,
and whose SSR stage freezes the last layer only, which cannot change the last row's logits (its keys and values
come from that layer's input).
"""
import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from coverage_probe import TOKEN_SIDE, rows_over, shipped_model  # noqa: E402

from halfv_export.tasks.digits import normalise_answer, task_set  # noqa: E402
from halfv_export.graphs.halfv import HalfVReference  # noqa: E402
from halfv_export.graphs.pruning import PruneSchedule, SingleCut  # noqa: E402
from halfv_export.measure.accuracy import answer_budget, cut_at_eos  # noqa: E402


def given_rows_cut(layer: int, num_layers: int) -> PruneSchedule:
    """A schedule that prunes once before `layer` to whatever rows `force={"ivr": ...}` names, then freezes the last
    layer only (a no-op for the answer). keep_ratio 1 gives every N a budget (the forced set replaces it); alpha 0.01
    keeps the rule's anchor count (what the force path's near-tie check compares against) below any set drawn here."""
    return PruneSchedule(ivr_layer=layer, keep_ratio=1.0, anchor_ratio=0.01, ssr_layer=num_layers - 1,
                         ssr_mode="freeze")


def keep_sets(sample, n: int, side: int, generator: torch.Generator) -> dict[str, list[int]]:
    columns = sample.image.width // side
    digit = sorted(set().union(*(rows_over(b, side, columns) for b in sample.boxes)) & set(range(n)))
    background = [i for i in range(n) if i not in set(digit)]

    def draw(rows: list[int], share: float) -> list[int]:
        return [rows[i] for i in torch.randperm(len(rows), generator=generator)[:int(len(rows) * share)].tolist()]

    return {"digits only": digit, "digits + 0.25 of the rest": digit + draw(background, 0.25),
            "digits + 0.5 of the rest": digit + draw(background, 0.5), "background only": background,
            "random half": draw(list(range(n)), 0.5)}


def answer(adapter, loaded, reference: HalfVReference, inputs, sample, eos, force=None) -> bool:
    tokens = reference.generate(inputs, answer_budget(loaded.tokenizer, [sample.answer]), eos, force=force)
    text = adapter.decode_text(loaded, cut_at_eos(tokens.numpy()[0], eos))
    return normalise_answer(text) == normalise_answer(sample.answer)


def share(hits: list[bool]) -> str:
    return f"{sum(hits) / len(hits):.3f}" if hits else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="llava-1.5", choices=sorted(TOKEN_SIDE))
    parser.add_argument("--layer", type=int, default=2, help="the cut is before this LLM layer")
    parser.add_argument("--keep", type=int, default=None,
                        help="rows kept by the baselines in the by-row part (default: half the visual rows)")
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    adapter, loaded, stack = shipped_model(args.backbone)
    eos = adapter.eos_token_ids(loaded)
    side = TOKEN_SIDE[args.backbone]
    generator = torch.Generator().manual_seed(0)
    given = HalfVReference(stack, given_rows_cut(args.layer, stack.num_layers))
    hits: dict[str, dict[str, list[bool]]] = {}
    kept: dict[str, list[int]] = {}
    for sample in task_set(args.samples, seed=0, split="eval", sizes=[(224, 224)]):
        inputs = adapter.prepare(loaded, [sample.image], [sample.prompt])
        hits.setdefault("all rows", {}).setdefault(sample.type, []).append(
            answer(adapter, loaded, HalfVReference(stack, None), inputs, sample, eos))
        for name, rows in keep_sets(sample, inputs.num_visual, side, generator).items():
            force = {"ivr": torch.tensor([sorted(rows)])}
            hits.setdefault(name, {}).setdefault(sample.type, []).append(
                answer(adapter, loaded, given, inputs, sample, eos, force))
            kept.setdefault(name, []).append(len(rows))
    print(f"{args.backbone}: one cut before layer {args.layer}, {args.samples} evaluation questions")
    for name, by_type in hits.items():
        rows = kept.get(name)
        mean_kept = f"{sum(rows) / len(rows):6.1f}" if rows else "   all"
        print(f"  {name:26s} rows {mean_kept}  accuracy {share([x for v in by_type.values() for x in v])}  "
              + "  ".join(f"{t} {share(v)}" for t, v in sorted(by_type.items())))

    by_row: dict[str, dict[int, list[bool]]] = {}
    keep = args.keep
    for sample in task_set(args.samples, seed=1, split="eval", sizes=[(224, 224)],
                           mix={"digit_at": 0.5, "row_digits": 0.5}):
        row = int(re.search(r"row (\d+)", sample.prompt).group(1))
        inputs = adapter.prepare(loaded, [sample.image], [sample.prompt])
        keep = keep or inputs.num_visual // 2  # one image size, so one N
        cuts = {"unpruned": HalfVReference(stack, None)}
        for method in ("ivr", "random", "attention"):
            cuts[method] = HalfVReference(stack, None, cut=SingleCut(method, args.layer, keep, 0.2, 0),
                                             draws=generator)  # the run's one stream: a subset per image
        for method, reference in cuts.items():
            by_row.setdefault(method, {}).setdefault(row, []).append(
                answer(adapter, loaded, reference, inputs, sample, eos))
    print(f"  digit_at + row_digits by asked grid row, {keep} rows kept before layer {args.layer}:")
    for method, rows in by_row.items():
        print(f"  {method:9s} " + "  ".join(f"row {r} {share(v)} ({len(v)})" for r, v in sorted(rows.items())))


if __name__ == "__main__":
    main()
