"""Calibration: run samples through the unpruned eager model, measure the per-layer probes, derive the schedule.

Probes (method §2), averaged over samples (NaNs skipped):
  - TME H1 (k = 50, nats) of the L+1 hidden states (input of each layer, then the last output), each after the
    model's final RMSNorm, for the visual rows, the text rows and the whole sequence;
  - the visual-update KL probe: for each layer i, the prefill is re-run with the visual rows' attention and MLP
    updates zeroed at layer i only; KL(p_i || p_full) of the last-token distribution.

Rules (each value records which one chose it in schedule.json["chosen_by"]):
  L1   end of stage I: the peak of the visual TME curve over the shallow quarter, points 1..max(1, L//4)
       (stage I is flat or rising, stage II falls; IVR goes where the fall starts).
  L2   start of stage III: the minimum of the visual TME curve over points L1+1..L-2 (stage III keeps >= 2 layers).
  Each pick must be a turn of the whole curve, not an edge of its window: the peak must be followed by a fall
  (point L1+1 lower), the minimum preceded by a fall and followed by a rise. Otherwise the curve has no such stage
  boundary where the rule looks, and the layer is the paper's. Without this check a curve that still rises through
  the shallow quarter (every trained 8-layer default: stage I outlasts two layers) made the window's last point
  the "peak", so L1 was set by the window's size, not by the model (README, Calibration: the grid of schedules).
  mode the SSR cut that stays closer to the unpruned model: with L1, L2, rho, alpha, sigma fixed, the prefill is
       run once with SSR = topk and once with SSR = freeze on every calibration sample; the mode with the lower
       mean last-token KL to the unpruned prefill is kept (a tie keeps the paper's mode). The per-layer KL curve
       above is the paper's Fig. 2(d) picture and is still plotted, but its level does not transfer to a shallow
       model: on the trained 8-layer defaults the deep single-layer KLs are 1e-3..1e-2 for LLaVA (median 4.6e-3)
       and for Qwen (2.1e-3), so the paper's cue (LLaVA ~1e-5, Qwen ~1e-2) cannot tell them apart, and the
       threshold rule it implied (median < 10^-3.5 -> freeze) picked topk on LLaVA-1.5, where freeze keeps 0.61 of
       0.66 answers and topk 0.40 at nearly the same FLOPs (README, Calibration).
  alpha the share of the IVR budget given to attention anchors (the rest is the farthest-point fill) that stays
       closest to the unpruned model: with L1, L2, rho and the paper's SSR mode fixed, the prefill runs once per
       alpha in ANCHOR_PROBE (0.1, 0.25, 0.5 and the paper's) on every calibration sample; the lowest mean last-token KL wins
       (a tie keeps the paper's). The paper's 0.1 suits natural images; where content is a small part of a
       redundant page, the fill spends the budget on background diversity (ruled lines, grain, marks) and misses
       the content that attention finds (docs/accuracy.md, the page task). Runs before the SSR mode probe.
  rho, sigma: the paper's values for the backbone. Any field can be overridden from the CLI.
A rule that cannot apply (too shallow a model, NaN curves) falls back to the paper's value at the same relative depth.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterable

import numpy as np
import torch

from ..graphs.adapter import BackboneAdapter, LoadedModel
from ..graphs.halfv import HalfVReference
from ..graphs.tme import DEFAULT_K, kl_last_token, truncated_entropy
from ..base.data import Sample
from ..graphs.pruning import PruneSchedule
from .schedule import DEFAULT_SSR_RATIO, FIELDS, MOVED, ChosenBy, Choice, apply_overrides, check_values
from ..base.kinds import SSRMode

def measure_probes(adapter: BackboneAdapter, loaded: LoadedModel, samples: list[Sample], k: int = DEFAULT_K,
                   kl_probe: bool = True, progress: Callable[[Iterable], Iterable] = iter,
                   keep_inputs: list | None = None) -> dict:
    """Per-layer curves averaged over samples: {"visual", "text", "whole": [L+1], "kl_visual_update": [L]}; and,
    beyond the paper, "tower": the TME of the vision tower's token rows after each block, with "tower_cut_blocks"
    (the blocks a vision cut may follow), where the backbone has a vision cut (else None).
    keep_inputs, when a list, receives each sample's prefill inputs (the vision tower's output: the SSR mode probe
    reuses them rather than run the tower again)."""
    stack = adapter.text_stack(loaded)
    depth = stack.num_layers
    reference = HalfVReference(stack, None)
    per_sample = {"visual": [], "text": [], "whole": [], "kl_visual_update": [], "tower": []}
    tower = adapter.tower_blocks(loaded)
    for sample in progress(samples):
        with tower_entropy(tower[0] if tower and sample.image is not None else [], k) as entropies:
            inputs = adapter.prepare(loaded, [sample.image], [sample.prompt])
        if entropies:  # beyond the paper: the tower's token redundancy per block, for the vision cut
            per_sample["tower"].append(entropies)
        if keep_inputs is not None:
            keep_inputs.append(inputs)
        captured: list = []
        full = reference.prefill(inputs, capture=captured)
        s, n = int(inputs.visual_start[0]), inputs.num_visual
        rows = {"visual": [], "text": [], "whole": []}
        with torch.no_grad():
            for h, _, _ in captured:
                z = stack.norm(h)[0]  # [S, D] batch of one, no padding
                rows["visual"].append(truncated_entropy(z[s:s + n], k) if n > 1 else math.nan)
                rows["text"].append(truncated_entropy(torch.cat([z[:s], z[s + n:]]), k))
                rows["whole"].append(truncated_entropy(z, k))
        for key, values in rows.items():
            per_sample[key].append(values)
        if kl_probe and n > 0:
            kl = [float(kl_last_token(reference.prefill(inputs, freeze_layers=frozenset({i})).logits, full.logits)[0])
                  for i in range(depth)]
            per_sample["kl_visual_update"].append(kl)
    curves = {"tower_cut_blocks": tower[1] if tower else None}
    for key, table in per_sample.items():
        if table:
            with np.errstate(all="ignore"):
                mean = np.nanmean(np.array(table, dtype=np.float64), axis=0)
            curves[key] = [None if not np.isfinite(v) else float(v) for v in mean]
        else:
            curves[key] = None
    return curves


@contextlib.contextmanager
def tower_entropy(blocks: list, k: int):
    """The TME of each block's output rows (the patch rows [P, C], or CLIP's [1 + P, C]) while the tower runs, taken
    as each block finishes so that no block's activations are kept (32 of them at 896x896 would be 0.7 GB)."""
    entropies: list = []

    def measure(module, inputs, out):
        h = out[0] if isinstance(out, tuple) else out
        entropies.append(truncated_entropy(h.detach().reshape(-1, h.shape[-1]), k))

    hooks = [b.register_forward_hook(measure) for b in blocks]
    try:
        yield entropies
    finally:
        for h in hooks:
            h.remove()


def derive_schedule(curves: dict | None, depth: int, adapter: BackboneAdapter, overrides: dict,
                    use_rules: bool = True) -> tuple[dict, dict[str, Choice]]:
    """Apply the rules to the curves -> (the six schedule values, which rule chose each)."""
    paper = adapter.paper.at_depth(depth)
    paper_note = adapter.paper.reference_model + (
        "" if depth == adapter.paper.reference_depth else f" (layers scaled {adapter.paper.reference_depth}->{depth})")
    values = dict(paper)
    chosen = {key: Choice(ChosenBy.PAPER, paper_note) for key in FIELDS}
    visual = (curves or {}).get("visual")

    if use_rules and visual and depth >= 4 and all(v is not None for v in visual):
        shallow = range(1, min(max(1, depth // 4), depth - 2) + 1)
        peak = max(shallow, key=lambda i: (visual[i], -i))
        if visual[peak + 1] < visual[peak]:
            values["ivr_layer"] = peak
            chosen["ivr_layer"] = Choice(ChosenBy.RULE,
                                         f"peak of visual TME over points 1..{shallow[-1]} (end of stage I)")
        else:
            chosen["ivr_layer"] = Choice(ChosenBy.PAPER, paper_note,
                                         unplaced=f"peak of visual TME over points 1..{shallow[-1]}: it still rises "
                                                  f"at point {peak + 1} (stage I outlasts the window)")
        deep = range(values["ivr_layer"] + 1, depth - 1)
        if len(deep):
            low = min(deep, key=lambda i: (visual[i], i))
            window = f"minimum of visual TME over points {deep[0]}..{deep[-1]}"
            if visual[low - 1] > visual[low] < visual[low + 1]:
                values["ssr_layer"] = low
                chosen["ssr_layer"] = Choice(ChosenBy.RULE, f"{window} (start of stage III)")
            else:
                chosen["ssr_layer"] = Choice(ChosenBy.PAPER, paper_note,
                                             unplaced=f"{window}: the lowest, point {low}, is on a slope (no stage "
                                                      "III found)")
        if values["ssr_layer"] <= values["ivr_layer"]:  # a paper L2 at or above a deeper rule-chosen L1
            values["ssr_layer"] = min(values["ivr_layer"] + 1, depth - 1)
            old = chosen["ssr_layer"]
            chosen["ssr_layer"] = Choice(old.by, old.why + MOVED, old.unplaced)
    chosen.update(apply_overrides(values, overrides))
    check_values(values, depth, where="calibrated schedule")
    return values, chosen


def measure_ssr_modes(stack, inputs: list, values: dict, progress: Callable[[Iterable], Iterable] = iter) -> dict | None:
    """{"topk": {"kl_mean", "top1_agreement"}, "freeze": {...}}: the calibrated schedule with each SSR mode against
    the unpruned model over the prefill `inputs` (batches of one, as measure_probes keeps them; None when none has
    visual tokens). topk uses the schedule's sigma, or HalfV's."""
    from .search import evaluate_fidelity  # the search's scorer: the same HalfVReference prefill, shared prefixes

    inputs = [x for x in inputs if x.num_visual > 0]
    if not inputs:
        return None
    base = {k: values[k] for k in ("ivr_layer", "keep_ratio", "anchor_ratio", "ssr_layer")}
    modes = {SSRMode.TOPK: PruneSchedule(**base, ssr_mode=SSRMode.TOPK,
                                         ssr_ratio=values["ssr_ratio"] or DEFAULT_SSR_RATIO),
             SSRMode.FREEZE: PruneSchedule(**base, ssr_mode=SSRMode.FREEZE, ssr_ratio=None)}
    scores = evaluate_fidelity(stack, inputs, list(modes.values()), progress)
    return {mode: score for mode, score in zip(modes, scores)}


# anchor ratios the alpha rule compares (the paper's is always added). Never 1.0: all anchors and no farthest-point
# fill is the attention-only pruner (validate's FastV-like baseline), not HalfV; on the LLaVA-1.5 default KL chose it
# and it scored 0.580 of 200 answers against the paper's 0.2 at 0.640
ANCHOR_PROBE = (0.1, 0.25, 0.5)


def measure_anchor_ratios(stack, inputs: list, values: dict, progress: Callable[[Iterable], Iterable] = iter
                          ) -> dict | None:
    """{alpha: {"kl_mean", "top1_agreement"}} of the calibrated schedule at each anchor ratio of ANCHOR_PROBE plus
    the schedule's own, against the unpruned model (None when no input has visual tokens)."""
    from .search import evaluate_fidelity

    inputs = [x for x in inputs if x.num_visual > 0]
    if not inputs:
        return None
    ratios = sorted(set(ANCHOR_PROBE) | {values["anchor_ratio"]})
    base = {k: v for k, v in values.items() if k != "anchor_ratio"}
    scores = evaluate_fidelity(stack, inputs, [PruneSchedule(**base, anchor_ratio=a) for a in ratios], progress)
    return {str(a): score for a, score in zip(ratios, scores)}


def choose_anchor_ratio(values: dict, chosen: dict[str, Choice], probe: dict | None, overrides: dict) -> None:
    """Keep the anchor ratio with the lowest mean KL, in place; a tie keeps the one `values` holds (the paper's).
    A CLI --anchor-ratio is the user's choice."""
    if probe is None or overrides.get("anchor_ratio") is not None:
        return
    kl = {float(a): score["kl_mean"] for a, score in probe.items()}
    best = min(kl, key=lambda a: (kl[a], a != values["anchor_ratio"]))
    if kl[best] < kl[values["anchor_ratio"]]:
        values["anchor_ratio"] = best
    chosen["anchor_ratio"] = Choice(ChosenBy.RULE, "the anchor share closest to the unpruned model, mean last-token "
                                    "KL " + ", ".join(f"{a:g}: {v:.3g}" for a, v in sorted(kl.items())))


def choose_ssr_mode(values: dict, chosen: dict[str, Choice], probe: dict | None, overrides: dict) -> None:
    """Keep the SSR mode with the lower mean KL, in place; a tie keeps the mode `values` holds (the paper's: no
    other rule sets it). Then sigma is settled for it as the schedule's other rules do (apply_overrides). A CLI
    --ssr-mode is the user's choice; a CLI --ssr-ratio is the sigma the topk side was probed (and kept) with."""
    if probe is None or overrides.get("ssr_mode") is not None:
        return
    kl = {mode: probe[mode]["kl_mean"] for mode in probe}
    other = SSRMode.FREEZE if values["ssr_mode"] == SSRMode.TOPK else SSRMode.TOPK
    if kl[other] < kl[values["ssr_mode"]]:
        values["ssr_mode"] = other
    chosen["ssr_mode"] = Choice(ChosenBy.RULE, f"the SSR cut closer to the unpruned model, mean last-token KL "
                                              f"topk {kl[SSRMode.TOPK]:.3g} vs freeze {kl[SSRMode.FREEZE]:.3g}")
    chosen.update(apply_overrides(values, overrides))
