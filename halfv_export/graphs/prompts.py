"""Prompt rows as torch tensors for the eager path and validate: the token rows of host/prompts.py (the user's text
always read as text; see there), left-padded into one batch, and the PAD_MULTIPLE alignment every prefill gets."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..base.errors import BadInput
from ..host.prompts import tokenized_rows


def tokenize_prompts(tokenizer, images: list, prompts: list[str], placeholder: str, count: int,
                     image_token_id: int, add_special_tokens: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """host.prompts.tokenized_rows, then one left-padded batch -> (input_ids, attention_mask) [B, S] int64."""
    return left_padded(tokenized_rows(tokenizer, images, prompts, placeholder, count, image_token_id,
                                      add_special_tokens), tokenizer.pad_token_id)


def left_padded(rows: list[list[int]], pad_id: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id rows -> (input_ids, attention_mask) [B, S], padding on the left (pad id, mask 0)."""
    width = max(len(r) for r in rows)
    if pad_id is None and any(len(r) < width for r in rows):
        raise BadInput("the tokenizer has no pad token, so prompts of different lengths cannot share a batch; set "
                       "pad_token in tokenizer_config.json or run one prompt at a time")
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return input_ids, attention_mask


# A batch's rows are left-padded to one length S; that is exact in real arithmetic but not in float: ONNX Runtime's
# CPU kernels reduce over the sequence axis in SIMD lanes, so the same prompt behind 2 pad tokens gets logits ~3e-6
# away from the prompt alone. Padding every prefill, single or batched, to a multiple of PAD_MULTIPLE puts a prompt's
# tokens at the same lane offset whoever shares its batch (bit-identical answers on the AVX-512 box it was measured
# on; elsewhere ONNX Runtime's threads may still split a batch differently, ~1e-5), and validate gates these rows.
PAD_MULTIPLE = 16


def align_left(host, multiple: int, pad_id: int):
    """HostInputs [B, S] -> the same with S rounded up to a multiple by more left padding: input_ids gets pad_id,
    attention_mask 0, positions [P, B, S] repeat their first column (masked rows never reach real ones),
    visual_start moves right. next_positions and everything a real token sees stay as they were."""
    batch, seq = host.input_ids.shape
    extra = (-seq) % multiple
    if extra == 0:
        return host

    def left(x, value):
        return torch.cat([torch.full((batch, extra), value, dtype=x.dtype), x], dim=1)

    return replace(host, input_ids=left(host.input_ids, pad_id), attention_mask=left(host.attention_mask, 0),
                   positions=torch.cat([host.positions[..., :1].expand(-1, -1, extra), host.positions], dim=2),
                   visual_start=host.visual_start + extra if host.num_visual > 0 else host.visual_start)
