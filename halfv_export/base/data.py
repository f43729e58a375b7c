"""Calibration / validation samples: a built-in synthetic set, or a folder with a prompts JSONL.

--data PATH is either a JSONL file or a folder holding `prompts.jsonl`; each line is
    {"image": "relative/or/absolute.png", "prompt": "What is written here?"}
("image" may be null for a text-only prompt). Images are converted to RGB (grayscale, RGBA, palette, 16-bit).
A line may also carry the reference "answer" (a string; validate then scores exact-match accuracy) and a question
"type" (a string; accuracy is also reported per type).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from .errors import BadInput

MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # refuse decompression bombs with a clear line instead of a PIL warning

SIZES = [(224, 224), (448, 336), (336, 448), (392, 280), (448, 448), (280, 504), (504, 252), (308, 308)]
PROMPTS = {
    "shapes": ["What shapes are in this image?", "How many circles can you see?", "Describe the shapes and colours."],
    "text": ["What is written in the image?", "Read the text in the picture.", "Which words are visible?"],
    "texture": ["Describe the texture of this image.", "What pattern is shown here?", "Describe the colours."],
}


@dataclass
class Sample:
    name: str
    image: Image.Image | None
    prompt: str
    answer: str | None = None  # reference answer, when the data has one (accuracy)
    type: str | None = None  # question type, for per-type accuracy


def _shapes(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        fill = tuple(int(c) for c in rng.integers(0, 255, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)
    return img


def _text(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(12, h // 12))
    words = ["HALF", "VISION", "token", "prune", "EXPORT", "42", "graph", "cache", "ONNX", "red", "blue"]
    y = 5
    while y < h - 20:
        line = " ".join(rng.choice(words, size=int(rng.integers(1, 4))))
        draw.text((int(rng.integers(2, max(3, w // 4))), y), line, fill=tuple(int(c) for c in rng.integers(0, 160, 3)),
                  font=font)
        y += max(14, h // 8)
    return img


def _texture(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fx, fy = rng.uniform(0.02, 0.2, 2)
    base = np.sin(xx * fx) * np.cos(yy * fy)
    noise = rng.normal(0, 0.3, (h, w))
    channels = [(base * rng.uniform(0.5, 1) + noise + 1) / 2 for _ in range(3)]
    return Image.fromarray((np.clip(np.stack(channels, -1), 0, 1) * 255).astype(np.uint8))


def synthetic_set(count: int = 8, seed: int = 0) -> list[Sample]:
    """Generated shapes, text and textures at several resolutions, each with a fitting prompt. Deterministic."""
    rng = np.random.default_rng(seed)
    makers = [("shapes", _shapes), ("text", _text), ("texture", _texture)]
    samples = []
    for i in range(count):
        kind, make = makers[i % len(makers)]
        w, h = SIZES[i % len(SIZES)]
        prompts = PROMPTS[kind]
        samples.append(Sample(f"synthetic-{i:02d}-{kind}-{w}x{h}", make(rng, w, h), prompts[i % len(prompts)]))
    return samples


def load_image(path: Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"image {path} does not exist; check the path")
    if path.stat().st_size == 0:
        raise BadInput(f"image {path} is empty (0 bytes); replace the file")
    return _decode(path, f"image {path}")


def image_from_bytes(data: bytes, name: str = "image") -> Image.Image:
    """An encoded image held in memory (e.g. a data: URL's payload), with the same checks as load_image."""
    if not data:
        raise BadInput(f"{name} is empty (0 bytes); send a PNG/JPEG/WebP image")
    return _decode(io.BytesIO(data), name)


def _decode(source, name: str) -> Image.Image:
    try:
        with Image.open(source) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise BadInput(f"{name} is {im.width}x{im.height}, over the {MAX_IMAGE_PIXELS} pixel limit; "
                               "downscale it first")
            im.load()
            return to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadInput(f"{name} cannot be read ({e.__class__.__name__}); pass a PNG/JPEG/WebP image") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. 16-bit grayscale is scaled, not clipped; alpha (an alpha band or a transparency
    entry) is composited on white, as transformers' convert_to_rgb does."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray((np.clip(arr / peak, 0, 1) * 255).astype(np.uint8))
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


def load_data(path: Path) -> list[Sample]:
    path = Path(path)
    jsonl = path / "prompts.jsonl" if path.is_dir() else path
    if not jsonl.is_file():
        raise BadInput(f"--data {path}: expected a prompts JSONL file or a folder containing prompts.jsonl")
    samples = []
    for lineno, line in enumerate(jsonl.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise BadInput(f"{jsonl}:{lineno}: not a JSON object; each line needs {{\"image\": ..., \"prompt\": ...}}") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise BadInput(f"{jsonl}:{lineno}: needs a non-empty \"prompt\" string")
        answer, kind = row.get("answer"), row.get("type")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if answer is not None and not isinstance(answer, str):
            raise BadInput(f"{jsonl}:{lineno}: \"answer\" must be a string (or a number)")
        if kind is not None and (not isinstance(kind, str) or not kind.strip()):
            raise BadInput(f"{jsonl}:{lineno}: \"type\" must be a non-empty string")
        image = row.get("image")
        samples.append(Sample(name=str(image or f"line{lineno}"),
                              image=load_image(jsonl.parent / image) if image else None, prompt=row["prompt"],
                              answer=answer, type=kind))
    if not samples:
        raise BadInput(f"--data {jsonl}: no samples; add lines like {{\"image\": \"a.png\", \"prompt\": \"...\"}}")
    return samples
