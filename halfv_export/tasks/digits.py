"""A visual question-answering task built from real handwritten digits, for training and scoring the embedded models.

Source: scikit-learn's `load_digits` (1,797 real 8x8 scans, 16 grey levels, shipped inside the scikit-learn wheel:
no download). The scans are split once, without randomness, into a training part and a disjoint evaluation part:
scan i is an evaluation scan when i % 5 == 4 (359 scans), a training scan otherwise (1,438).

An image is a grid of CELL x CELL pixel cells laid over the whole canvas (rows = round(h / CELL), columns =
round(w / CELL): 4 x 4 at 224x224, 4 x 6 at 224x336), so that a cell covers the same patch tokens at every image
size (2 x 2 merged tokens of Qwen2.5-VL, 4 x 4 CLIP patches). Two to six cells hold a digit scan, the others are
empty. A cell is divided into slot x slot squares (`slot` = 28 by default: one merged Qwen2.5-VL token; 14 for a
CLIP patch); each digit is upscaled (bicubic) to 75-100% of a slot, put in a random slot of its cell at a random
offset inside it, and inked dark on a light background (a solid colour, a gradient or a smooth noise texture
between random light colours). Token-sized digits are a deliberate choice: the embedded models' vision towers are
trained from scratch on a 2-core CPU, and a digit that one token sees whole is learnt in minutes. Rows and columns
are numbered from 1, top-left first. Question types (answers are short text, digits separated by
spaces):

    digit_at      What is the digit in row r, column c?          -> "7", or "none" for an empty cell
    row_digits    Which digits are in row r, left to right?       -> "3 7", or "none"
    count_digit   How many times does d appear?                   -> "2" (also "0": d is absent)
    count_all     How many digits are there?                      -> "5"
    read_all      Read all digits row by row.                     -> "3 7 1 0 0"

Everything is drawn from one numpy Generator seeded by the caller, so a (seed, split, sizes, count) tuple always
gives the same images, prompts and answers.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..base.atomic import write_bytes_atomic, write_text_atomic
from ..base.data import Sample
from ..base.errors import BadInput

CELL = 56  # pixels per grid cell
DEFAULT_SLOT = 28  # pixels per digit slot (the digit is 75-100% of it)
MIN_DIGITS, MAX_DIGITS = 2, 6  # filled cells per image
EVAL_EVERY = 5  # scan i is held out for evaluation when i % EVAL_EVERY == EVAL_EVERY - 1
SPLITS = ("train", "eval")
TASKS = ("grid", "page")  # the grid covers the image / a small block of cells on a large page (tasks/pages.py)

QUESTION_TYPES = ("digit_at", "row_digits", "count_digit", "count_all", "read_all")
# The mix of question types in a generated set (training and evaluation use the same mix).
DEFAULT_MIX = {"digit_at": 0.3, "row_digits": 0.2, "count_digit": 0.2, "count_all": 0.1, "read_all": 0.2}
PROMPTS = {
    "digit_at": "What is the digit in row {row}, column {col}?",
    "row_digits": "Which digits are in row {row}, left to right?",
    "count_digit": "How many times does {digit} appear?",
    "count_all": "How many digits are there?",
    "read_all": "Read all digits row by row.",
}
NONE = "none"


@dataclass
class TaskSample(Sample):
    """A Sample (with its answer and question type) plus the grid it was drawn from: digits and the scan indices
    (into load_digits) of each cell, None where a cell is empty."""

    grid: list = field(default_factory=list)
    scans: list = field(default_factory=list)
    boxes: list = field(default_factory=list)  # (row, col, top, left, side) of every drawn digit, in pixels


# ------------------------------------------------------------------------------------------------ the scans
@functools.lru_cache(maxsize=None)
def _all_scans() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise BadInput("the digit task needs scikit-learn (it ships the digit scans); pip install scikit-learn") from None
    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)  # [1797, 8, 8] in [0, 1], [1797]


def scan_indices(split: str) -> np.ndarray:
    """Indices into load_digits() of one split; the two splits are disjoint and together cover every scan."""
    if split not in SPLITS:
        raise BadInput(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")
    index = np.arange(len(_all_scans()[1]))
    held_out = index % EVAL_EVERY == EVAL_EVERY - 1
    return index[held_out] if split == "eval" else index[~held_out]


def scan(index: int) -> tuple[np.ndarray, int]:
    """One scan [8, 8] (ink in [0, 1]) and its label."""
    images, labels = _all_scans()
    return images[index], int(labels[index])


# ------------------------------------------------------------------------------------------------ drawing
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _colour(rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    """A random RGB colour whose luminance lies in [low, high] (rejection sampling, a few draws at most)."""
    while True:
        c = rng.uniform(0, 1, 3).astype(np.float32)
        if low <= float(c @ LUMA) <= high:
            return c


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """[h, w, 3] in [0, 1]: a solid colour, a linear gradient or a smooth noise texture between two light colours
    (luminance >= 0.6), so that the dark ink always contrasts."""
    a, b = _colour(rng, 0.6, 1.0), _colour(rng, 0.6, 1.0)
    kind = int(rng.integers(0, 3))
    if kind == 0:
        return np.broadcast_to(a, (h, w, 3)).copy()
    if kind == 1:
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = np.cos(angle) * xx / w + np.sin(angle) * yy / h
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    else:
        coarse = rng.uniform(0, 1, (int(rng.integers(3, 9)), int(rng.integers(3, 9))))
        t = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC),
                       np.float32) / 255
    return a * (1 - t[..., None]) + b * t[..., None]


def grid_shape(size: tuple[int, int]) -> tuple[int, int]:
    """(rows, columns) of the grid on an image of size (height, width)."""
    return max(1, round(size[0] / CELL)), max(1, round(size[1] / CELL))


def render(cells: list[list[int | None]], size: tuple[int, int], rng: np.random.Generator,
           slot: int = DEFAULT_SLOT, boxes: list | None = None,
           distort: np.random.Generator | None = None) -> Image.Image:
    """Draw a grid of scans over the whole image: cells[r][c] is a scan index (into load_digits) or None; size is
    (height, width); each digit fills 75-100% of a random slot x slot square of its cell. `boxes`, when a list,
    receives (row, col, top, left, side) of every digit drawn."""
    h, w = size
    rows, cols = len(cells), len(cells[0])
    rects = [[(round(r * h / rows), round((r + 1) * h / rows), round(c * w / cols), round((c + 1) * w / cols))
              for c in range(cols)] for r in range(rows)]
    return _ink(_background(rng, h, w), cells, rects, rng, slot, boxes, distort)


def render_page(cells: list[list[int | None]], block, size: tuple[int, int], rng: np.random.Generator,
                slot: int = DEFAULT_SLOT, boxes: list | None = None,
                distort: np.random.Generator | None = None) -> Image.Image:
    """Draw the cells inside `block` (tasks/pages.py: where each cell lies) on a paper-like page of `size`."""
    from .pages import paper

    h, w = size
    return _ink(paper(rng, _background(rng, h, w)), cells, block.rects, rng, slot, boxes, distort)


def glyph_alpha(index: int, side: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """[side, side, 1] ink coverage of one scan, upsampled. With `rng` (training's --augment) the scan is also
    distorted: a small rotation and shear and a thinner or bolder stroke, so that ~1,400 training scans draw as many
    more. (On the page task it did not lift held-out answers: the tower already tells held-out digits apart;
    docs/page-task.md.)"""
    glyph, _ = scan(index)
    image = Image.fromarray((glyph * 255).astype(np.uint8)).resize((side, side), Image.BICUBIC)
    if rng is not None:
        angle, shear = rng.uniform(-12, 12), rng.uniform(-0.2, 0.2)
        c = side / 2  # shear about the centre: x' = x + shear * (y - c)
        image = image.rotate(angle, resample=Image.BILINEAR).transform(
            (side, side), Image.AFFINE, (1, shear, -shear * c, 0, 1, 0), resample=Image.BILINEAR)
    alpha = np.asarray(image, np.float32)[..., None] / 255
    if rng is not None:
        alpha = alpha ** rng.uniform(0.6, 1.5)  # < 1 thickens the stroke's soft edge, > 1 thins it
    return alpha


def _ink(canvas: np.ndarray, cells, rects, rng: np.random.Generator, slot: int, boxes: list | None,
         distort: np.random.Generator | None = None) -> Image.Image:
    """Ink each filled cell's scan into its rect (y0, y1, x0, x1) of the canvas [h, w, 3]; `distort` draws each
    scan's distortion (glyph_alpha) from its own generator, so the page, its digits and its question are the ones
    drawn without it."""
    ink = _colour(rng, 0.0, 0.3)
    for r, line in enumerate(cells):
        for c, index in enumerate(line):
            if index is None:
                continue
            y0, y1, x0, x1 = rects[r][c]
            span = min(slot, y1 - y0, x1 - x0)
            side = max(8, int(round(span * rng.uniform(0.75, 1.0))))
            alpha = glyph_alpha(index, side, distort)  # [side, side, 1]
            sy, sx = int(rng.integers(0, max(1, (y1 - y0) // span))), int(rng.integers(0, max(1, (x1 - x0) // span)))
            top = y0 + sy * span + int(rng.integers(0, span - side + 1))
            left = x0 + sx * span + int(rng.integers(0, span - side + 1))
            if boxes is not None:
                boxes.append((r, c, top, left, side))
            region = canvas[top:top + side, left:left + side]
            canvas[top:top + side, left:left + side] = region * (1 - alpha) + ink * alpha
    return Image.fromarray((np.clip(canvas, 0, 1) * 255).round().astype(np.uint8))


# ------------------------------------------------------------------------------------------------ questions
def digits_of(cells: list[list[int | None]]) -> list[list[int | None]]:
    return [[None if i is None else scan(i)[1] for i in row] for row in cells]


def answer_for(kind: str, grid: list[list[int | None]], row: int = 0, col: int = 0, digit: int = 0) -> str:
    """The reference answer of a question about a grid of digits (None = empty cell); row/col are 1-based."""
    present = [d for line in grid for d in line if d is not None]
    if kind == "digit_at":
        d = grid[row - 1][col - 1]
        return NONE if d is None else str(d)
    if kind == "row_digits":
        line = [str(d) for d in grid[row - 1] if d is not None]
        return " ".join(line) if line else NONE
    if kind == "count_digit":
        return str(present.count(digit))
    if kind == "count_all":
        return str(len(present))
    if kind == "read_all":
        return " ".join(str(d) for d in present)
    raise BadInput(f"unknown question type '{kind}'; choose one of: {', '.join(QUESTION_TYPES)}")


def _question(kind: str, grid: list[list[int | None]], rng: np.random.Generator) -> tuple[str, str]:
    """A prompt of one type about `grid` and its answer. digit_at asks about a filled cell 80% of the time;
    count_digit about a present digit 75% of the time."""
    rows, cols = len(grid), len(grid[0])
    filled = [(r, c) for r in range(rows) for c in range(cols) if grid[r][c] is not None]
    empty = [(r, c) for r in range(rows) for c in range(cols) if grid[r][c] is None]
    row = col = digit = 0
    if kind == "digit_at":
        pool = filled if (not empty or rng.random() < 0.8) else empty
        r, c = pool[int(rng.integers(0, len(pool)))]
        row, col = r + 1, c + 1
    elif kind == "row_digits":
        row = int(rng.integers(1, rows + 1))
    elif kind == "count_digit":
        present = sorted({grid[r][c] for r, c in filled})
        absent = [d for d in range(10) if d not in present]
        pool = present if (not absent or rng.random() < 0.75) else absent
        digit = int(pool[int(rng.integers(0, len(pool)))])
    prompt = PROMPTS[kind].format(row=row, col=col, digit=digit)
    return prompt, answer_for(kind, grid, row, col, digit)


def _cells(rng: np.random.Generator, pool: np.ndarray, rows: int, cols: int,
           digits: tuple[int, int] = (MIN_DIGITS, MAX_DIGITS)) -> list[list[int | None]]:
    """Which cells hold which scan: digits[0]..digits[1] filled cells, digits drawn from 1-4 classes so that counts
    repeat."""
    labels = _all_scans()[1]
    filled = int(rng.integers(min(digits[0], rows * cols), min(digits[1], rows * cols) + 1))
    where = rng.choice(rows * cols, size=filled, replace=False)
    classes = rng.choice(10, size=int(rng.integers(1, 5)), replace=False)
    cells: list[list[int | None]] = [[None] * cols for _ in range(rows)]
    for cell in where:
        label = classes[int(rng.integers(0, len(classes)))]
        candidates = pool[labels[pool] == label]
        cells[cell // cols][cell % cols] = int(candidates[int(rng.integers(0, len(candidates)))])
    return cells


def parse_mix(text: str | None) -> dict[str, float]:
    """'digit_at=2,count_all=1' -> normalised weights; None -> DEFAULT_MIX."""
    if not text:
        return dict(DEFAULT_MIX)
    mix = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in QUESTION_TYPES:
            raise BadInput(f"unknown question type '{key}' in the mix; choose from: {', '.join(QUESTION_TYPES)}")
        try:
            mix[key] = float(value) if value else 1.0
        except ValueError:
            raise BadInput(f"mix entry {part!r}: write TYPE=WEIGHT, e.g. digit_at=2") from None
    if any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise BadInput("the question mix needs non-negative weights with a positive sum")
    return mix


def task_set(count: int, seed: int = 0, split: str = "eval", sizes: list[tuple[int, int]] = ((224, 224),),
             mix: dict[str, float] | None = None, digits: tuple[int, int] = (MIN_DIGITS, MAX_DIGITS),
             slot: int = DEFAULT_SLOT, task: str = "grid", augment: bool = False) -> list[TaskSample]:
    """`count` samples; sample i uses sizes[i % len(sizes)]; `digits` bounds the filled cells per image (a training
    curriculum can start lower). task "grid": the grid covers the image; "page": a small block of cells on a
    paper-like page (tasks/pages.py). `augment` distorts each scan as it is drawn (glyph_alpha; training only: the
    evaluation sets are drawn without it). Deterministic in all arguments."""
    from .pages import block_shapes, place_block

    if count < 1:
        raise BadInput(f"count={count}: ask for at least one sample")
    if task not in TASKS:
        raise BadInput(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}")
    if not 8 <= slot <= CELL:
        raise BadInput(f"slot={slot}: a digit slot must be 8..{CELL} pixels")
    for h, w in sizes:
        if task == "page" and not block_shapes((h, w), slot):
            raise BadInput(f"page size {h}x{w} is too small for two {slot}-pixel cells in a fifth of it; use a "
                           "larger page")
        if h < CELL // 2 or w < CELL // 2 or h * w < 2 * CELL * CELL:
            raise BadInput(f"image size {h}x{w} is too small for a grid of two or more {CELL}-pixel cells; use "
                           f"at least {CELL}x{2 * CELL}")
    mix = dict(DEFAULT_MIX if mix is None else mix)
    kinds = [k for k in QUESTION_TYPES if mix.get(k, 0) > 0]
    weights = np.array([mix[k] for k in kinds], dtype=np.float64)
    rng = np.random.default_rng(seed)
    pool = scan_indices(split)
    samples = []
    for i in range(count):
        size = tuple(sizes[i % len(sizes)])
        block = place_block(rng, size, slot, slot) if task == "page" else None  # page cells: one slot each
        if block:  # every cell of a page block is filled (tasks/pages.py)
            cells = _cells(rng, pool, *block.shape, digits=(block.rows * block.cols,) * 2)
        else:
            cells = _cells(rng, pool, *grid_shape(size), digits=digits)
        grid = digits_of(cells)
        kind = kinds[int(rng.choice(len(kinds), p=weights / weights.sum()))]
        prompt, answer = _question(kind, grid, rng)
        boxes: list = []
        distort = np.random.default_rng([seed, i, 7]) if augment else None  # apart from rng: same pages otherwise
        image = (render_page(cells, block, size, rng, slot, boxes, distort) if block else
                 render(cells, size, rng, slot, boxes, distort))
        samples.append(TaskSample(name=f"{split}-{seed}-{i:05d}-{kind}-{size[0]}x{size[1]}", image=image,
                                  prompt=prompt, answer=answer, type=kind, grid=grid, scans=cells, boxes=boxes))
    return samples


def normalise_answer(text: str) -> str:
    """What exact match compares: stripped, lower-case, inner whitespace collapsed, a trailing full stop dropped."""
    return " ".join(str(text).strip().lower().rstrip(".").split())


# ------------------------------------------------------------------------------------------------ the eval set
def write_task_set(samples: list[TaskSample], out: Path, info: dict | None = None) -> Path:
    """images/NNNNN.png + prompts.jsonl ({"image", "prompt", "answer", "type"} per line) + task.json (how it was
    made). Files are written atomically; prompts.jsonl last, so a folder with one is complete."""
    import io

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, sample in enumerate(samples):
        name = f"images/{i:05d}.png"
        buf = io.BytesIO()
        sample.image.save(buf, format="PNG")
        write_bytes_atomic(out / name, buf.getvalue())
        lines.append(json.dumps({"image": name, "prompt": sample.prompt, "answer": sample.answer,
                                 "type": sample.type}))
    types = {}
    for sample in samples:
        types[sample.type] = types.get(sample.type, 0) + 1
    write_text_atomic(out / "task.json", json.dumps({**(info or {}), "samples": len(samples), "types": types},
                                                    indent=2) + "\n")
    write_text_atomic(out / "prompts.jsonl", "\n".join(lines) + "\n")
    return out / "prompts.jsonl"
