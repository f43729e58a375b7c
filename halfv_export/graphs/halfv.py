"""The eager HalfV reference: the model's own decoder layers, driven layer by layer with the pruning stages
cut in (method §4-§6, §8 interpretation). Everything exported later is measured against this.

    h = embeddings                                     [B, S, D]
    for l in layers:
        if l == L1:  IVR   scores(layer L1-1 input, no RoPE) -> A anchors + FPS fill -> K1 rows    [B, S-N+K1, D]
        if l == L2:  SSR   topk:   scores(layer L2-1 input, RoPE) -> K2 rows                      [B, S-N+K2, D]
                           freeze: from here on the visual rows get no update, but stay keys/values
        h = layer(h)   (KV cache of layer l keeps exactly the rows layer l saw)
    logits = lm_head(norm(h[:, -1]))

Kept rows keep their original (M-)RoPE positions: cos/sin and positions are gathered with the same index.
Batches are left-padded and share N; selection is per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..base.errors import BadInput
from ..base.greedy import Greedy
from .adapter import PrefillInputs, TextStack
from .pruning import (Budgets, PruneSchedule, SingleCut, budgets, gather_rows, keep_index, relative_rows,
                      select_before_layer, select_single_cut, selection_inputs, selection_shortfall, stage_at,
                      visual_rows)
from ..base.kinds import SSRMode


def additive_mask(key_valid: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Causal + key-padding mask, [B, 1, q_len, kv_len] additive (0 = attend).

    key_valid [B, kv_len]; the q_len queries are the last q_len rows. A padding query attends to itself only,
    so no softmax row is empty."""
    b, kv = key_valid.shape
    q_rows = torch.arange(kv - q_len, kv, device=key_valid.device)[:, None]  # [q, 1]
    k_cols = torch.arange(kv, device=key_valid.device)[None, :]  # [1, kv]
    allowed = (k_cols <= q_rows)[None] & key_valid.bool()[:, None, :]  # [B, q, kv]
    allowed = allowed | (k_cols == q_rows)[None]
    return torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)[:, None]


@dataclass
class PrunedCache:
    """Per-layer K/V (lengths differ by layer group) plus which cached rows are real (not padding)."""

    kv: DynamicCache
    key_valid: list[torch.Tensor]  # per layer [B, len_l]
    next_positions: torch.Tensor  # [P, B] rope position of the next token

    def lengths(self) -> list[int]:
        return [v.shape[1] for v in self.key_valid]


@dataclass(frozen=True)
class Rows:
    """The prefill just before layer `layer` runs: every row tensor a later layer needs, already pruned by any
    stage that acted before it. prev_input is the input of layer - 1 (IVR / SSR scores read it)."""

    layer: int
    h: torch.Tensor  # [B, S', D]
    prev_input: torch.Tensor  # [B, S'', D]
    cos: torch.Tensor  # [B, S', hd]
    sin: torch.Tensor
    positions: torch.Tensor  # [P, B, S']
    valid: torch.Tensor  # [B, S'] real (not padding)
    start: torch.Tensor  # [B] first visual row
    n: int  # visual rows now
    n_input: int  # visual rows in the prompt (the schedule's budgets are fractions of it)
    original: torch.Tensor  # [B, n] original index of each visual row
    kept: dict  # stage -> [B, K] kept visual indices so far
    shortfall: dict = field(default_factory=dict)  # stage -> [B] of a forced selection (pruning.selection_shortfall)


@dataclass
class PrefillResult:
    logits: torch.Tensor  # [B, V] last-token logits
    cache: PrunedCache
    kept: dict[str, torch.Tensor] = field(default_factory=dict)  # stage -> [B, K] kept visual indices (original numbering)
    budgets: Budgets | None = None
    shortfall: dict[str, torch.Tensor] = field(default_factory=dict)  # stage -> [B], forced stages only


class HalfVReference:
    """Eager HalfV over a TextStack. `schedule=None` is the unpruned model (the fidelity baseline); `cut` (with no
    schedule) runs an ablation baseline instead: one selection at one layer (pruning.SingleCut), no second stage.

    The random baseline draws from `draws`, a stream seeded once (default: a new one from cut.seed) and never
    reseeded, so every image it prefills gets its own subset. A caller that scores a data set batch by batch passes
    one generator to every batch's reference: reseeding per prefill would give the b-th image of every batch the
    same subset."""

    def __init__(self, stack: TextStack, schedule: PruneSchedule | None = None, cut: SingleCut | None = None,
                 draws: torch.Generator | None = None):
        self.stack = stack
        self.schedule = schedule
        self.cut = cut
        self.draws = draws if draws is not None or cut is None else torch.Generator().manual_seed(cut.seed)
        if cut is not None:
            if schedule is not None:
                raise BadInput("pass either a HalfV schedule or a baseline cut, not both")
            if not 1 <= cut.layer < stack.num_layers:
                raise BadInput(f"baseline layer {cut.layer} must be in 1..{stack.num_layers - 1}")
        if schedule is not None:
            n_layers = stack.num_layers
            if not 1 <= schedule.ivr_layer < schedule.ssr_layer < n_layers:
                raise BadInput(
                    f"schedule needs 1 <= ivr_layer < ssr_layer < {n_layers} (the model's depth); got "
                    f"ivr_layer={schedule.ivr_layer}, ssr_layer={schedule.ssr_layer}"
                )

    # ------------------------------------------------------------------------------------------- prefill
    @torch.no_grad()
    def prefill(self, inputs: PrefillInputs, freeze_layers: frozenset[int] = frozenset(),
                capture: list | None = None, force: dict[str, torch.Tensor] | None = None) -> PrefillResult:
        """Prefill. `freeze_layers` zeroes the visual rows' updates at those layers (the calibration KL probe);
        `capture`, when a list, receives the L+1 hidden states (input of every layer, then the last output),
        each with the visual span as (start [B], N). `force` ({"ivr"/"ssr": [B, K] original indices}, e.g. an
        engine's) makes those stages keep the given rows instead of choosing; result.shortfall then says how far
        each forced set is from one the rule could have chosen (validate: near-ties)."""
        rows = self.begin(inputs)
        cache, key_valid = DynamicCache(), []
        rows = self.run(rows, freeze_layers=freeze_layers, capture=capture, cache=cache, key_valid=key_valid,
                        force=force)
        if capture is not None:
            capture.append((rows.h, rows.start, rows.n))
        kept = rows.kept
        if self.schedule is not None and rows.n_input > 0 and self.schedule.ssr_mode == SSRMode.FREEZE:
            kept = {**kept, "ssr": rows.original}
        return PrefillResult(logits=self.logits(rows), cache=PrunedCache(cache, key_valid, inputs.next_positions.clone()),
                             kept=kept, budgets=self.plan(rows.n_input), shortfall=rows.shortfall)

    def plan(self, n: int) -> Budgets | None:
        """This schedule's budgets for n visual tokens (None without a schedule or visual tokens)."""
        return budgets(n, self.schedule) if (self.schedule is not None and n > 0) else None

    def begin(self, inputs: PrefillInputs) -> Rows:
        """The rows before layer 0, after checking that the schedule or cut fits this N."""
        sched, n = self.schedule, inputs.num_visual
        plan = self.plan(n)
        if plan is not None and (plan.k1 < 1 or (sched.ssr_mode == SSRMode.TOPK and plan.k2 < 1)):
            raise BadInput(
                f"{n} visual tokens give K1={plan.k1}, K2={plan.k2} at keep_ratio={sched.keep_ratio}, "
                f"ssr_ratio={sched.ssr_ratio}; use a larger image or larger ratios"
            )
        if self.cut is not None and n > 0 and not 1 <= self.cut.keep <= n:
            raise BadInput(f"baseline keeps {self.cut.keep} of {n} visual tokens; choose 1..{n}")
        h = inputs.embeds  # [B, S, D]
        cos, sin = self.stack.rotary(h, inputs.positions)  # [B, S, hd] each
        start = inputs.visual_start
        return Rows(layer=0, h=h, prev_input=h, cos=cos, sin=sin, positions=inputs.positions,
                    valid=inputs.attention_mask, start=start, n=n, n_input=n,
                    original=visual_rows(torch.zeros_like(start), n), kept={})

    @torch.no_grad()
    def run(self, rows: Rows, stop: int | None = None, *, freeze_layers: frozenset[int] = frozenset(),
            capture: list | None = None, cache: DynamicCache | None = None, key_valid: list | None = None,
            snapshots: dict[int, Rows] | None = None, force: dict[str, torch.Tensor] | None = None) -> Rows:
        """Run layers rows.layer .. stop-1 (default: to the end) with this reference's schedule or cut, and return
        the rows before `stop`. `rows` is never modified, so one snapshot can be resumed under many schedules that
        agree on everything before it (the schedule search does that). `snapshots`, when a dict, receives the rows
        before every layer run; `cache` / `key_valid` collect each layer's K/V and which rows are real."""
        st, sched = self.stack, self.schedule
        stop = st.num_layers if stop is None else stop
        plan = self.plan(rows.n_input)
        cut = self.cut if rows.n_input > 0 else None
        h, prev_input, cos, sin, positions, valid = rows.h, rows.prev_input, rows.cos, rows.sin, rows.positions, rows.valid
        start, n, original, kept = rows.start, rows.n, rows.original, dict(rows.kept)
        shortfall = dict(rows.shortfall)

        for i in range(rows.layer, stop):
            if snapshots is not None:
                snapshots[i] = Rows(i, h, prev_input, cos, sin, positions, valid, start, n, rows.n_input, original,
                                    dict(kept), dict(shortfall))
            stage = stage_at(sched, i) if plan is not None else None
            if stage is not None and force is not None and stage in force:
                scores, features = selection_inputs(st, stage, i, prev_input, h, start, n, cos, sin)
                selected, present = relative_rows(original, force[stage].to(original.dtype))
                shortfall[stage] = torch.where(present, selection_shortfall(
                    scores, features, selected, plan.anchors if stage == "ivr" else 0), math.inf)
            elif plan is not None:
                selected = select_before_layer(st, sched, plan, i, prev_input, h, start, n, cos, sin)
            elif cut is not None:
                selected = select_single_cut(st, cut, i, prev_input, h, start, n, self.draws)
            else:
                selected = None
            if selected is not None:
                index = keep_index(start, selected, n, h.shape[1])  # [B, S - n + K]
                h, cos, sin, valid = (gather_rows(t, index) for t in (h, cos, sin, valid))
                positions = torch.stack([gather_rows(p, index) for p in positions])  # [P, B, S']
                original = original.gather(1, selected)
                kept["cut" if sched is None else "ivr" if i == sched.ivr_layer else "ssr"] = original
                n = selected.shape[1]

            frozen = (i in freeze_layers) or (plan is not None and sched.ssr_mode == SSRMode.FREEZE and i >= sched.ssr_layer)
            prev_input = h
            if capture is not None:
                capture.append((h, start, n))
            out = st.layers[i](h, attention_mask=additive_mask(valid, h.shape[1], h.dtype),
                               position_embeddings=(cos, sin), cache=cache, use_cache=cache is not None)
            if frozen and n > 0:
                # visual rows keep their input (no attention/MLP update); their K/V, computed above from that
                # same frozen input, still serve the text rows.
                is_visual = torch.zeros(h.shape[:2], dtype=torch.bool)
                is_visual.scatter_(1, visual_rows(start, n), True)
                out = torch.where(is_visual[..., None], h, out)
            h = out
            if key_valid is not None:
                key_valid.append(valid)
        return Rows(stop, h, prev_input, cos, sin, positions, valid, start, n, rows.n_input, original, kept,
                    shortfall)

    def logits(self, rows: Rows) -> torch.Tensor:
        """Last-token logits [B, V] from the rows after the last layer."""
        return self.stack.lm_head(self.stack.norm(rows.h[:, -1]))

    # ------------------------------------------------------------------------------------------- decode
    @torch.no_grad()
    def decode_step(self, tokens: torch.Tensor, cache: PrunedCache) -> torch.Tensor:
        """One greedy step: tokens [B] -> logits [B, V]. Every layer runs normally over its own (pruned) cache;
        the position continues from the unpruned prompt length (method §6: never renumber)."""
        st = self.stack
        h = st.embed_tokens(tokens[:, None])  # [B, 1, D]
        positions = cache.next_positions[..., None]  # [P, B, 1]
        cos, sin = st.rotary(h, positions)
        for i, layer in enumerate(st.layers):
            cache.key_valid[i] = torch.cat([cache.key_valid[i], torch.ones_like(tokens)[:, None]], dim=1)
            h = layer(h, attention_mask=additive_mask(cache.key_valid[i], 1, h.dtype), position_embeddings=(cos, sin),
                      cache=cache.kv, use_cache=True)
        cache.next_positions = cache.next_positions + 1
        return st.lm_head(st.norm(h[:, -1]))

    @torch.no_grad()
    def generate(self, inputs: PrefillInputs, max_new_tokens: int, eos_ids: set[int] = frozenset(),
                 force: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Greedy generation through the loop the runtimes share (base/greedy.py) -> [B, <= max_new_tokens]; a
        sample that hit EOS repeats it up to the longest answer. `force`: as in prefill."""
        result = self.prefill(inputs, force=force)
        if max_new_tokens < 1:
            return torch.zeros((result.logits.shape[0], 0), dtype=torch.long)
        stepper = EagerStepper(self, result.logits, result.cache)
        return torch.from_numpy(Greedy(stepper, [max_new_tokens] * result.logits.shape[0], eos_ids).run().tokens())


class EagerStepper:
    """base/greedy.py's Stepper over the eager reference: logits and the pruned cache stay torch tensors; rows
    that finish leave the cache (DynamicCache.batch_select_indices), as they leave the engines'."""

    def __init__(self, reference: HalfVReference, logits: torch.Tensor, cache: PrunedCache):
        self.reference, self.logits, self.cache = reference, logits, cache

    def argmax(self):
        return self.logits.argmax(dim=-1).numpy()

    def advance(self, tokens) -> None:
        self.logits = self.reference.decode_step(torch.as_tensor(tokens, dtype=torch.long), self.cache)

    def keep(self, positions: list[int]) -> None:
        index = torch.tensor(positions, dtype=torch.long)
        if positions:
            self.cache.kv.batch_select_indices(index)
        self.cache.key_valid = [v[index] for v in self.cache.key_valid]
        self.cache.next_positions = self.cache.next_positions[:, index]
        self.logits = self.logits[index]
