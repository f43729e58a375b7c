"""Prompt rows as torch tensors for the eager path: the token rows of host/prompts.py (the user's text always read
as text; see there), left-padded into one batch by host/inputs.py."""

from __future__ import annotations

import torch

from ..host.inputs import left_padded
from ..host.prompts import tokenized_rows


def tokenize_prompts(tokenizer, images: list, prompts: list[str], placeholder: str, count: int,
                     image_token_id: int, add_special_tokens: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """host.prompts.tokenized_rows, then one left-padded batch -> (input_ids, attention_mask) [B, S] int64."""
    input_ids, attention_mask = left_padded(tokenized_rows(tokenizer, images, prompts, placeholder, count,
                                                           image_token_id, add_special_tokens),
                                            tokenizer.pad_token_id)
    return torch.from_numpy(input_ids), torch.from_numpy(attention_mask)
