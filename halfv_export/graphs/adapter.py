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
from typing import Any, ClassVar

import torch
from torch import nn

from ..base.errors import BadInput
from ..base.kinds import SSRMode
from ..host.inputs import HostArrays, cut_rows, visual_span as host_visual_span

EMBEDDED_WEIGHTS = "model.safetensors"  # an embedded default's trained weights (fp16), beside its config
TRAINING_RECORD = "training.json"  # how they were trained: command, seed, data, time, held-out accuracy, image sizes


def read_training_record(directory: Path) -> dict:
    import json

    path = Path(directory) / TRAINING_RECORD
    return json.loads(path.read_text()) if path.exists() else {}


@dataclass(frozen=True)
class PaperSchedule:
    """The paper's hyper-parameters for one backbone, on the depth of the model they were tuned for."""

    ivr_layer: int
    keep_ratio: float
    anchor_ratio: float
    ssr_layer: int
    ssr_mode: SSRMode
    ssr_ratio: float | None
    reference_depth: int
    reference_model: str

    def at_depth(self, depth: int) -> dict:
        """The paper's values as schedule fields; layers are moved to the same relative depth when the model is not
        as deep as the one the paper tuned (e.g. Qwen's L2 = 21 of 28 -> 6 of 8), and kept inside
        1 <= L1 < L2 < depth."""
        scale = depth / self.reference_depth
        l1 = self.ivr_layer if depth == self.reference_depth else max(1, round(self.ivr_layer * scale))
        l2 = self.ssr_layer if depth == self.reference_depth else round(self.ssr_layer * scale)
        l1 = min(l1, depth - 2)
        l2 = min(max(l2, l1 + 1), depth - 1)
        return {"ivr_layer": l1, "keep_ratio": self.keep_ratio, "anchor_ratio": self.anchor_ratio, "ssr_layer": l2,
                "ssr_mode": self.ssr_mode, "ssr_ratio": self.ssr_ratio}


@dataclass
class Processing:
    """The pre-processing half of a model: enough to build host inputs and decode text."""

    tokenizer: Any
    image_processor: Any
    config: Any


@dataclass
class LoadedModel:
    """A model plus the pre-processing that belongs to it."""

    model: nn.Module
    tokenizer: Any
    image_processor: Any
    source: str  # "embedded:<backbone>:trained", "embedded:<backbone>:seed=<n>" or the checkpoint directory
    meta: dict = field(default_factory=dict)  # the embedded default's training record (training.json), if trained

    @property
    def config(self):
        return self.model.config

    @property
    def weights(self) -> str:
        """What the weights are, for reports: "random" (seeded), "trained" (shipped) or "checkpoint"."""
        if self.source.startswith("embedded:"):
            return "trained" if self.source.endswith(":trained") else "random"
        return "checkpoint"


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
    visual_tokens: torch.Tensor | None = None  # [B, K]: which of the image's tokens a vision cut kept (None: all)
    visual_shortfall: torch.Tensor | None = None  # [B]: of forced vision tokens (vision_cut.CutVision.shortfall)

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]

    @property
    def seq_len(self) -> int:
        return self.embeds.shape[1]


@dataclass
class HostInputs:
    """What the host computes before any graph runs: token ids, image patches, rope positions, the visual span."""

    input_ids: torch.Tensor  # [B, S] int64, left-padded
    attention_mask: torch.Tensor  # [B, S] int64
    positions: torch.Tensor  # [P, B, S] int64
    visual_start: torch.Tensor  # [B] int64
    num_visual: int
    next_positions: torch.Tensor  # [P, B] int64
    pixel_values: list  # per image: the vision encoder's input tensor (backbone-specific layout)
    bucket: tuple[int, int] | None  # (height, width) the images were resized to; None for text-only


def torch_host(host) -> HostInputs:
    """HostInputs from the runtime's numpy rows (host/inputs.HostArrays, what EnginePipeline.host returns), so the
    eager reference runs exactly the rows the engines ran; HostInputs pass through."""
    if isinstance(host, HostInputs):
        return host
    return HostInputs(input_ids=torch.as_tensor(host.input_ids), attention_mask=torch.as_tensor(host.attention_mask),
                      positions=torch.as_tensor(host.positions), visual_start=torch.as_tensor(host.visual_start),
                      num_visual=host.num_visual, next_positions=torch.as_tensor(host.next_positions),
                      pixel_values=[torch.as_tensor(p) for p in host.pixel_values], bucket=host.bucket)


class LayerMaths:
    """How the generic HalfV graph reads one decoder layer. The default is HF's Llama layout, which Qwen2, Llama and
    Mistral share: input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, mlp. A backbone whose layers
    differ (q/k norms as in Qwen3, a fused wqkv as in InternLM) overrides the methods that differ, so the export
    graph, the pruning scores and the freeze layer never assume one layout.

    Shapes: x [B, R, D] (already input-normed) -> queries [B, H, R, hd], keys / values [B, G, R, hd] (no RoPE yet);
    output: attention result [B, R, H*hd] -> [B, R, D]."""

    def input_norm(self, layer, h: torch.Tensor) -> torch.Tensor:
        return layer.input_layernorm(h)

    def queries(self, layer, x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
        return layer.self_attn.q_proj(x).view(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2)

    def keys(self, layer, x: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
        return layer.self_attn.k_proj(x).view(x.shape[0], x.shape[1], kv_heads, head_dim).transpose(1, 2)

    def values(self, layer, x: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
        return layer.self_attn.v_proj(x).view(x.shape[0], x.shape[1], kv_heads, head_dim).transpose(1, 2)

    def output(self, layer, attended: torch.Tensor) -> torch.Tensor:
        return layer.self_attn.o_proj(attended)

    def mlp(self, layer, h: torch.Tensor) -> torch.Tensor:
        """The layer's second residual branch, norm included."""
        return layer.mlp(layer.post_attention_layernorm(h))


@dataclass
class TextStack:
    """The language model as the HalfV code sees it: decoder layers read through `maths` (LayerMaths), the final
    norm, lm_head, embeddings and rotary tables, and the attention geometry (head_dim as the layers use it)."""

    layers: list[nn.Module]
    norm: nn.Module  # final RMSNorm
    lm_head: nn.Module
    embed_tokens: nn.Module
    rotary_emb: nn.Module  # the model's rotary module
    mrope: bool  # True: it takes positions [3, B, S] (M-RoPE); False: [B, S]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    maths: LayerMaths = field(default_factory=LayerMaths)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [P, B, S] -> cos, sin [B, S, hd] (already recomposed for M-RoPE)."""
        return self.rotary_emb(x, positions if self.mrope else positions[0])

    def queries(self, layer, x: torch.Tensor) -> torch.Tensor:
        return self.maths.queries(layer, x, self.num_heads, self.head_dim)

    def keys(self, layer, x: torch.Tensor) -> torch.Tensor:
        return self.maths.keys(layer, x, self.num_kv_heads, self.head_dim)

    def values(self, layer, x: torch.Tensor) -> torch.Tensor:
        return self.maths.values(layer, x, self.num_kv_heads, self.head_dim)


def layer_head_dim(layers, text_config) -> int:
    """The head size the decoder layers really use: their attention module's own `head_dim` (transformers'
    Qwen2.5-VL derives hidden // heads and ignores a config head_dim; Llama and Mistral honour it), else the
    config's, else hidden // heads."""
    found = getattr(layers[0].self_attn, "head_dim", None) if layers else None
    return int(found or getattr(text_config, "head_dim", None)
               or text_config.hidden_size // text_config.num_attention_heads)


class BackboneAdapter(abc.ABC):
    name: ClassVar[str]  # CLI name, e.g. "qwen2.5-vl"
    model_types: ClassVar[tuple[str, ...]]  # config.model_type values this adapter loads
    paper: ClassVar[PaperSchedule]
    model_class: ClassVar[type]  # the transformers ...ForConditionalGeneration class
    config_class: ClassVar[type]
    image_processor_class: ClassVar[type]  # a PIL image processor (no torchvision)
    embedded_dir: ClassVar[Path]  # shipped checkpoint directory without weights

    # which analytic FLOPs model counts the vision encoder (measure/vision_flops.py): "windowed" for a ViT with
    # attention windows and a spatial merger, "clip" for a CLIP tower run once per tile
    vision_tower: ClassVar[str | None] = None

    def load(self, model_dir: Path | None = None, seed: int | None = None, dtype=None) -> LoadedModel:
        """A local checkpoint directory (weights at `dtype`, default fp32); or the embedded default: its shipped
        trained weights (seed None), or weights drawn from `seed` (random, for testing the machinery). An embedded
        default without shipped weights falls back to seed 0, and says so in `source`."""
        from .checkpoint import check_checkpoint_dir, check_safetensors, load_pretrained, seeded_model

        meta: dict = {}
        if model_dir is None:
            weights = self.embedded_dir / EMBEDDED_WEIGHTS
            if seed is None and weights.exists():
                check_safetensors(weights)
                model = load_pretrained(self.model_class, self.embedded_dir)
                source = f"embedded:{self.name}:trained"
                meta = read_training_record(self.embedded_dir)
            else:
                seed = 0 if seed is None else seed
                config = self.config_class.from_pretrained(self.embedded_dir)
                model = seeded_model(self.model_class, config, seed)
                source = f"embedded:{self.name}:seed={seed}"
            files_dir = self.embedded_dir
        else:
            model_dir = Path(model_dir)
            check_checkpoint_dir(model_dir, self.model_types)
            model = load_pretrained(self.model_class, model_dir, dtype=dtype)
            source, files_dir = str(model_dir.resolve()), model_dir
        proc = self.load_processing(files_dir, config=model.config)
        return LoadedModel(model=model, tokenizer=proc.tokenizer, image_processor=proc.image_processor, source=source,
                           meta=meta)

    def load_config(self, model_dir: Path | None = None, seed: int | None = None) -> tuple:
        """(config, source) as `load` would give them, without reading any weights: what a schedule needs when no
        rule runs (calibrate --paper-values on a 7B checkpoint must not materialise 30 GB of fp32 weights)."""
        from .checkpoint import check_checkpoint_dir

        if model_dir is None:
            trained = seed is None and (self.embedded_dir / EMBEDDED_WEIGHTS).exists()
            source = f"embedded:{self.name}:" + ("trained" if trained else f"seed={0 if seed is None else seed}")
            return self.config_class.from_pretrained(self.embedded_dir), source
        model_dir = Path(model_dir)
        check_checkpoint_dir(model_dir, self.model_types)
        return self.config_class.from_pretrained(str(model_dir)), str(model_dir.resolve())

    def load_processing(self, directory: Path, config=None) -> "Processing":
        """Tokenizer (left padding), chat template, image processor and config from a directory (a checkpoint or an
        artifacts folder). Needs no weights."""
        from transformers import AutoTokenizer

        from .checkpoint import load_chat_template

        directory = Path(directory)
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
        load_chat_template(tokenizer, directory)
        tokenizer.padding_side = "left"
        image_processor = self.image_processor_class.from_pretrained(str(directory), local_files_only=True)
        if config is None:
            config = self.config_class.from_pretrained(str(directory))
        return Processing(tokenizer, image_processor, config)

    def save_processing(self, loaded: LoadedModel, directory: Path) -> list[str]:
        """Write what load_processing needs into `directory`; returns the file names written."""
        directory = Path(directory)
        before = set(directory.iterdir())
        loaded.tokenizer.save_pretrained(str(directory))
        loaded.image_processor.save_pretrained(str(directory))
        loaded.config.save_pretrained(str(directory))
        if loaded.tokenizer.chat_template and not (directory / "chat_template.jinja").exists():
            (directory / "chat_template.jinja").write_text(loaded.tokenizer.chat_template)
        return sorted(p.name for p in set(directory.iterdir()) - before)

    # ---------------------------------------------------------------- synthetic models (bench)
    def synthetic_config(self, text: dict, vision: dict | None = None):
        """The embedded default's config with the language model reshaped by `text` (HF text_config keys such as
        hidden_size, num_hidden_layers) and the vision tower by `vision`: what `bench` builds a random-weight model
        of published widths from."""
        return self.config_class(**self.synthetic_config_dict(text, vision))

    def synthetic_config_dict(self, text: dict, vision: dict | None = None) -> dict:
        """`synthetic_config` as a plain dict (what the FLOPs models read)."""
        import json

        cfg = json.loads((self.embedded_dir / "config.json").read_text())
        cfg["text_config"].update(text)
        if vision:
            cfg["vision_config"].update(vision)
        vocab = cfg["text_config"]["vocab_size"]
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # the embedded tokenizer's ids may not fit
            for where in (cfg, cfg["text_config"]):
                if isinstance(where.get(key), int) and where[key] >= vocab:
                    where[key] = None
        self.fit_config(cfg)
        return cfg

    def fit_config(self, cfg: dict) -> None:
        """Keep a config dict coherent after its text_config changed (e.g. widths the vision side must match)."""

    def prompt_positions(self, config, before: int, grid: tuple[int, int], after: int) -> torch.Tensor:
        """RoPE positions [P, 1, S] of one prompt: `before` text tokens, one image of grid (rows, cols) merged
        tokens, `after` text tokens. Default: 1-D RoPE, P = 1."""
        return torch.arange(before + grid[0] * grid[1] + after)[None, None]

    @abc.abstractmethod
    def host_inputs(self, processing: "Processing", images: list, prompts: list[str]) -> HostInputs:
        """PIL images (or None for a text-only prompt) and prompts -> host inputs, chat template applied.
        Needs only the tokenizer, image processor and config, never the weights."""

    @abc.abstractmethod
    def vision_graph(self, loaded: LoadedModel, bucket: tuple[int, int], cut=None) -> nn.Module:
        """A static-shape vision encoder for one image-size bucket: pixel input -> [N, D] visual features; with a
        vision cut (graphs/pruning.VisionCut) -> ([K, D] features, [K] kept token indices)."""

    def bucket_for(self, processing: "Processing", image_size: tuple[int, int]) -> tuple[tuple[int, int], int]:
        """An image size (h, w) -> (the bucket it resizes to, its visual token count N)."""
        raise NotImplementedError

    def token_boxes(self, processing: "Processing", bucket: tuple[int, int]) -> list[tuple[int, int, int, int]] | None:
        """Pixel box (top, left, bottom, right) on a bucket-sized image of each visual row, in row order, for the
        kept-token picture; None where the rows do not each cover one box of the image (anyres tiles)."""
        return None

    def prepare(self, loaded: LoadedModel, images: list, prompts: list[str], cut=None) -> PrefillInputs:
        """Host inputs + the eager embedding and vision tower (with a vision cut, if given) -> prefill inputs (the
        reference path)."""
        host = self.host_inputs(Processing(loaded.tokenizer, loaded.image_processor, loaded.config), images, prompts)
        return self.embed_host(loaded, host, cut)

    def embed_host(self, loaded: LoadedModel, host: HostInputs, cut=None,
                   force_vision: torch.Tensor | None = None) -> PrefillInputs:
        """Given host inputs (e.g. exactly the rows an engine runs: validate's parity) -> the eager prefill inputs.
        With a vision cut (graphs/pruning.VisionCut) the tower keeps K of the N visual tokens and the prompt keeps
        only their rows (host/inputs.cut_rows, as the runtime cuts them); the kept raster indices are in
        `visual_tokens`. `force_vision` [B, K]: keep those tokens instead (their shortfall in `visual_shortfall`)."""
        host = torch_host(host)
        tokens = shortfall = None
        with torch.no_grad():
            if cut is not None and host.num_visual > 0:
                cuts = [self.eager_vision_cut(loaded, px, host.bucket, cut, None if force_vision is None else
                                              torch.as_tensor(force_vision[b]))
                        for b, px in enumerate(host.pixel_values)]
                feats, tokens = torch.stack([c.features for c in cuts]), torch.stack([c.tokens for c in cuts])
                shortfall = torch.tensor([c.shortfall for c in cuts], dtype=torch.float64)
                rows = HostArrays(*(t.cpu().numpy() for t in (host.input_ids, host.attention_mask, host.positions,
                                                              host.visual_start)), host.num_visual,
                                  host.next_positions.cpu().numpy(), host.pixel_values, host.bucket)
                pad = loaded.tokenizer.pad_token_id
                host = torch_host(cut_rows(rows, tokens.cpu().numpy(), 0 if pad is None else int(pad)))
            embeds = self.text_stack(loaded).embed_tokens(host.input_ids)  # [B, S, D]
            if host.num_visual > 0:
                if tokens is None:
                    feats = torch.stack([self.eager_vision(loaded, px, host.bucket) for px in host.pixel_values])
                rows = (host.visual_start[:, None] + torch.arange(host.num_visual)[None, :])
                embeds = embeds.scatter(1, rows[..., None].expand(-1, -1, embeds.shape[-1]), feats.to(embeds.dtype))
        return PrefillInputs(input_ids=host.input_ids, embeds=embeds, attention_mask=host.attention_mask,
                             positions=host.positions, visual_start=host.visual_start, num_visual=host.num_visual,
                             next_positions=host.next_positions, visual_tokens=tokens, visual_shortfall=shortfall)

    @abc.abstractmethod
    def eager_vision(self, loaded: LoadedModel, pixel_values: torch.Tensor, bucket: tuple[int, int]) -> torch.Tensor:
        """The model's own vision tower for one image of the bucket -> [N, D]."""

    def eager_vision_cut(self, loaded: LoadedModel, pixel_values: torch.Tensor, bucket: tuple[int, int], cut,
                         force: torch.Tensor | None = None):
        """The tower with a vision cut -> (features [K, D], kept token indices [K], shortfall); graphs/vision_cut.py.
        `force` [K]: keep these tokens instead, and say how far they are from a set the rule could pick."""
        self.check_vision_cut(loaded.config, cut)

    def tower_blocks(self, loaded: LoadedModel) -> tuple[list, list[int]] | None:
        """The vision tower's blocks (whose outputs calibration's tower TME reads) and the ones a vision cut may
        follow; None where the backbone has no vision cut."""
        return None

    def check_vision_cut(self, config, cut) -> None:
        """One line where this model's tower cannot make `cut` (before anything is loaded or written)."""
        raise BadInput(f"{self.name} has no vision cut yet; drop the cut, or use a backbone that has one")

    def vision_batch(self, loaded: LoadedModel, pixel_values: list, bucket: tuple[int, int]) -> torch.Tensor:
        """The vision tower over a batch of one bucket -> [B, N, D], with gradients (training). Adapters whose tower
        takes a batch in one call override this; the default runs eager_vision per image."""
        return torch.stack([self.eager_vision(loaded, px, bucket) for px in pixel_values])

    @abc.abstractmethod
    def text_stack(self, loaded: LoadedModel) -> TextStack:
        ...

    def tokenize_prompts(self, tokenizer, images: list, prompts: list[str], placeholder: str, count: int,
                         image_token_id: int, add_special_tokens: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Chat template per prompt (an image part where there is an image), the template's image placeholder
        expanded to `count` tokens as the processors do, the user's text tokenised as text (never as control or
        image tokens: host/prompts.py), then one left-padded batch -> (input_ids, attention_mask) [B, S]."""
        from .prompts import tokenize_prompts

        return tokenize_prompts(tokenizer, images, prompts, placeholder, count, image_token_id, add_special_tokens)

    def decode_text(self, loaded: LoadedModel, token_ids: list[int]) -> str:
        return loaded.tokenizer.decode(token_ids, skip_special_tokens=True)

    def eos_token_ids(self, loaded: LoadedModel) -> set[int]:
        eos = loaded.tokenizer.eos_token_id
        return {eos} if eos is not None else set()


ADAPTERS: dict[str, type[BackboneAdapter]] = {}


def register(cls: type[BackboneAdapter]) -> type[BackboneAdapter]:
    ADAPTERS[cls.name] = cls
    return cls


def _register_builtin() -> None:
    from . import llava, qwen2_5_vl  # noqa: F401  (each registers itself)


def get_adapter(name: str) -> BackboneAdapter:
    _register_builtin()

    if name not in ADAPTERS:
        raise BadInput(f"unknown backbone '{name}'; choose one of: {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[name]()


def adapter_for_model_type(model_type: str) -> BackboneAdapter | None:
    _register_builtin()

    for cls in ADAPTERS.values():
        if model_type in cls.model_types:
            return cls()
    return None


def visual_span(input_ids: torch.Tensor, image_token_id: int) -> tuple[torch.Tensor, int]:
    """host.inputs.visual_span over torch ids: (first visual row [B] int64, N)."""
    start, n = host_visual_span(input_ids.numpy(), image_token_id)
    return torch.from_numpy(start), n


def grid_boxes(bucket: tuple[int, int], rows: int, cols: int) -> list[tuple[int, int, int, int]]:
    """Row-major boxes of a rows x cols token grid laid over a bucket-sized image."""
    h, w = bucket
    return [(round(r * h / rows), round(c * w / cols), round((r + 1) * h / rows), round((c + 1) * w / cols))
            for r in range(rows) for c in range(cols)]
