"""The prompt rows a build's graphs run, as numpy arrays: token ids left-padded into one batch, the visual span, the
rope positions, the image's pixels, and the alignment of every prefill to PAD_MULTIPLE rows."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..base.errors import BadInput

# A batch's rows are left-padded to one length S; that is exact in real arithmetic but not in float: ONNX Runtime's
# CPU kernels reduce over the sequence axis in SIMD lanes, so the same prompt behind 2 pad tokens gets logits ~3e-6
# away from the prompt alone. Padding every prefill, single or batched, to a multiple of PAD_MULTIPLE puts a prompt's
# tokens at the same lane offset whoever shares its batch (bit-identical answers on the AVX-512 box it was measured
# on; elsewhere ONNX Runtime's threads may still split a batch differently, ~1e-5), and validate gates these rows.
PAD_MULTIPLE = 16


@dataclass
class HostArrays:
    """What the host computes before any graph runs (graphs.adapter.HostInputs holds the same as torch tensors)."""

    input_ids: np.ndarray  # [B, S] int64, left-padded
    attention_mask: np.ndarray  # [B, S] int64
    positions: np.ndarray  # [P, B, S] int64 (P = 3 for M-RoPE, else 1)
    visual_start: np.ndarray  # [B] int64
    num_visual: int
    next_positions: np.ndarray  # [P, B] int64
    pixel_values: list  # per image: the vision graph's input (backbone-specific layout), float32
    bucket: tuple[int, int] | None  # (height, width) the images were resized to; None for text-only


def left_padded(rows: list[list[int]], pad_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Token id rows -> (input_ids, attention_mask) [B, S] int64, padding on the left (pad id, mask 0)."""
    width = max(len(r) for r in rows)
    if pad_id is None and any(len(r) < width for r in rows):
        raise BadInput("the tokenizer has no pad token, so prompts of different lengths cannot share a batch; set "
                       "pad_token in tokenizer_config.json or run one prompt at a time")
    input_ids = np.array([[pad_id] * (width - len(r)) + r for r in rows], dtype=np.int64)
    attention_mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=np.int64)
    return input_ids, attention_mask


def visual_span(input_ids: np.ndarray, image_token_id: int) -> tuple[np.ndarray, int]:
    """Per sample, the first row of the image placeholder block and its length N ([B] int64, N); one contiguous
    block per sample, the same N across the batch; N = 0 (start 0) for a text-only batch."""
    is_visual = input_ids == image_token_id
    counts = is_visual.sum(axis=1)
    n = int(counts[0])
    if (counts != n).any():
        raise BadInput(f"samples in one batch have different visual token counts {counts.tolist()}; batch only "
                       "images of the same size bucket")
    if n == 0:
        return np.zeros(len(input_ids), dtype=np.int64), 0
    start = is_visual.argmax(axis=1)
    for b, s in enumerate(start):
        if not is_visual[b, s:s + n].all():
            # prompt text never yields image tokens (host/prompts.py): only a template or tokenizer that splits the
            # expanded image slot gets here
            runs = int((is_visual[b, 1:] & ~is_visual[b, :-1]).sum()) + int(is_visual[b, 0])
            raise BadInput(f"sample {b}: the {n} image tokens (id {image_token_id}) form {runs} separate blocks "
                           "instead of one; the chat template or tokenizer splits the image slot, so use the "
                           "checkpoint's own chat_template.jinja and tokenizer.json")
    return start.astype(np.int64), n


def keep_visual_rows(host: HostArrays, tokens: np.ndarray) -> HostArrays:
    """The prompt rows after a vision cut kept `tokens` [B, K] (ascending indices into the N visual rows): the
    dropped image rows go, and the kept ones keep their original rope positions (M-RoPE: the token's own (t, h, w));
    the text after the image keeps its positions too, so a prompt's positions are those of the uncut prompt with
    columns removed."""
    seq, n = host.input_ids.shape[1], host.num_visual
    index = np.stack([np.concatenate([np.arange(start), start + np.asarray(kept, dtype=np.int64),
                                      np.arange(start + n, seq)])
                      for start, kept in zip(np.asarray(host.visual_start).tolist(), np.asarray(tokens))])
    take = lambda x: np.take_along_axis(x, index, axis=1)  # noqa: E731
    positions = np.take_along_axis(host.positions, np.broadcast_to(index, host.positions.shape[:1] + index.shape),
                                   axis=2)
    return replace(host, input_ids=take(host.input_ids), attention_mask=take(host.attention_mask),
                   positions=positions, num_visual=int(np.asarray(tokens).shape[1]))


def cut_rows(host: HostArrays, tokens: np.ndarray, pad_id: int) -> HostArrays:
    """The rows a cut build's HalfV prefill runs: keep_visual_rows, re-aligned to PAD_MULTIPLE (S - N + K rarely is
    a multiple). The runtime and the eager reference both cut through here, so parity compares the same rows."""
    return align_left(keep_visual_rows(host, tokens), PAD_MULTIPLE, pad_id)


def align_left(host: HostArrays, multiple: int, pad_id: int) -> HostArrays:
    """The same rows with S rounded up to a multiple by more left padding: input_ids gets pad_id, attention_mask 0,
    positions repeat their first column (masked rows never reach real ones), visual_start moves right."""
    batch, seq = host.input_ids.shape
    extra = (-seq) % multiple
    if extra == 0:
        return host

    def left(x, value):
        return np.concatenate([np.full((batch, extra), value, dtype=x.dtype), x], axis=1)

    return replace(host, input_ids=left(host.input_ids, pad_id), attention_mask=left(host.attention_mask, 0),
                   positions=np.concatenate([np.repeat(host.positions[..., :1], extra, axis=2), host.positions], axis=2),
                   visual_start=host.visual_start + extra if host.num_visual > 0 else host.visual_start)
