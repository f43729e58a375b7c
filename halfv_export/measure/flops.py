"""Analytic prefill FLOPs of the language model, full vs HalfV (method §10).

Convention (the one torch.utils.flop_counter uses, and FastV's): a matmul of [m, k] x [k, n] costs 2mkn; attention
is counted as the full q_rows x kv_rows rectangle (QKᵀ and AV); norms, RoPE, softmax and other elementwise work
are not counted. Per layer, for q_rows rows that compute queries / attention output / MLP and kv_rows rows that
compute keys and values:

    Q, O      2 * q_rows * d * (H*hd)        each
    K, V      2 * kv_rows * d * (G*hd)       each       (GQA: G kv heads)
    attention 2 * 2 * q_rows * kv_rows * H * hd
    MLP       3 * 2 * q_rows * d * m         (SwiGLU: gate, up, down; 2 matrices when not gated)

Full: every layer has q_rows = kv_rows = N + T. HalfV: N + T before L1, K1 + T from L1, then K2 + T from L2
(topk) or, in freeze mode, q_rows = T with kv_rows = K1 + T (frozen visual rows still pay K/V). The last-token
lm_head is included in both. The selection overhead (score projections and logits at L1-1 / L2-1, the N x N
similarity of the farthest-point fill, as pruning.similarity computes it) is reported separately and is not in the
ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..base.errors import BadInput
from ..graphs.pruning import PruneSchedule, budgets, similarity_flops
from ..base.kinds import SSRMode

# Library defaults for configs that leave them out (LLaVA's text_config omits Llama/Mistral defaults).
_TEXT_DEFAULTS = {
    "llama": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "mistral": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8},
}


@dataclass(frozen=True)
class LMShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated_mlp: bool = True

    @classmethod
    def from_config(cls, config: dict) -> "LMShape":
        """A HF config.json dict (VLM or text-only); text settings from text_config when present."""
        text = config.get("text_config") or config
        defaults = _TEXT_DEFAULTS.get(text.get("model_type", ""), {})

        def get(key, fallback=None):
            for source in (text, config):
                if source.get(key) is not None:
                    return source[key]
                if source.get(f"_default_{key}") is not None:
                    return source[f"_default_{key}"]
            if key in defaults:
                return defaults[key]
            if fallback is not None:
                return fallback
            raise BadInput(f"config has no '{key}'; pass a HF config.json of a decoder or VLM")

        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(hidden=hidden, intermediate=int(get("intermediate_size")), layers=int(get("num_hidden_layers")),
                   heads=heads, kv_heads=int(get("num_key_value_heads", heads)),
                   head_dim=int(get("head_dim", hidden // heads)), vocab=int(get("vocab_size")),
                   gated_mlp=str(get("hidden_act", "silu")) in ("silu", "swish"))


def layer_flops(shape: LMShape, q_rows: int, kv_rows: int) -> int:
    d, hd, h, g, m = shape.hidden, shape.head_dim, shape.heads, shape.kv_heads, shape.intermediate
    q_and_o = 2 * (2 * q_rows * d * h * hd)
    k_and_v = 2 * (2 * kv_rows * d * g * hd)
    attention = 2 * 2 * q_rows * kv_rows * h * hd
    mlp = (3 if shape.gated_mlp else 2) * 2 * q_rows * d * m
    return q_and_o + k_and_v + attention + mlp


def score_flops(shape: LMShape, n_keys: int) -> int:
    """One relevance-score pass: q_proj of the last row, k_proj of n_keys rows, the [H, 1, n_keys] logits."""
    d, hd = shape.hidden, shape.head_dim
    return 2 * d * shape.heads * hd + 2 * n_keys * d * shape.kv_heads * hd + 2 * shape.heads * hd * n_keys


@dataclass(frozen=True)
class PrefillFlops:
    visual: int
    text: int
    full: int
    halfv: int
    overhead: int  # selection work, not in `ratio`
    rows_per_layer: tuple[tuple[int, int], ...]  # HalfV (q_rows, kv_rows) per layer

    @property
    def ratio(self) -> float:
        return self.full / self.halfv

    @property
    def ratio_with_overhead(self) -> float:
        return self.full / (self.halfv + self.overhead)


def prefill_flops(shape: LMShape, n_visual: int, n_text: int, schedule: PruneSchedule | None) -> PrefillFlops:
    """FLOPs of one sample's prefill: n_visual visual rows and n_text other rows (template, prompt)."""
    lm_head = 2 * shape.hidden * shape.vocab
    rows = n_visual + n_text
    full = shape.layers * layer_flops(shape, rows, rows) + lm_head
    if schedule is None or n_visual == 0:
        per_layer = tuple((rows, rows) for _ in range(shape.layers))
        return PrefillFlops(n_visual, n_text, full, full, 0, per_layer)
    if not schedule.ssr_layer < shape.layers:
        raise BadInput(f"ssr_layer={schedule.ssr_layer} must be below the model's depth {shape.layers}")
    plan = budgets(n_visual, schedule)
    per_layer = []
    for i in range(shape.layers):
        if i < schedule.ivr_layer:
            per_layer.append((rows, rows))
        elif i < schedule.ssr_layer:
            per_layer.append((plan.k1 + n_text, plan.k1 + n_text))
        elif schedule.ssr_mode == SSRMode.FREEZE:
            per_layer.append((n_text, plan.k1 + n_text))
        else:
            per_layer.append((plan.k2 + n_text, plan.k2 + n_text))
    halfv = sum(layer_flops(shape, q, kv) for q, kv in per_layer) + lm_head
    overhead = score_flops(shape, n_visual) + similarity_flops(n_visual, shape.hidden)
    if schedule.ssr_mode == SSRMode.TOPK:
        overhead += score_flops(shape, plan.k1)
    return PrefillFlops(n_visual, n_text, full, halfv, overhead, tuple(per_layer))


def single_cut_flops(shape: LMShape, n_visual: int, n_text: int, layer: int, keep: int) -> int:
    """Prefill FLOPs of an ablation baseline that keeps `keep` visual rows from `layer` on (one cut, no SSR)."""
    rows = n_visual + n_text
    per_layer = [(rows, rows) if i < layer else (keep + n_text, keep + n_text) for i in range(shape.layers)]
    return sum(layer_flops(shape, q, kv) for q, kv in per_layer) + 2 * shape.hidden * shape.vocab


def matched_keep(shape: LMShape, n_visual: int, n_text: int, layer: int, budget: float) -> int:
    """The K in 1..N whose single-cut prefill FLOPs come closest to `budget` (ties: the smaller K), i.e. the
    baseline that spends what HalfV spends."""
    costs = [(abs(single_cut_flops(shape, n_visual, n_text, layer, k) - budget), k) for k in range(1, n_visual + 1)]
    return min(costs)[1]
