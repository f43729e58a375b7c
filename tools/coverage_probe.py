"""Which parts of a digit-grid image each selection keeps: IVR (anchors + farthest-point fill), attention-only and
random, the same K rows before the same layer, on evaluation questions of the embedded task. Per image: the share of
drawn digits with at least one kept row over them, the share of their rows kept, and the share of the grid's cells
(56-px, digit or empty) with at least one kept row. A question about a place needs that place's rows — an empty
cell's too, to answer "none". Then, per grid row of cells (top to bottom): the share of its visual rows each method
keeps, and how redundant IVR's fill features are there (mean cosine distance of each row's feature to its nearest
other visual row at the IVR layer's input: the farthest-point fill passes over rows with a close neighbour).

    python tools/coverage_probe.py --backbone llava-1.5 --schedule build/schedule.json --samples 100
"""
import argparse
import json
from pathlib import Path

import torch

from halfv_export.tasks.digits import CELL, task_set
from halfv_export.graphs import get_adapter
from halfv_export.graphs.halfv import HalfVReference
from halfv_export.graphs.pruning import PruneSchedule, SingleCut, diversity_features

TOKEN_SIDE = {"qwen2.5-vl": 28, "llava-1.5": 14}  # pixels per visual row: a merged 2x2 Qwen patch, one CLIP patch


def rows_over(box, side: int, columns: int) -> set[int]:
    """Row-major visual rows whose patch overlaps a drawn digit (top, left, size in pixels)."""
    _, _, top, left, size = box
    return {r * columns + c for r in range(top // side, (top + size - 1) // side + 1)
            for c in range(left // side, (left + size - 1) // side + 1)}


def coverage(sample, kept: set[int], side: int, columns: int) -> dict:
    digits = [rows_over(b, side, columns) for b in sample.boxes]
    per_cell = CELL // side
    cells = {(r // per_cell, c // per_cell) for r, c in (divmod(i, columns) for i in kept)}
    grid_cells = len(sample.grid) * len(sample.grid[0])
    return {"digits_seen": sum(bool(d & kept) for d in digits) / len(digits),
            "digit_rows_kept": sum(len(d & kept) for d in digits) / sum(len(d) for d in digits),
            "cells_seen": len(cells) / grid_cells}


def band_of(n: int, side: int, columns: int) -> torch.Tensor:
    """[n] the grid row of cells (CELL pixels tall) each row-major visual row lies in."""
    return torch.arange(n) // columns // (CELL // side)


def band_means(values: torch.Tensor, bands: torch.Tensor) -> list[float]:
    """Mean of per-row `values` [n] over each band, top band first."""
    return [float(values[bands == b].mean()) for b in range(int(bands.max()) + 1)]


def band_shares(kept: set[int], bands: torch.Tensor) -> list[float]:
    """Share of each band's visual rows that are kept, top band first."""
    hit = torch.zeros(len(bands))
    hit[sorted(kept)] = 1.0
    return band_means(hit, bands)


@torch.no_grad()
def nearest_distance(features: torch.Tensor) -> torch.Tensor:
    """Unit rows [n, C] -> [n] cosine distance of each row to its nearest other row."""
    similarity = features @ features.T
    similarity.fill_diagonal_(-2.0)
    return 1.0 - similarity.max(dim=1).values


def shipped_model(backbone: str):
    """(adapter, loaded, text stack) of the embedded trained default, on one torch thread."""
    torch.set_num_threads(1)
    adapter = get_adapter(backbone)
    loaded = adapter.load(None)
    return adapter, loaded, adapter.text_stack(loaded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="llava-1.5", choices=sorted(TOKEN_SIDE))
    parser.add_argument("--schedule", type=Path, required=True, help="schedule.json (its IVR layer, keep ratio, alpha)")
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args()
    adapter, loaded, stack = shipped_model(args.backbone)
    schedule = PruneSchedule(**json.loads(args.schedule.read_text())["schedule"])
    side = TOKEN_SIDE[args.backbone]
    totals: dict[str, dict[str, float]] = {}
    samples = task_set(args.samples, seed=0, split="eval", sizes=[(224, 224)])
    columns = samples[0].image.width // side  # visual rows per grid row (row-major, as both towers emit them)
    bands_kept: dict[str, list[list[float]]] = {}
    redundancy: list[list[float]] = []
    draws = torch.Generator().manual_seed(0)  # one stream for the run: every image gets its own random subset
    for sample in samples:
        inputs = adapter.prepare(loaded, [sample.image], [sample.prompt])
        unpruned = HalfVReference(stack, None)
        # the layers before the IVR layer are the same for every method: run them once, then each selection on top
        before = unpruned.run(unpruned.begin(inputs), stop=schedule.ivr_layer)
        bands = band_of(before.n, side, columns)
        with torch.no_grad():
            distance = nearest_distance(diversity_features(stack.norm, before.h, before.start, before.n)[0])
        redundancy.append(band_means(distance, bands))
        after = schedule.ivr_layer + 1
        ivr = HalfVReference(stack, schedule).run(before, stop=after).kept["ivr"]
        k = ivr.shape[1]
        kept = {"ivr": ivr[0]}
        for method in ("attention", "random"):
            cut = SingleCut(method, schedule.ivr_layer, k, schedule.anchor_ratio, seed=0)
            kept[method] = HalfVReference(stack, None, cut=cut, draws=draws).run(before, stop=after).kept["cut"][0]
        for method, rows in kept.items():
            bands_kept.setdefault(method, []).append(band_shares(set(rows.tolist()), bands))
            for key, value in coverage(sample, set(rows.tolist()), side, columns).items():
                totals.setdefault(method, {}).setdefault(key, 0.0)
                totals[method][key] += value / len(samples)
    print(f"{args.backbone}: K = {k} rows kept before layer {schedule.ivr_layer}, {len(samples)} evaluation images")
    for method, row in totals.items():
        print(f"  {method:9s} " + "  ".join(f"{key} {value:.3f}" for key, value in row.items()))
    print("per grid row of cells, top to bottom:")
    for method, shares in bands_kept.items():
        print(f"  {method:9s} rows kept   " + "  ".join(f"{v:.3f}" for v in torch.tensor(shares).mean(0).tolist()))
    print(f"  nearest-row cosine distance at layer {schedule.ivr_layer}'s input (IVR's fill features)   "
          + "  ".join(f"{v:.4f}" for v in torch.tensor(redundancy).mean(0).tolist()))


if __name__ == "__main__":
    main()
