"""tools/coverage_probe.py maps drawn digits to the visual rows over them, so its coverage shares mean what they say."""

import importlib.util
from pathlib import Path

from halfv_export.tasks.digits import task_set

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("coverage_probe", ROOT / "tools" / "coverage_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_a_digit_covers_the_patches_it_overlaps():
    # a 28-px digit at (30, 20): CLIP rows 2..4 x columns 1..3 of a 16-wide grid; one merged Qwen row when aligned
    assert probe.rows_over((0, 0, 30, 20, 28), 14, 16) == {r * 16 + c for r in (2, 3, 4) for c in (1, 2, 3)}
    assert probe.rows_over((0, 0, 56, 84, 28), 28, 8) == {2 * 8 + 3}


def test_coverage_of_all_rows_and_of_one_digit():
    sample = task_set(1, seed=3, split="eval", sizes=[(224, 224)])[0]
    everything = probe.coverage(sample, set(range(256)), 14, 16)
    assert everything == {"digits_seen": 1.0, "digit_rows_kept": 1.0, "cells_seen": 1.0}
    first = probe.rows_over(sample.boxes[0], 14, 16)
    one = probe.coverage(sample, {min(first)}, 14, 16)
    assert one["digits_seen"] == 1 / len(sample.boxes) and one["cells_seen"] == 1 / 16
    assert 0 < one["digit_rows_kept"] < 1


def test_bands_split_the_rows_by_grid_row_of_cells():
    bands = probe.band_of(256, 14, 16)  # 16 x 16 CLIP rows, 4 visual rows per 56-px cell
    assert bands.tolist() == [r // 4 for r in range(16) for _ in range(16)]
    top_band = set(range(64))
    assert probe.band_shares(top_band, bands) == [1.0, 0.0, 0.0, 0.0]
    assert probe.band_shares(set(range(0, 256, 2)), bands) == [0.5] * 4


def test_nearest_distance_is_zero_for_a_duplicate_row():
    import torch
    features = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=-1)
    assert probe.nearest_distance(features).tolist() == [0.0, 0.0, 1.0]
