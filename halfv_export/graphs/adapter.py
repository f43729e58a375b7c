"""The one interface a backbone implements, and the registry the pipeline looks backbones up in.

The HalfV code never touches a model class directly: an adapter loads the model, turns images + prompts into
`PrefillInputs` (embeddings with the visual features placed, rope positions, the visual span) and exposes the
language model as a `TextStack` (decoder layers, final norm, lm_head, rotary tables). Adding a backbone means one
new module that subclasses `BackboneAdapter` and registers itself; the pipeline does not change.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import BadInput


@dataclass(frozen=True)
class PaperSchedule:
    """The paper's hyper-parameters for one backbone, on the depth of the model they were tuned for."""

    ivr_layer: int
    keep_ratio: float
    anchor_ratio: float
    ssr_layer: int
    ssr_mode: str  # "topk" | "freeze"
    ssr_ratio: float | None
    reference_depth: int
    reference_model: str


@dataclass
class LoadedModel:
    """A model plus the pre-processing that belongs to it."""

    model: nn.Module
    tokenizer: Any
    image_processor: Any
    source: str  # "embedded:<backbone>:seed=<n>" or the checkpoint directory
    meta: dict = field(default_factory=dict)

    @property
    def config(self):
        return self.model.config


@dataclass
class PrefillInputs:
    """Everything the language model's prefill needs, for a batch that shares one visual token count N."""

    input_ids: torch.Tensor  # [B, S] int64, left-padded
    embeds: torch.Tensor  # [B, S, D] token embeddings with visual features placed at [s, s+N)
    attention_mask: torch.Tensor  # [B, S] int64, 1 = real token, 0 = left padding
    positions: torch.Tensor  # [P, B, S] int64 rope positions (P = 3 for M-RoPE, 1 for 1-D RoPE)
    visual_start: torch.Tensor  # [B] int64, s: row of the first visual token (0 when N = 0)
    num_visual: int  # N, identical for every sample in the batch
    next_positions: torch.Tensor  # [P, B] int64, rope position of the first generated token

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]

    @property
    def seq_len(self) -> int:
        return self.embeds.shape[1]


@dataclass
class TextStack:
    """The language model as the HalfV code sees it. Decoder layers follow the HF Llama layout
    (self_attn.{q,k,v,o}_proj, input_layernorm, post_attention_layernorm, mlp), which Qwen2, Llama and Mistral share."""

    layers: list[nn.Module]
    norm: nn.Module  # final RMSNorm
    lm_head: nn.Module
    embed_tokens: nn.Module
    rotary: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (x, positions[P,B,S]) -> cos, sin [B,S,hd]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @property
    def num_layers(self) -> int:
        return len(self.layers)


class BackboneAdapter(abc.ABC):
    name: ClassVar[str]  # CLI name, e.g. "qwen2.5-vl"
    model_types: ClassVar[tuple[str, ...]]  # config.model_type values this adapter loads
    paper: ClassVar[PaperSchedule]
    default_prompt: ClassVar[str] = "Describe the image."

    @abc.abstractmethod
    def load(self, model_dir: Path | None = None, seed: int = 0) -> LoadedModel:
        """A local checkpoint directory, or the embedded default with weights seeded by `seed`."""

    @abc.abstractmethod
    def prepare(self, loaded: LoadedModel, images: list, prompts: list[str]) -> PrefillInputs:
        """PIL images (or None for a text-only prompt) and prompts -> prefill inputs, chat template applied."""

    @abc.abstractmethod
    def text_stack(self, loaded: LoadedModel) -> TextStack:
        ...

    def decode_text(self, loaded: LoadedModel, token_ids: list[int]) -> str:
        return loaded.tokenizer.decode(token_ids, skip_special_tokens=True)

    def eos_token_ids(self, loaded: LoadedModel) -> set[int]:
        eos = loaded.tokenizer.eos_token_id
        return {eos} if eos is not None else set()


ADAPTERS: dict[str, type[BackboneAdapter]] = {}


def register(cls: type[BackboneAdapter]) -> type[BackboneAdapter]:
    ADAPTERS[cls.name] = cls
    return cls


def get_adapter(name: str) -> BackboneAdapter:
    from . import qwen2_5_vl  # noqa: F401  (registers itself)

    if name not in ADAPTERS:
        raise BadInput(f"unknown backbone '{name}'; choose one of: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name]()


def adapter_for_model_type(model_type: str) -> BackboneAdapter | None:
    from . import qwen2_5_vl  # noqa: F401

    for cls in ADAPTERS.values():
        if model_type in cls.model_types:
            return cls()
    return None


def visual_span(input_ids: torch.Tensor, image_token_id: int) -> tuple[torch.Tensor, int]:
    """Per sample, the first row s of the image placeholder block and its length N.

    input_ids [B, S] -> (s [B] int64, N). Requires one contiguous block per sample and the same N across the batch
    (a batch is one image-size bucket); N = 0 for a text-only batch, with s = 0.
    """
    is_visual = input_ids == image_token_id  # [B, S]
    counts = is_visual.sum(dim=1)
    n = int(counts[0])
    if bool((counts != n).any()):
        raise BadInput(
            f"samples in one batch have different visual token counts {counts.tolist()}; "
            "batch only images of the same size bucket"
        )
    if n == 0:
        return torch.zeros(input_ids.shape[0], dtype=torch.long), 0
    start = is_visual.int().argmax(dim=1)  # first True per row
    rows = start[:, None] + torch.arange(n)[None, :]
    if not bool(is_visual.gather(1, rows.clamp(max=input_ids.shape[1] - 1)).all()):
        raise BadInput("the image placeholder tokens are not contiguous; use one image per prompt")
    return start.long(), n
