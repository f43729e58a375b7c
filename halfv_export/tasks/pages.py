"""The page layout of the digit task: the same grid of digit cells, placed as one small content block on a much
larger page whose background is redundant but not blank. This is where HalfV claims to work: hundreds of visual
tokens, most of them paper.

    page (h x w)          paper-like: a light base (solid, gradient or smooth texture), low-contrast grain, ruled
                          lines on some pages, faint marks that are not digits (lighter than any ink)
    content block         rows x cols cells of one digit slot each (28 px: one merged Qwen2.5-VL token), contiguous
                          ("grid"), one row ("line"), or spread apart by gaps ("spread"); its cells cover at most
                          MAX_CONTENT of the page
    position              anywhere on the page, on the slot lattice (a digit still sits inside one token)

A cell is one slot, not the grid task's 56-pixel cell of four slots: on a page with no cell borders a digit drawn in
any of four slots would make its row ambiguous.

Rows and columns in the questions are the block's, counted from its top-left cell; where the block sits is free.
Every cell of a block holds a digit, so the block's rows and columns are visible on the page.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

MAX_CONTENT = 0.2  # cells' share of the page area; below the paper's IVR keep ratio (0.25) on Qwen2.5-VL
LAYOUTS = ("grid", "line", "spread")
MIN_CELLS, MAX_CELLS = 2, 8  # every cell of a block holds a digit: with no borders drawn, an empty cell at a block's
# edge would make its rows and columns unknowable


@dataclass(frozen=True)
class Block:
    """Where the cells of a rows x cols block lie on the page: rects[r][c] = (y0, y1, x0, x1) in pixels."""

    rows: int
    cols: int
    layout: str
    rects: tuple

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols


def block_shapes(size: tuple[int, int], cell: int) -> list[tuple[int, int]]:
    """Every (rows, cols) of MIN_CELLS..MAX_CELLS cells that fits on the page with its cells covering at most
    MAX_CONTENT of it."""
    h, w = size
    limit = MAX_CONTENT * h * w
    return [(r, c) for r in range(1, MAX_CELLS + 1) for c in range(1, MAX_CELLS + 1)
            if MIN_CELLS <= r * c <= MAX_CELLS and r * c * cell * cell <= limit and r * cell <= h and c * cell <= w]


def place_block(rng: np.random.Generator, size: tuple[int, int], cell: int, lattice: int) -> Block:
    """A random block shape and layout at a random position of the page (origin and gaps on the lattice)."""
    h, w = size
    shapes = block_shapes(size, cell)
    layout = LAYOUTS[int(rng.integers(0, len(LAYOUTS)))]
    # a line is one row; a grid or a spread block has two rows and two columns at least, where the page allows
    wanted = [s for s in shapes if (s[0] == 1 if layout == "line" else min(s) >= 2)]
    shapes = wanted or shapes
    rows, cols = shapes[int(rng.integers(0, len(shapes)))]
    gap_y = gap_x = 0
    if layout == "spread":  # gaps of up to two cells between neighbours, where the page has room for them
        room_y = (h - rows * cell) // max(1, rows - 1) if rows > 1 else 0
        room_x = (w - cols * cell) // max(1, cols - 1) if cols > 1 else 0
        gap_y = lattice * int(rng.integers(0, min(2 * cell, room_y) // lattice + 1))
        gap_x = lattice * int(rng.integers(0, min(2 * cell, room_x) // lattice + 1))
    height, width = rows * cell + (rows - 1) * gap_y, cols * cell + (cols - 1) * gap_x
    top = lattice * int(rng.integers(0, (h - height) // lattice + 1))
    left = lattice * int(rng.integers(0, (w - width) // lattice + 1))
    rects = tuple(tuple((top + r * (cell + gap_y), top + r * (cell + gap_y) + cell,
                         left + c * (cell + gap_x), left + c * (cell + gap_x) + cell) for c in range(cols))
                  for r in range(rows))
    return Block(rows, cols, layout, rects)


def paper(rng: np.random.Generator, base: np.ndarray) -> np.ndarray:
    """Make a light background [h, w, 3] in [0, 1] look like paper: grain, sometimes ruled lines, faint marks.
    Every addition stays lighter than luminance 0.45, while digit ink is at most 0.3."""
    h, w, _ = base.shape
    page = base + rng.normal(0, rng.uniform(0.005, 0.03), (h, w, 1)).astype(np.float32)  # grain
    if rng.random() < 0.5:  # ruled lines: a faint colour every `pitch` pixels
        pitch = int(rng.integers(18, 40))
        line = base.mean(axis=(0, 1)) * rng.uniform(0.8, 0.92)
        for y in range(int(rng.integers(0, pitch)), h, pitch):
            page[y] = page[y] * 0.4 + line * 0.6
    marks = Image.new("L", (w, h), 0)  # faint strokes and specks: alpha of a light-grey overlay
    draw = ImageDraw.Draw(marks)
    for _ in range(int(rng.integers(0, 12))):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.5:
            dx, dy = (int(v) for v in rng.integers(-40, 41, 2))
            draw.line([(x, y), (x + dx, y + dy)], fill=int(rng.integers(60, 160)), width=int(rng.integers(1, 3)))
        else:
            r = int(rng.integers(1, 4))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=int(rng.integers(60, 160)))
    alpha = np.asarray(marks, np.float32)[..., None] / 255 * 0.35
    grey = np.float32(0.5)
    page = page * (1 - alpha) + grey * alpha
    return np.clip(page, 0.0, 1.0)
