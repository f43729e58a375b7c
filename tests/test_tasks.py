"""The digit-grid task: deterministic generation, disjoint scan splits, answers that match what is drawn, the
evaluation-set writer and its loader, and the make-task command."""

import json
import re

import numpy as np
import pytest

from halfv_export.base.data import load_data
from halfv_export.base.errors import BadInput
from halfv_export.tasks.digits import (QUESTION_TYPES, answer_for, grid_shape, normalise_answer, render, scan,
                                     scan_indices, task_set, write_task_set)


def test_splits_are_disjoint_and_cover_every_scan():
    train, held_out = scan_indices("train"), scan_indices("eval")
    assert len(train) == 1438 and len(held_out) == 359
    assert not set(train) & set(held_out)
    assert sorted(set(train) | set(held_out)) == list(range(1797))
    for split, pool in (("train", set(train)), ("eval", set(held_out))):
        for sample in task_set(20, seed=5, split=split):
            used = {i for row in sample.scans for i in row if i is not None}
            assert used and used <= pool, split


def test_same_seed_same_set_other_seed_other_set():
    a, b = task_set(12, seed=3, sizes=[(224, 224), (224, 336)]), task_set(12, seed=3, sizes=[(224, 224), (224, 336)])
    c = task_set(12, seed=4, sizes=[(224, 224), (224, 336)])
    assert [(s.prompt, s.answer, s.type) for s in a] == [(s.prompt, s.answer, s.type) for s in b]
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert [s.image.size for s in a] == [(224, 224), (336, 224)] * 6  # PIL sizes are (w, h)
    assert [(s.prompt, s.answer) for s in a] != [(s.prompt, s.answer) for s in c]


def test_every_answer_follows_from_the_grid():
    samples = task_set(300, seed=11, sizes=[(224, 224), (224, 336)])
    assert {s.type for s in samples} == set(QUESTION_TYPES)
    assert grid_shape((224, 224)) == (4, 4) and grid_shape((224, 336)) == (4, 6)
    for s in samples:
        grid = s.grid
        rows, cols = grid_shape((s.image.height, s.image.width))
        assert len(grid) == rows and all(len(row) == cols for row in grid)
        assert 2 <= sum(d is not None for row in grid for d in row) <= 6
        assert grid == [[None if i is None else scan(i)[1] for i in row] for row in s.scans]
        present = [d for row in grid for d in row if d is not None]
        if s.type == "count_all":
            assert s.answer == str(len(present))
        elif s.type == "read_all":
            assert s.answer.split() == [str(d) for d in present]
        elif s.type == "count_digit":
            digit = int(s.prompt.split("does ")[1].split()[0])
            assert s.answer == str(present.count(digit))
        elif s.type == "digit_at":
            r, c = (int(x) for x in re.findall(r"\d+", s.prompt))
            assert s.answer == ("none" if grid[r - 1][c - 1] is None else str(grid[r - 1][c - 1]))
        else:
            r = int(s.prompt.split("row ")[1].split(",")[0])
            expected = [str(d) for d in grid[r - 1] if d is not None]
            assert s.answer == (" ".join(expected) or "none")


def _first_scan_of(label: int, split: str = "eval") -> int:
    return next(int(i) for i in scan_indices(split) if scan(int(i))[1] == label)


def test_constructed_grid_is_drawn_where_the_answers_say():
    """A grid built from known scans: each digit's ink lies inside its own cell and, brought back to 8x8, correlates
    best with its own scan among the ten classes' scans; the answers of every question type follow."""
    seven, three, zero = _first_scan_of(7), _first_scan_of(3), _first_scan_of(0)
    size = (224, 336)
    rows, cols = grid_shape(size)
    cells = [[None] * cols for _ in range(rows)]
    cells[0][0], cells[1][1], cells[1][5], cells[3][2] = seven, three, three, zero
    image = np.asarray(render(cells, size, np.random.default_rng(2)), np.float32)
    blank = np.asarray(render([[None] * cols for _ in range(rows)], size, np.random.default_rng(2)), np.float32)
    ink = np.abs(image - blank).sum(axis=-1)  # same background and ink colour: the difference is the digits
    h, w = size
    candidates = {label: scan(_first_scan_of(label))[0] for label in range(10)}
    for r in range(rows):
        for c in range(cols):
            y0, y1, x0, x1 = r * 56, (r + 1) * 56, c * 56, (c + 1) * 56  # 56-pixel cells
            cell = ink[y0:y1, x0:x1]
            if cells[r][c] is None:
                assert cell.max() == 0, (r, c)
                continue
            ys, xs = np.nonzero(cell > 0)
            crop = cell[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
            from PIL import Image

            small = np.asarray(Image.fromarray(crop).resize((8, 8), Image.BOX), np.float32)
            glyph, label = scan(cells[r][c])
            scores = {k: np.corrcoef(small.ravel(), v.ravel())[0, 1] for k, v in candidates.items()}
            assert max(scores, key=scores.get) == label, (r, c, scores)
    grid = [[None if i is None else scan(i)[1] for i in row] for row in cells]
    assert answer_for("digit_at", grid, row=1, col=1) == "7" and answer_for("digit_at", grid, row=1, col=2) == "none"
    assert answer_for("digit_at", grid, row=2, col=6) == "3" and answer_for("digit_at", grid, row=4, col=3) == "0"
    assert answer_for("row_digits", grid, row=2) == "3 3" and answer_for("row_digits", grid, row=3) == "none"
    assert answer_for("count_digit", grid, digit=3) == "2" and answer_for("count_digit", grid, digit=5) == "0"
    assert answer_for("count_all", grid) == "4" and answer_for("read_all", grid) == "7 3 3 0"


def test_normalisation():
    assert normalise_answer("  3  7 ") == "3 7" and normalise_answer("None.") == "none"
    assert normalise_answer("7") != normalise_answer("1")


def test_eval_set_round_trip(tmp_path):
    samples = task_set(7, seed=9, sizes=[(224, 224), (112, 224)])
    write_task_set(samples, tmp_path, {"seed": 9})
    lines = [json.loads(x) for x in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    assert [set(x) for x in lines] == [{"image", "prompt", "answer", "type"}] * 7
    loaded = load_data(tmp_path)
    assert [(s.prompt, s.answer, s.type) for s in loaded] == [(s.prompt, s.answer, s.type) for s in samples]
    assert all(np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(loaded, samples))
    info = json.loads((tmp_path / "task.json").read_text())
    assert info["samples"] == 7 and sum(info["types"].values()) == 7


def test_jsonl_answers_are_checked(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "how many?", "answer": 3, "type": "count"}\n'
                                      '{"prompt": "no answer here"}\n')
    first, second = load_data(tmp_path / "p.jsonl")
    assert (first.answer, first.type) == ("3", "count") and (second.answer, second.type) == (None, None)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x", "answer": ["3"]}\n')
    with pytest.raises(BadInput, match="answer"):
        load_data(tmp_path / "bad.jsonl")


def test_make_task_command(run_cli, tmp_path):
    out = tmp_path / "set"
    result = run_cli("make-task", "--image-size", "224x224", "--count", 5, "--seed", 1, "--out", out)
    assert result.exit_code == 0, result.output
    first = (out / "prompts.jsonl").read_text()
    assert len(first.splitlines()) == 5 and len(list((out / "images").glob("*.png"))) == 5
    assert run_cli("make-task", "--image-size", "224x224", "--count", 5, "--seed", 1, "--out", out).exit_code == 0
    assert (out / "prompts.jsonl").read_text() == first  # same arguments, same files (an earlier set is replaced)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    result = run_cli("make-task", "--count", 2, "--out", foreign)
    assert result.exit_code == 2 and "not empty" in result.output
    result = run_cli("make-task", "--backbone", "llava-1.5", "--image-size", "224x336", "--count", 2, "--out",
                     tmp_path / "x")
    assert result.exit_code == 2 and "use --image-size 224x224" in result.output
    result = run_cli("make-task", "--mix", "digit_at=1,colour=2", "--count", 2, "--out", tmp_path / "y")
    assert result.exit_code == 2 and "unknown question type 'colour'" in result.output
