"""Export-friendly forwards: the same HalfV prefill as graphs/halfv.py, written as one traceable nn.Module with
explicit tensors in and out (no cache objects, no Python-side state), plus the decode step and a per-bucket
vision encoder. Static per bucket: N, K1, A, K2. Dynamic: batch, prompt length, past length.

Attention is written out (matmul, additive mask, fp32 softmax, matmul) so the graph needs nothing but plain ONNX
ops; the pruning stages are TopK / ArgMax / Gather (graphs/pruning.py).
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter import TextStack
from .halfv import additive_mask
from .pruning import PruneSchedule, apply_rope, budgets, gather_rows, keep_index, select_before_layer, visual_rows
from ..base.kinds import SSRMode


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, q, hd], k/v [B, G, kv, hd], mask [B, 1, q, kv] additive -> [B, q, H*hd]."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    weights = (q @ k.transpose(-1, -2)) * scale + mask  # [B, H, q, kv]
    out = weights.float().softmax(dim=-1).to(v.dtype) @ v  # [B, H, q, hd]
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class CausalSelfAttention(nn.Module):
    """attend() for rows that attend causally to themselves (prefill decoder layers; the mask is causal). A module
    only so that torch.onnx names it on every node it emits (node metadata pkg.torch.onnx.class_hierarchy): the
    ONNX Runtime engine stage fuses exactly these sites into its causal attention kernel (engines/ort_fusion.py)."""

    def forward(self, q, k, v, mask, scale: float):
        return attend(q, k, v, mask, scale)


def decoder_layer(stack: TextStack, layer, h, cos, sin, mask, past_k=None, past_v=None, attention=attend):
    """One decoder layer read through stack.maths. h [B, q, D] -> (h, k, v) with k/v [B, G, past+q, hd] (RoPE
    applied). `attention` is attend or a CausalSelfAttention module (same maths, marked for the engine stage)."""
    maths = stack.maths
    x = maths.input_norm(layer, h)
    q, k, v = stack.queries(layer, x), stack.keys(layer, x), stack.values(layer, x)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if past_k is not None:
        k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
    h = h + maths.output(layer, attention(q, k, v, mask, stack.head_dim ** -0.5))
    h = h + maths.mlp(layer, h)
    return h, k, v


def frozen_decoder_layer(stack: TextStack, layer, h, cos, sin, key_valid, start, n):
    """SSR freeze: the n visual rows [s, s+n) compute keys/values only; queries, attention output and MLP run on
    the other rows. h [B, S, D] -> (h, k, v); the visual rows of h come back unchanged."""
    b, seq, _ = h.shape
    maths = stack.maths
    text = keep_index(start, torch.zeros((b, 0), dtype=torch.long), n, seq)  # [B, S-n] non-visual rows
    x = maths.input_norm(layer, h)  # [B, S, D]: K/V for every row
    k, v = apply_rope(stack.keys(layer, x), cos, sin), stack.values(layer, x)
    q = stack.queries(layer, gather_rows(x, text))  # [B, H, S-n, hd]
    q = apply_rope(q, gather_rows(cos, text), gather_rows(sin, text))
    mask = gather_rows(additive_mask(key_valid, seq, h.dtype)[:, 0], text)[:, None]  # [B, 1, S-n, S]
    ht = gather_rows(h, text)
    ht = ht + maths.output(layer, attend(q, k, v, mask, stack.head_dim ** -0.5))
    ht = ht + maths.mlp(layer, ht)
    # reassemble: row j < s -> ht[j]; s <= j < s+n -> h[j] (frozen); j >= s+n -> ht[j-n]
    j = torch.arange(seq)[None, :]
    s = start[:, None]
    is_visual = (j >= s) & (j < s + n)
    from_text = torch.where(j >= s + n, j - n, j).clamp(max=seq - n - 1)
    h = torch.where(is_visual[..., None], h, gather_rows(ht, from_text))
    return h, k, v


class PrefillGraph(nn.Module):
    """Prefill for one bucket (N visual tokens per sample; N = 0 for text-only).

    inputs:  embeds [B, S, D], attention_mask [B, S] int64, positions [P, B, S] int64, visual_start [B] int64
    outputs: logits [B, V], kept_ivr [B, K1], kept_ssr [B, K2] (original visual numbering; absent when unpruned),
             then present_key_i / present_value_i [B, G, len_i, hd] for every layer, and cache_valid_g [B, len_g]
             for each length group g (which cached rows are real, not padding)."""

    def __init__(self, stack: TextStack, schedule: PruneSchedule | None, num_visual: int):
        super().__init__()
        self.stack = stack
        self.layers = nn.ModuleList(stack.layers)
        self.norm, self.lm_head, self.rotary_emb = stack.norm, stack.lm_head, stack.rotary_emb
        self.schedule = schedule if num_visual > 0 else None
        self.n = num_visual
        self.plan = budgets(num_visual, schedule) if self.schedule is not None else None
        self.causal_attention = CausalSelfAttention()

    def group_of_layer(self) -> list[int]:
        """Cache length group per layer: 0 before L1, 1 from L1, 2 from L2 (topk). One group when unpruned."""
        if self.schedule is None:
            return [0] * len(self.layers)
        return self.schedule.cache_groups(len(self.layers))

    def output_names(self) -> list[str]:
        names = ["logits"] + (["kept_ivr", "kept_ssr"] if self.schedule is not None else [])
        for i in range(len(self.layers)):
            names += [f"present_key_{i}", f"present_value_{i}"]
        return names + [f"cache_valid_{g}" for g in sorted(set(self.group_of_layer()))]

    def forward(self, embeds, attention_mask, positions, visual_start):
        st, sched, plan = self.stack, self.schedule, self.plan
        h, valid, start, n = embeds, attention_mask, visual_start, self.n
        cos, sin = st.rotary(h, positions)  # [B, S, hd]
        original = visual_rows(torch.zeros_like(start), n)  # [B, N]
        kept, presents, valids = [], [], {}
        prev_input = h
        for i, layer in enumerate(self.layers):
            selected = None if sched is None else select_before_layer(st, sched, plan, i, prev_input, h, start, n,
                                                                      cos, sin, exporting=True)
            if selected is not None:
                index = keep_index(start, selected, n, h.shape[1])  # [B, S - n + K]
                h, cos, sin, valid = (gather_rows(t, index) for t in (h, cos, sin, valid))
                original = original.gather(1, selected)
                kept.append(original)
                n = selected.shape[1]
            prev_input = h
            if sched is not None and sched.ssr_mode == SSRMode.FREEZE and i >= sched.ssr_layer:
                h, k, v = frozen_decoder_layer(st, layer, h, cos, sin, valid, start, n)
            else:
                h, k, v = decoder_layer(st, layer, h, cos, sin, additive_mask(valid, h.shape[1], h.dtype),
                                        attention=self.causal_attention)
            presents += [k, v]
            valids[self.group_of_layer()[i]] = valid
        if sched is not None and sched.ssr_mode == SSRMode.FREEZE:
            kept.append(original)
        logits = self.lm_head(self.norm(h[:, -1]))  # [B, V]
        return (logits, *kept, *presents, *[valids[g] for g in sorted(valids)])


class DecodeGraph(nn.Module):
    """One greedy step over the pruned cache.

    inputs:  input_ids [B, 1], positions [P, B, 1], cache_valid_g [B, len_g] (g per group, the new token's 1
             appended by the caller), past_key_i / past_value_i [B, G, len_i, hd]
    outputs: logits [B, V], present_key_i / present_value_i [B, G, len_i + 1, hd]"""

    def __init__(self, stack: TextStack, groups: list[int]):
        super().__init__()
        self.stack = stack
        self.layers = nn.ModuleList(stack.layers)
        self.norm, self.lm_head, self.rotary_emb = stack.norm, stack.lm_head, stack.rotary_emb
        self.embed_tokens = stack.embed_tokens
        self.groups = groups

    def input_names(self) -> list[str]:
        names = ["input_ids", "positions"] + [f"cache_valid_{g}" for g in sorted(set(self.groups))]
        for i in range(len(self.layers)):
            names += [f"past_key_{i}", f"past_value_{i}"]
        return names

    def output_names(self) -> list[str]:
        return ["logits"] + [f"present_{kind}_{i}" for i in range(len(self.layers)) for kind in ("key", "value")]

    def forward(self, input_ids, positions, *rest):
        n_groups = len(set(self.groups))
        valids, past = rest[:n_groups], rest[n_groups:]
        h = self.embed_tokens(input_ids)  # [B, 1, D]
        cos, sin = self.stack.rotary(h, positions)
        presents = []
        for i, layer in enumerate(self.layers):
            mask = additive_mask(valids[self.groups[i]], 1, h.dtype)  # [B, 1, 1, len+1]
            h, k, v = decoder_layer(self.stack, layer, h, cos, sin, mask, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        return (self.lm_head(self.norm(h[:, -1])), *presents)


class SelectionGraph(nn.Module):
    """The HalfV selection work alone, as it runs inside the prefill graph (for measuring its share), on the same
    states the prefill's two cuts read:

        IVR  scores(layer L1-1 on h_prev, no RoPE) + top-A anchors + farthest-point fill on final-norm(h)
             -> gather h, cos, sin, valid                                                [B, S1 = S - N + K1, ...]
        SSR  (topk) scores(layer L2-1 on h_ssr_prev, RoPE at the IVR-kept rows' cos/sin) + top-K2
             -> gather h_ssr, cos, sin, valid                                            [B, S2 = S - N + K2, ...]

    h_ssr_prev / h_ssr are the inputs of layers L2-1 and L2 of the IVR-compacted sequence (in the prefill, the
    output of layers L1 .. L2-2 / L2-1); the decoder layers between the cuts are not part of the selection work.

    inputs:  h_prev, h [B, S, D] (inputs of layers L1-1 and L1), cos, sin [B, S, hd], valid [B, S], start [B], and
             in topk mode h_ssr_prev, h_ssr [B, S1, D]
    outputs: topk:   h_ivr_out [B, S1, D] (what layer L1 runs on), h_out, cos_out, sin_out, valid_out [B, S2, ...],
                     kept_ivr [B, K1], kept_ssr [B, K2] (original visual numbering, as PrefillGraph's)
             freeze: h_out, cos_out, sin_out, valid_out [B, S1, ...], kept_ivr [B, K1]"""

    def __init__(self, stack: TextStack, schedule: PruneSchedule, n: int):
        super().__init__()
        self.stack, self.schedule, self.n = stack, schedule, n
        self.layers, self.norm = nn.ModuleList(stack.layers), stack.norm
        self.plan = budgets(n, schedule)

    @property
    def topk(self) -> bool:
        return self.schedule.ssr_mode == SSRMode.TOPK

    def input_names(self) -> list[str]:
        return ["h_prev", "h", "cos", "sin", "valid", "start"] + (["h_ssr_prev", "h_ssr"] if self.topk else [])

    def output_names(self) -> list[str]:
        if self.topk:
            return ["h_ivr_out", "h_out", "cos_out", "sin_out", "valid_out", "kept_ivr", "kept_ssr"]
        return ["h_out", "cos_out", "sin_out", "valid_out", "kept_ivr"]

    def forward(self, h_prev, h, cos, sin, valid, start, h_ssr_prev=None, h_ssr=None):
        st, sched, plan = self.stack, self.schedule, self.plan
        sel = select_before_layer(st, sched, plan, sched.ivr_layer, h_prev, h, start, self.n, cos, sin, True)
        index = keep_index(start, sel, self.n, h.shape[1])  # [B, S1]
        h, cos, sin, valid = (gather_rows(t, index) for t in (h, cos, sin, valid))
        if not self.topk:
            return h, cos, sin, valid, sel
        # SSR: scored on layer L2-1's input of the compacted sequence (not on h, the input of L1), as the prefill does
        sel2 = select_before_layer(st, sched, plan, sched.ssr_layer, h_ssr_prev, h_ssr, start, plan.k1, cos, sin, True)
        index = keep_index(start, sel2, plan.k1, h_ssr.shape[1])  # [B, S2]
        h_ssr, cos, sin, valid = (gather_rows(t, index) for t in (h_ssr, cos, sin, valid))
        return h, h_ssr, cos, sin, valid, sel, sel.gather(1, sel2)
