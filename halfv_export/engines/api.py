"""The Python API over built artifacts: `halfv_export.load(artifacts)` -> Model, with batched greedy `generate` and
token-by-token `stream`. The CLI's `run` and the HTTP server (`serve`) are shells over it.

    import halfv_export
    model = halfv_export.load("build/")                       # manifest checked, sessions opened lazily
    answers = model.generate(["photo.png", None], ["What is in this picture?", "Say hi."], max_new_tokens=32)
    for piece in model.stream("photo.png", "What is in this picture?"):
        print(piece.text, end="")

Batches: the graphs take one image-size bucket per call (one visual token count N), so a batch whose images fall
into different buckets (text-only prompts are their own group) is split into per-bucket sub-batches, run one after
the other, and the answers come back in the order of the prompts. Inside a sub-batch prompts are left-padded to a
multiple of PAD_MULTIPLE (EnginePipeline.host, the rows validate gates too), so a prompt sits at the same SIMD-lane
offset batched or alone and gets the same kept tokens and answer (host/inputs.py says why; tests/test_api.py
checks kept indices, tokens and logits to float rounding).

Decoding is greedy, through the loop every runtime shares (base/greedy.py). A prompt leaves its batch when it emits
an end-of-sequence token (finish_reason "stop"; the token is in `token_ids`, not in `text`) or reaches
max_new_tokens ("length"); the KV cache is then compacted to the rows still decoding, so a batch never pays for
finished or cancelled prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..base.data import image_from_bytes, load_image, to_rgb
from ..base.errors import BadInput
from ..base.greedy import Greedy
from ..base.manifest import verify_manifest
from ..base.staging import recover
from .base import DEFAULT_TARGET, EngineOptions, get_target
from .pipeline import EnginePipeline, EngineStepper


def open_pipeline(artifacts: Path, target: str = DEFAULT_TARGET, options: EngineOptions | None = None,
                  full_check: bool = True) -> EnginePipeline:
    """The one way artifacts are opened (CLI run / validate, the API, serve): recover a build killed in its final
    swap, check the files against manifest.json (full_check: every sha256, as `validate` does; else the fast check
    of base/manifest.py that `run`, the API and `serve` use), then let the target open its runner."""
    artifacts = Path(artifacts)
    engine_target = get_target(target)
    if not artifacts.is_dir():
        raise BadInput(f"artifacts folder {artifacts} does not exist; pass the --out folder of `halfv-export build`")
    recover(artifacts)
    verified = verify_manifest(artifacts, full=full_check)
    pipeline = EnginePipeline(artifacts, engine_target.open(artifacts, options or EngineOptions()))
    pipeline.verified = verified  # lets validate's manifest rewrite keep hashes it has just recomputed
    return pipeline


def load(artifacts, target: str = DEFAULT_TARGET, ep: str = "cpu", threads: int | None = None) -> "Model":
    """Open an artifacts folder written by `halfv-export build` (or export [+ engine]) for generation.

    target: an engine target ("onnxruntime", "tensorrt"); ep: ONNX Runtime execution provider (cpu, cuda, tensorrt);
    threads: ONNX Runtime intra-op threads (None: all cores). Raises BadInput (one line) for a missing or tampered
    folder, an unknown target or provider."""
    return Model(open_pipeline(Path(artifacts), target, EngineOptions(ep=ep, threads=threads), full_check=False))


@dataclass(frozen=True)
class Completion:
    """One prompt's answer."""

    text: str  # special tokens skipped
    token_ids: list[int]  # generated ids; the end-of-sequence id is the last one when finish_reason == "stop"
    finish_reason: str  # "stop": end-of-sequence token; "length": max_new_tokens reached
    prompt_tokens: int  # the prompt's length after the chat template, image placeholders included
    bucket: tuple[int, int] | None  # exported (height, width) bucket the image ran in; None for a text-only prompt


@dataclass(frozen=True)
class Piece:
    """One decoded token of a stream. Joining the `text` of one index's pieces gives that prompt's Completion.text
    (text is "" while a multi-byte character is still incomplete, or for a special token)."""

    index: int  # position of the prompt in the batch (0 for a single prompt)
    token_id: int
    text: str
    finish_reason: str | None  # None until this prompt's last piece


class Detokenizer:
    """Incremental decoding of one token stream. Decoding token by token and concatenating is wrong for byte-level
    BPE (a character split over tokens) and for SentencePiece (a word's leading space depends on what precedes it),
    so each step decodes a short window: the text of ids[prefix:read] is already out, ids[prefix:] is decoded, and
    what it adds is emitted unless it ends in an incomplete character (U+FFFD). Cost per token is O(window)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """At the end of the stream: whatever is still held back (an incomplete character decodes as U+FFFD)."""
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):] if after.startswith(before) else ""


class Decoding(Greedy):
    """A greedy decode (base/greedy.py) of one batch whose prompts share a bucket (or are all text-only), prefilled
    on the graphs. The batcher drives `step()` and `cancel`; finished and cancelled rows leave the cache at once."""

    def __init__(self, pipeline: EnginePipeline, images: list, prompts: list[str], budgets: list[int], halfv: bool,
                 context: int | None = None):
        host = pipeline.host(images, prompts)
        self.prompt_tokens = [int(n) for n in host.attention_mask.sum(axis=1)]
        for i, (n, budget) in enumerate(zip(self.prompt_tokens, budgets)):
            if context is not None and n + budget > context:
                raise BadInput(f"prompt {i} has {n} tokens; with max_new_tokens {budget} that exceeds the "
                               f"{context}-token context; shorten the prompt or lower max_new_tokens")
        self.bucket = host.bucket
        super().__init__(EngineStepper(pipeline, pipeline.prefill(host, halfv)), budgets,
                         {int(t) for t in pipeline.meta["eos_token_ids"]})

    @property
    def state(self):
        """The engine state of the rows still decoding (None once all are done)."""
        return self.stepper.state


class Model:
    """Generation over one artifacts folder. Not thread-safe: engine sessions are not re-entrant, so one thread
    drives a Model at a time (the server runs a single engine worker)."""

    def __init__(self, pipeline: EnginePipeline):
        self.pipeline = pipeline
        self.meta = pipeline.meta
        self.backbone: str = pipeline.meta["backbone"]
        self.buckets: list[tuple[int, int]] = [tuple(b["size"]) for b in pipeline.meta["buckets"]]
        config = pipeline.host_side.config
        self.context: int | None = config.get("text_config", config).get("max_position_embeddings")
        self.tokenizer = pipeline.host_side.tokenizer  # host/text.HostTokenizer

    def __repr__(self) -> str:
        buckets = ", ".join(f"{h}x{w}" for h, w in self.buckets)
        return f"Model({self.backbone}, {self.pipeline.artifacts}, buckets {buckets}, {self.describe()})"

    def describe(self) -> str:
        return self.pipeline.runner.describe()

    def warm_up(self) -> None:
        """Open every engine session now (a server's first request should not pay for it, and broken engines should
        fail at start-up): two tokens per bucket with HalfV, and two text-only ones over the unpruned graphs."""
        from PIL import Image

        for h, w in self.buckets:
            self.generate(Image.new("RGB", (w, h), (128, 128, 128)), "warm-up", max_new_tokens=2)
        self.generate(None, "warm-up", max_new_tokens=2)

    # ------------------------------------------------------------------------------------------------ inputs
    def image(self, image):
        """A PIL image, a path, encoded bytes or None -> an RGB image fitted to an exported bucket (or None)."""
        if image is None:
            return None
        if isinstance(image, (str, Path)):
            image = load_image(Path(image))
        elif isinstance(image, (bytes, bytearray)):
            image = image_from_bytes(bytes(image))
        elif hasattr(image, "convert") and hasattr(image, "size"):
            image = to_rgb(image)
        else:
            raise BadInput(f"an image must be a PIL image, a path or encoded bytes, not {type(image).__name__}")
        return self.pipeline.fit_image(image)

    def bucket_of(self, fitted) -> tuple[int, int] | None:
        """The exported bucket a fitted image (see `image`) runs in; None for no image."""
        if fitted is None:
            return None
        return tuple(self.pipeline.host_side.bucket_for((fitted.height, fitted.width)))

    def start(self, images: list, prompts: list[str], max_new_tokens, full: bool = False) -> Decoding:
        """Prefill one batch of fitted images (one bucket, or all None) and return its Decoding. max_new_tokens: one
        int for all, or one per prompt."""
        budgets = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else \
            [max_new_tokens] * len(prompts)
        return Decoding(self.pipeline, images, prompts, budgets, halfv=not full, context=self.context)

    def _batch(self, images, prompts, max_new_tokens) -> tuple[bool, list, list[str]]:
        single = isinstance(prompts, str)
        if single:
            images, prompts = [images], [prompts]
        elif images is None:
            images = [None] * len(prompts)
        if isinstance(images, (str, Path, bytes)) or hasattr(images, "convert"):
            raise BadInput("a batch of prompts needs a list of images (one image or None per prompt)")
        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise BadInput(f"{len(images)} images for {len(prompts)} prompts; give one image (or None) per prompt")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise BadInput(f"prompt {i} is a {type(prompt).__name__}; prompts are strings")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
            raise BadInput(f"max_new_tokens must be a positive integer, not {max_new_tokens!r}")
        return single, [self.image(im) for im in images], prompts

    def _groups(self, fitted: list) -> dict:
        groups: dict = {}
        for i, im in enumerate(fitted):
            groups.setdefault(self.bucket_of(im), []).append(i)
        return groups

    # ------------------------------------------------------------------------------------------------ generation
    def stream(self, images, prompts, max_new_tokens: int = 32, full: bool = False) -> Iterator[Piece]:
        """Yield a Piece per generated token as it is decoded.

        images / prompts: one image (PIL image, path, bytes or None) and one prompt string, or two equally long lists.
        A batch runs bucket by bucket (pieces of one bucket's prompts interleave; `index` says whose piece it is).
        full: run the unpruned graphs instead of HalfV."""
        _, fitted, prompts = self._batch(images, prompts, max_new_tokens)
        for indices in self._groups(fitted).values():
            decoding = self.start([fitted[i] for i in indices], [prompts[i] for i in indices], int(max_new_tokens),
                                  full)
            texts = [Detokenizer(self.tokenizer) for _ in indices]
            while not decoding.done:
                for row, token, finish in decoding.step():
                    text = texts[row].push(token) + (texts[row].flush() if finish else "")
                    yield Piece(index=indices[row], token_id=token, text=text, finish_reason=finish)

    def generate(self, images, prompts, max_new_tokens: int = 32, full: bool = False):
        """Greedy answers: a list of Completion for lists of images and prompts, one Completion for a single image
        (or None) and prompt string. Images of any size are resized to the exported bucket of closest aspect ratio
        (as `halfv-export run` does); prompts of different buckets run as separate sub-batches."""
        single, fitted, prompts = self._batch(images, prompts, max_new_tokens)
        results: list = [None] * len(prompts)
        for bucket, indices in self._groups(fitted).items():
            decoding = self.start([fitted[i] for i in indices], [prompts[i] for i in indices], int(max_new_tokens),
                                  full)
            while not decoding.done:
                decoding.step()
            for row, i in enumerate(indices):
                ids = decoding.generated[row]
                results[i] = Completion(text=self.pipeline.decode_text(ids), token_ids=ids,
                                        finish_reason=decoding.finish[row], prompt_tokens=decoding.prompt_tokens[row],
                                        bucket=bucket)
        return results[0] if single else results
