"""The page task (tasks/pages.py): a small block of real digit scans somewhere on a large paper-like page. The checks
read the drawn pages themselves (pixels, the digits' boxes, the scans' labels), not the generator's grid."""

import numpy as np
import pytest

from halfv_export.base.errors import BadInput
from halfv_export.tasks.pages import MAX_CONTENT
from halfv_export.tasks.digits import glyph_alpha, normalise_answer, scan, scan_indices, task_set

SIZES = [(448, 448), (392, 504)]
LUMA = np.array([0.299, 0.587, 0.114])


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "augmented"])
def pages(request):
    """Evaluation pages, and training pages drawn with distorted scans (--augment): both keep every rule below."""
    return task_set(60, seed=5, sizes=SIZES, task="page", split="train" if request.param else "eval",
                    augment=request.param)


def _rows_by_position(sample):
    """The digits of a page read off their boxes as a reader would: sorted by top, a new row wherever the next top
    is more than half a slot below the previous one (within a row tops differ by at most a quarter slot, between
    rows by three quarters at least), digits left to right -> [[label, ...], ...]."""
    boxes = sorted((top, left, side, scan(sample.scans[r][c])[1]) for r, c, top, left, side in sample.boxes)
    rows, current = [], []
    for box in boxes:
        if current and box[0] - current[-1][0] > 14:
            rows.append(current)
            current = []
        current.append(box)
    rows.append(current)
    return [[label for *_, label in sorted(row, key=lambda b: b[1])] for row in rows]


def test_content_is_a_small_block_anywhere_on_a_page_of_either_shape(pages):
    tops, lefts = [], []
    for sample in pages:
        h, w = sample.image.height, sample.image.width
        assert (h, w) in SIZES
        assert 2 <= len(sample.boxes) <= 8
        assert sum(side * side for *_, side in sample.boxes) <= MAX_CONTENT * h * w
        for _, _, top, left, side in sample.boxes:
            assert 0 <= top and top + side <= h and 0 <= left and left + side <= w
        tops.append(min(b[2] for b in sample.boxes) / h)
        lefts.append(min(b[3] for b in sample.boxes) / w)
    # the block is not pinned to one place: it starts in every half of the page across the set
    assert min(tops) < 0.3 and max(tops) > 0.6 and min(lefts) < 0.3 and max(lefts) > 0.6


def test_the_background_is_light_textured_paper_never_ink(pages):
    for sample in pages[:20]:
        pixels = np.asarray(sample.image, np.float64) / 255
        paper = np.ones(pixels.shape[:2], dtype=bool)
        for _, _, top, left, side in sample.boxes:
            paper[top:top + side, left:left + side] = False
        luma = pixels[paper] @ LUMA
        assert luma.min() > 0.35  # marks and ruled lines stay far lighter than ink (<= 0.3)
        assert pixels[paper].std(axis=0).max() > 0.003  # not a flat colour: grain at least


def test_answers_match_the_digits_as_drawn(pages):
    """Oracle: the rows and columns a reader sees (digit boxes grouped by position) and the scans' labels."""
    asked = set()
    for sample in pages:
        rows = _rows_by_position(sample)
        assert [len(r) for r in rows] == [len(r) for r in sample.grid]  # every cell holds a digit: shape is visible
        flat = [d for row in rows for d in row]
        asked.add(sample.type)
        if sample.type == "read_all":
            expected = " ".join(map(str, flat))
        elif sample.type == "count_all":
            expected = str(len(flat))
        elif sample.type == "count_digit":
            digit = int(sample.prompt.split("does ")[1].split()[0])
            expected = str(flat.count(digit))
        elif sample.type == "row_digits":
            row = int(sample.prompt.split("row ")[1].split(",")[0])
            expected = " ".join(map(str, rows[row - 1]))
        else:
            row, col = (int(x) for x in sample.prompt.replace("?", "").split("row ")[1].split(", column "))
            expected = str(rows[row - 1][col - 1])
        assert normalise_answer(sample.answer) == expected, (sample.name, sample.prompt)
    assert asked == {"digit_at", "row_digits", "count_digit", "count_all", "read_all"}


def test_same_arguments_same_pages_and_grid_stays_the_default():
    a, b = task_set(3, seed=9, sizes=SIZES, task="page"), task_set(3, seed=9, sizes=SIZES, task="page")
    assert all(x.prompt == y.prompt and x.answer == y.answer and x.image.tobytes() == y.image.tobytes()
               for x, y in zip(a, b))
    grid = task_set(1, seed=9)[0]
    assert (grid.image.height, grid.image.width) == (224, 224) and len(grid.grid) == 4  # 4 x 4 cells
    with pytest.raises(BadInput, match="unknown task"):
        task_set(1, task="poster")


def test_augmenting_changes_only_the_scans():
    plain = task_set(4, seed=3, split="train", sizes=SIZES, task="page")
    distorted = task_set(4, seed=3, split="train", sizes=SIZES, task="page", augment=True)
    for a, b in zip(plain, distorted, strict=True):  # same page, digits, boxes and question
        assert (a.prompt, a.answer, a.boxes, a.scans) == (b.prompt, b.answer, b.boxes, b.scans)
        assert a.image.tobytes() != b.image.tobytes()


def test_augmented_scans_stay_the_same_digit():
    """Oracle: a nearest-neighbour reader that knows only the plain training scans reads the distorted ones. The
    distortion must change the drawing (else it teaches nothing) but not which digit it is."""
    rng = np.random.default_rng(0)
    train = scan_indices("train")
    plain = np.stack([glyph_alpha(int(i), 24).ravel() for i in train])
    labels = np.array([scan(int(i))[1] for i in train])
    picked = rng.choice(len(train), 200, replace=False)
    distorted = np.stack([glyph_alpha(int(train[j]), 24, rng).ravel() for j in picked])
    assert np.abs(distorted - plain[picked]).mean() > 0.03  # drawn differently
    others = np.ones((len(picked), len(train)), dtype=bool)
    others[np.arange(len(picked)), picked] = False  # the reader may not look at the scan itself
    distance = ((distorted[:, None, :] - plain[None, :, :]) ** 2).sum(-1)
    nearest = np.where(others, distance, np.inf).argmin(1)
    assert (labels[nearest] == labels[picked]).mean() >= 0.9
