"""Schedule search under a speed budget: the HalfV schedule that loses least at a FLOPs ratio >= R.

The paper hand-sets (L1, rho, alpha, L2, SSR mode, sigma); a deployment starts from the other end ("3x faster,
lose the least"). The search, in four steps:

 1. Grid. L1 in the shallow quarter 1..max(2, L//4), rho in KEEP_RATIOS, alpha in ANCHOR_RATIOS, L2 in L1+1..L-1
    (each of L1, L2 at most MAX_LAYERS evenly spaced layers), mode topk (sigma in SSR_RATIOS) or freeze; any field
    given on the command line is held fixed.
 2. FLOPs pruning, before any model runs. A candidate must reach the target ratio (measure.flops, prefill or
    time-to-first-token) at the bucket's N and the calibration prompts' text length T. Candidates whose token
    budgets (K1, A, K2) coincide are the same computation and are run once. For one structure (L1, alpha, L2,
    mode) only the frontier of (rho, sigma) is kept: a candidate that keeps no more tokens than another feasible one
    at both stages is dropped. This assumes keeping more tokens never loses fidelity; it holds for the selections
    (a longer farthest-point fill extends a shorter one when the anchors agree, a larger top-K contains a smaller)
    and is an assumption, not a theorem, for the logits.
 3. A shared-prefix evaluation. Every candidate with the same (L1, K1, A) runs the same computation up to its SSR
    layer, and every candidate runs the unpruned model up to its L1. So per batch of samples: one unpruned pass
    (snapshots of the rows before every layer, and the reference logits), one pass per (L1, K1, A) from its L1
    to the last candidate L2 (snapshots again), one pass per candidate from its L2 to the end. The logits are
    exactly HalfVReference(schedule).prefill's (tested): the same layers on the same rows, only not repeated.
 4. Choice. Fidelity is KL(p_full || p_pruned) of the last-token distribution, averaged over samples, and top-1
    agreement with the unpruned model. The SHORTLIST candidates of lowest KL are then generated greedily when the
    samples carry answers, and the most accurate one wins (ties: lower KL); without answers the lowest KL wins.
    Accuracy only re-ranks a shortlist because a few dozen answers cannot tell hundreds of schedules apart.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch

from ..base.data import Sample
from ..base.errors import BadInput
from ..graphs.halfv import HalfVReference
from ..graphs.pruning import PruneSchedule, VisionCut, budgets
from ..graphs.tme import kl_last_token
from ..measure.accuracy import AccuracyTable, answer_budget, cut_at_eos
from ..measure.compare import bucket_batches
from ..measure.flops import LMShape, prefill_flops
from ..measure.vision_flops import bucket_grid, vision_flops
from .schedule import FIELDS, paper_schedule
from ..base.kinds import RATIO_KINDS, RatioKind, SSRMode

KEEP_RATIOS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.75)
ANCHOR_RATIOS = (0.1, 0.25, 0.5)
SSR_RATIOS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3)
VISION_KEEPS = (0.25, 0.5, 0.75)  # a joint search's vision cuts keep these shares of the tokens (beyond the paper)
SHORTLIST = 8
BATCH = 16
MAX_LAYERS = 12


@dataclass(frozen=True)
class Budget:
    """What a FLOPs ratio is measured at: N visual and T text tokens of the bucket, and the vision tower's FLOPs
    (ttft: time to first token = vision + LLM prefill; the tower is not pruned, so it only dilutes the ratio)."""

    kind: RatioKind
    bucket: tuple[int, int]
    n: int
    text: int
    vision: int  # FLOPs of the vision tower at the bucket, 0 for kind "prefill"
    cut_vision: tuple = ()  # ((VisionCut, the cut tower's FLOPs), ...): the cuts a joint search may pick

    def ratio(self, shape: LMShape, schedule: PruneSchedule, cut: VisionCut | None = None) -> float:
        """Unpruned (all N tokens, the whole tower) over HalfV (with a vision cut: the cut tower, the LLM on K)."""
        full = prefill_flops(shape, self.n, self.text, None).full
        halfv = prefill_flops(shape, self.n if cut is None else cut.tokens(self.n), self.text, schedule).halfv
        vision = self.vision if cut is None else dict(self.cut_vision)[cut]
        return (self.vision + full) / (vision + halfv)


def make_budget(kind: str, config: dict, shape: LMShape, bucket: tuple[int, int], n: int, text: int,
                cuts: list = ()) -> Budget:
    """`cuts`: vision cuts the search may pair with a schedule (a prefill ratio counts the LLM on the K tokens a
    cut keeps; a ttft ratio also the cut tower)."""
    if kind not in RATIO_KINDS:
        raise BadInput(f"--ratio-kind {kind!r}: use one of {', '.join(RATIO_KINDS)}")
    kind = RatioKind(kind)
    vision, cut_vision = 0, tuple((c, 0) for c in cuts if c is not None)
    if kind is RatioKind.TTFT:
        grid = bucket_grid(config, bucket, n)
        vision = vision_flops(config, shape.hidden, n, grid).total
        cut_vision = tuple((c, vision_flops(config, shape.hidden, n, grid, c).total) for c in cuts if c is not None)
    return Budget(kind, tuple(bucket), n, text, vision, cut_vision)


# ------------------------------------------------------------------------------------------------ the grid
def _values(fixed, grid):
    return (fixed,) if fixed is not None else grid


def spread(lo: int, hi: int, most: int = MAX_LAYERS) -> list[int]:
    """At most `most` layers from lo..hi, evenly spaced, both ends included."""
    if hi - lo + 1 <= most:
        return list(range(lo, hi + 1))
    return sorted({round(lo + i * (hi - lo) / (most - 1)) for i in range(most)})


def candidate_grid(depth: int, fixed: dict) -> list[PruneSchedule]:
    """Every schedule of the grid, with the fields in `fixed` (not None) held at their given value. L1 stays in
    the shallow quarter (IVR removes inherited redundancy early: method §3; 1..max(2, L//4)); L1 and L2 each take
    at most MAX_LAYERS evenly spaced layers, so a 28-layer model's grid stays the size of a small one's."""
    out = []
    for l1 in _values(fixed.get("ivr_layer"), spread(1, min(max(2, depth // 4), depth - 2))):
        for l2 in _values(fixed.get("ssr_layer"), spread(l1 + 1, depth - 1)):
            if not l1 < l2 < depth:
                continue
            for rho, alpha, mode in itertools.product(_values(fixed.get("keep_ratio"), KEEP_RATIOS),
                                                      _values(fixed.get("anchor_ratio"), ANCHOR_RATIOS),
                                                      _values(fixed.get("ssr_mode"), tuple(SSRMode))):
                sigmas = (None,) if mode == SSRMode.FREEZE else _values(fixed.get("ssr_ratio"), SSR_RATIOS)
                out += [PruneSchedule(l1, rho, alpha, l2, mode, sigma) for sigma in sigmas]
    return out


def tokens(schedule: PruneSchedule, n: int) -> tuple[int, int, int]:
    plan = budgets(n, schedule)
    return plan.k1, plan.anchors, plan.k2


def prune_grid(grid: list[PruneSchedule], shape: LMShape, budget: Budget, sample_ns: set[int],
               target: float, cut: VisionCut | None = None) -> tuple[list[tuple[PruneSchedule, float]], dict]:
    """Step 2 of the module docstring -> ([(schedule, ratio)] to run, counts for the log). With a vision cut the
    schedules act on the K = cut.tokens(N) tokens the cut keeps."""
    ns = sorted(sample_ns | {budget.n})
    if cut is not None:
        ns = [cut.tokens(n) for n in ns]
    feasible, seen, best = [], set(), 0.0
    for s in grid:
        budgets_per_n = tuple(tokens(s, n) for n in ns)
        if any(k1 < 1 or k2 < 1 for k1, _, k2 in budgets_per_n):
            continue  # an empty stage for some sample's N: not a schedule HalfV can run there
        ratio = budget.ratio(shape, s, cut)
        best = max(best, ratio)
        key = (s.ivr_layer, s.ssr_layer, s.ssr_mode, budgets_per_n)
        if ratio < target or key in seen:
            continue
        seen.add(key)
        feasible.append((s, ratio))
    structures: dict = {}  # (L1, alpha, L2, mode) -> [(K1, A, K2) at the bucket, schedule, ratio]
    n = budget.n if cut is None else cut.tokens(budget.n)
    for s, ratio in feasible:
        structures.setdefault((s.ivr_layer, s.anchor_ratio, s.ssr_layer, s.ssr_mode), []).append(
            (tokens(s, n), s, ratio))
    frontier = [(s, ratio) for members in structures.values() for t, s, ratio in members
                if not any(o[0] >= t[0] and o[2] >= t[2] and o != t for o, _, _ in members)]
    counts = {"grid": len(grid), "reach_target": len(feasible), "frontier": len(frontier),
              "best_reachable_ratio": round(best, 4)}
    return frontier, counts


# ------------------------------------------------------------------------------------------------ evaluation
def candidate_logits(stack, batches_inputs: list, schedules: list[PruneSchedule], progress: Callable = iter):
    """Step 3: yield (batch index, unpruned logits, schedule index, that schedule's logits) for every batch and
    schedule, with the shared prefixes run once. The logits equal HalfVReference(schedule).prefill's exactly."""
    depth = stack.num_layers
    full_ref = HalfVReference(stack, None)
    groups: dict = {}  # (L1, rho, alpha) -> [(index, schedule)]: the same rows up to each member's L2
    for i, s in enumerate(schedules):
        groups.setdefault((s.ivr_layer, s.keep_ratio, s.anchor_ratio), []).append((i, s))
    work = [(b, key) for b in range(len(batches_inputs)) for key in groups]
    current, full_snaps, full_logits = None, None, None
    for b, (l1, rho, alpha) in progress(work):
        if b != current:  # a new batch: its unpruned pass, with the rows before every layer kept
            current, full_snaps = b, {}
            full_logits = full_ref.logits(full_ref.run(full_ref.begin(batches_inputs[b]), snapshots=full_snaps))
        members = groups[(l1, rho, alpha)]
        last_l2 = max(s.ssr_layer for _, s in members)
        # SSR sits past the end of this run, so the rows before each L2 are the IVR-only ones every member shares
        prefix_ref = HalfVReference(stack, PruneSchedule(l1, rho, alpha, depth - 1, SSRMode.FREEZE, None))
        prefix_snaps: dict = {}
        prefix_snaps[last_l2] = prefix_ref.run(full_snaps[l1], stop=last_l2, snapshots=prefix_snaps)
        for i, s in members:
            ref = HalfVReference(stack, s)
            yield b, full_logits, i, ref.logits(ref.run(prefix_snaps[s.ssr_layer]))


def evaluate_fidelity(stack, batches_inputs: list, schedules: list[PruneSchedule],
                      progress: Callable = iter, reference: list | None = None) -> list[dict]:
    """Per schedule {"kl_mean", "top1_agreement"} against the unpruned model, over all samples. `reference`: the
    unpruned logits per batch where `batches_inputs` are not the unpruned model's prompt (a vision cut's rows)."""
    kls = [[] for _ in schedules]
    agree = [[] for _ in schedules]
    for b, full_logits, i, logits in candidate_logits(stack, batches_inputs, schedules, progress):
        full_logits = full_logits if reference is None else reference[b]
        kls[i] += kl_last_token(full_logits, logits).tolist()
        agree[i] += (logits.argmax(-1) == full_logits.argmax(-1)).tolist()
    return [{"kl_mean": float(np.mean(k)), "top1_agreement": float(np.mean(a))} for k, a in zip(kls, agree)]


def evaluate_accuracy(adapter, loaded, batches: list[list[Sample]], batches_inputs: list,
                      schedules: dict[str, PruneSchedule | None], progress: Callable = iter) -> dict[str, float | None]:
    """Greedy exact-match accuracy of each named schedule (None: the unpruned model) on the samples with answers."""
    stack, eos = adapter.text_stack(loaded), adapter.eos_token_ids(loaded)
    table = AccuracyTable()
    for batch, inputs in progress(list(zip(batches, batches_inputs))):
        if all(s.answer is None for s in batch):
            continue
        new_tokens = answer_budget(loaded.tokenizer, [s.answer for s in batch])
        for name, schedule in schedules.items():
            tokens_out = HalfVReference(stack, schedule).generate(inputs, new_tokens, eos).numpy()
            for b, sample in enumerate(batch):
                if sample.answer is not None:
                    table.add(name, sample.type, adapter.decode_text(loaded, cut_at_eos(tokens_out[b], eos)),
                              sample.answer, sample.name)
    return {name: table.accuracy(name) for name in schedules}


# ------------------------------------------------------------------------------------------------ the search
def mean_text_rows(batches_inputs: list) -> int:
    rows = [float((inp.attention_mask.sum(dim=1) - inp.num_visual).float().sum()) for inp in batches_inputs]
    count = sum(int(inp.attention_mask.shape[0]) for inp in batches_inputs)
    return int(round(sum(rows) / count))


@dataclass
class SearchPlan:
    """Steps 1-2, done before any model runs: the candidates that reach the target and what they are measured on."""

    target: float
    budget: Budget
    shape: LMShape
    fixed: dict
    batches: list  # [[Sample]] one bucket per batch
    batches_inputs: list  # PrefillInputs per batch (the uncut prompt)
    frontier: list  # [(PruneSchedule, ratio, VisionCut or None)]
    counts: dict
    cut_inputs: dict  # VisionCut -> PrefillInputs per batch with that cut (a joint search's cut candidates)


def vision_cut_grid(adapter, loaded, kind: str, cut: VisionCut | None) -> list:
    """The vision cuts a search pairs with the LLM schedules: the given one alone; else, for a time-to-first-token
    search on a backbone with a cut, none plus every cut-able block x VISION_KEEPS (beyond the paper); else none."""
    if cut is not None:
        return [cut]
    blocks = adapter.tower_blocks(loaded) if kind == RatioKind.TTFT else None
    return [None] + ([VisionCut(b, k) for b in blocks[1] for k in VISION_KEEPS] if blocks else [])


def plan_search(adapter, loaded, samples: list[Sample], target: float, kind: str, bucket: tuple[int, int],
                fixed: dict, cut: VisionCut | None = None) -> SearchPlan:
    """Tokenise the samples, build and prune the grid (for each vision cut of vision_cut_grid); refuse a target no
    schedule reaches, in one line."""
    from ..graphs.adapter import Processing

    config = loaded.config.to_dict()
    shape = LMShape.from_config(config)
    _, n_bucket = adapter.bucket_for(Processing(loaded.tokenizer, loaded.image_processor, loaded.config), bucket)
    batches = bucket_batches(adapter, loaded, samples, BATCH, needs="a schedule search")
    batches_inputs = [adapter.prepare(loaded, [s.image for s in b], [s.prompt for s in b]) for b in batches]
    cuts = vision_cut_grid(adapter, loaded, kind, cut)
    budget = make_budget(kind, config, shape, bucket, n_bucket, mean_text_rows(batches_inputs), cuts)
    grid = candidate_grid(adapter.text_stack(loaded).num_layers, fixed)
    frontier, counts = [], {"grid": 0, "reach_target": 0, "frontier": 0, "best_reachable_ratio": 0.0}
    for c in cuts:
        found, cut_counts = prune_grid(grid, shape, budget, {inp.num_visual for inp in batches_inputs}, target, c)
        frontier += [(s, ratio, c) for s, ratio in found]
        counts = {k: max(v, cut_counts[k]) if k == "best_reachable_ratio" else v + cut_counts[k]
                  for k, v in counts.items()}
    counts["vision_cuts"] = len(cuts)
    if not frontier:
        raise BadInput(f"no schedule reaches a {kind} FLOPs ratio of {target:g} at {describe_budget(budget)}: the "
                       f"most any schedule of the grid reaches is {counts['best_reachable_ratio']:.2f}; lower "
                       "--target-ratio, pick a larger --bucket, or free a field held by a schedule flag")
    used = {c for _, _, c in frontier if c is not None}
    cut_inputs = {c: [adapter.prepare(loaded, [s.image for s in b], [s.prompt for s in b], c) for b in batches]
                  for c in cuts if c in used}
    return SearchPlan(target, budget, shape, fixed, batches, batches_inputs, frontier, counts, cut_inputs)


def describe_budget(budget: Budget) -> str:
    return f"{budget.bucket[0]}x{budget.bucket[1]} (N={budget.n} visual, T={budget.text} text tokens)"


def run_search(adapter, loaded, plan: SearchPlan, references: dict[str, PruneSchedule],
               progress: Callable[[str], Callable] = None, log: Callable[[str], None] = lambda m: None
               ) -> tuple[dict, dict]:
    """Steps 3-4 -> (the chosen schedule's six values, the search record for schedule.json["search"]).

    `references` (e.g. the paper's and the rules' schedules) are evaluated beside the candidates, whatever their
    ratio, so the log shows what the search bought. `progress(description)` returns an iterable wrapper."""
    progress = progress or (lambda description: iter)
    started = time.perf_counter()
    stack, budget, shape, frontier = adapter.text_stack(loaded), plan.budget, plan.shape, plan.frontier
    samples = [s for b in plan.batches for s in b]
    log(f"search: {plan.counts['grid']} grid schedules, {plan.counts['reach_target']} reach {budget.kind} ratio >= "
        f"{plan.target:g} at {describe_budget(budget)}, {len(frontier)} on the token frontier")
    names = list(references)
    schedules = [s for s, _, _ in frontier] + [references[k] for k in names]
    cuts = [c for _, _, c in frontier] + [None] * len(names)
    fidelity = [None] * len(schedules)
    reference = None
    for c in dict.fromkeys(cuts):  # each vision cut's candidates on that cut's rows, against the uncut model
        members = [i for i, ci in enumerate(cuts) if ci == c]
        inputs = plan.batches_inputs if c is None else plan.cut_inputs[c]
        if c is not None and reference is None:
            full_ref = HalfVReference(stack, None)
            reference = [full_ref.prefill(inp).logits for inp in plan.batches_inputs]
        label = "search: fidelity" + ("" if c is None else f" (vision cut {c.block}:{c.keep})")
        for i, f in zip(members, evaluate_fidelity(stack, inputs, [schedules[i] for i in members], progress(label),
                                                   None if c is None else reference)):
            fidelity[i] = f
    entries = []
    for i, (s, c) in enumerate(zip(schedules, cuts)):
        n = budget.n if c is None else c.tokens(budget.n)
        k1, a, k2 = tokens(s, n)
        entries.append({**asdict(s), "vision_cut": None if c is None else asdict(c), "tokens": [n, k1, a, k2],
                        "ratio": round(budget.ratio(shape, s, c), 4), **fidelity[i],
                        "role": "candidate" if i < len(frontier) else names[i - len(frontier)]})
    candidates = sorted(range(len(frontier)), key=lambda i: (entries[i]["kl_mean"], -entries[i]["ratio"]))
    shortlist = candidates[:SHORTLIST]
    objective = "lowest mean KL(p_full || p_halfv) of the last token"
    full_accuracy = None
    if any(s.answer is not None for s in samples):
        named = {"full": None, **{f"c{i}": schedules[i] for i in shortlist if cuts[i] is None},
                 **{f"r:{k}": references[k] for k in names}}
        accuracy = evaluate_accuracy(adapter, loaded, plan.batches, plan.batches_inputs, named,
                                     progress("search: accuracy"))
        for c in {cuts[i] for i in shortlist} - {None}:  # a cut candidate answers from its cut rows
            accuracy.update(evaluate_accuracy(adapter, loaded, plan.batches, plan.cut_inputs[c],
                                              {f"c{i}": schedules[i] for i in shortlist if cuts[i] == c},
                                              progress(f"search: accuracy (vision cut {c.block}:{c.keep})")))
        for i in shortlist:
            entries[i]["accuracy"] = accuracy[f"c{i}"]
        for j, k in enumerate(names):
            entries[len(frontier) + j]["accuracy"] = accuracy[f"r:{k}"]
        chosen = max(shortlist, key=lambda i: (entries[i]["accuracy"], -entries[i]["kl_mean"]))
        objective = (f"highest task accuracy among the {len(shortlist)} of lowest mean KL(p_full || p_halfv) "
                     "(ties: lower KL)")
        full_accuracy = accuracy["full"]
    else:
        chosen = candidates[0]
    values = {key: getattr(schedules[chosen], key) for key in FIELDS}
    record = {
        "vision_cut": entries[chosen]["vision_cut"],  # the chosen schedule's cut (None: LLM-only)
        "vision_keeps": list(VISION_KEEPS) if plan.counts.get("vision_cuts", 1) > 1 else None,  # searched
        "target_ratio": plan.target, "ratio_kind": budget.kind, "bucket": list(budget.bucket),
        "visual_tokens": budget.n, "text_tokens": budget.text, "vision_flops": budget.vision, "samples": len(samples),
        "samples_with_answers": sum(s.answer is not None for s in samples), "full_accuracy": full_accuracy,
        "grid": {"keep_ratio": list(KEEP_RATIOS), "anchor_ratio": list(ANCHOR_RATIOS), "ssr_ratio": list(SSR_RATIOS),
                 "fixed": {k: v for k, v in plan.fixed.items() if v is not None}},
        "counts": plan.counts, "objective": objective, "chosen": chosen, "shortlist": shortlist,
        "seconds": round(time.perf_counter() - started, 2), "log": entries,
    }
    cut_text = "" if cuts[chosen] is None else f", vision cut {cuts[chosen].block}:{cuts[chosen].keep}"
    log(f"search: chose {', '.join(f'{k} {v}' for k, v in values.items())}{cut_text} (ratio {entries[chosen]['ratio']:.2f}, KL {entries[chosen]['kl_mean']:.3g}, "
        f"top-1 {entries[chosen]['top1_agreement']:.3f}) in {record['seconds']:.0f} s")
    return values, record


def pareto(entries: list[dict]) -> list[int]:
    """Indices of the candidates no other candidate beats on both ratio (higher) and KL (lower), by ratio."""
    cands = [i for i, e in enumerate(entries) if e["role"] == "candidate"]
    front = [i for i in cands if not any(entries[j]["ratio"] >= entries[i]["ratio"]
                                         and entries[j]["kl_mean"] <= entries[i]["kl_mean"]
                                         and (entries[j]["ratio"], entries[j]["kl_mean"]) !=
                                         (entries[i]["ratio"], entries[i]["kl_mean"]) for j in cands)]
    return sorted(front, key=lambda i: entries[i]["ratio"])


def held_out_check(adapter, loaded, samples: list[Sample], searched: PruneSchedule, search: dict,
                   progress: Callable = iter) -> dict:
    """The searched schedule beside the paper's on data the search never saw (validate): fidelity to the unpruned
    model, task accuracy where the samples carry answers, and each one's FLOPs ratio where the search measured it."""
    stack = adapter.text_stack(loaded)
    schedules = {"searched": searched, "paper": paper_schedule(adapter, stack.num_layers)}
    cut = VisionCut(**search["vision_cut"]) if search.get("vision_cut") else None  # the searched schedule's
    config = loaded.config.to_dict()
    shape = LMShape.from_config(config)
    batches = bucket_batches(adapter, loaded, samples, BATCH, needs="the searched-vs-paper check")
    batches_inputs = [adapter.prepare(loaded, [s.image for s in b], [s.prompt for s in b]) for b in batches]
    budget = make_budget(search["ratio_kind"], config, shape, tuple(search["bucket"]), search["visual_tokens"],
                         mean_text_rows(batches_inputs), [cut])
    answered = any(s.answer is not None for s in samples)
    accuracy = evaluate_accuracy(adapter, loaded, batches, batches_inputs, {"full": None, "paper": schedules["paper"]}
                                 ) if answered else {}
    paper_fidelity = evaluate_fidelity(stack, batches_inputs, [schedules["paper"]], progress)[0]
    if cut is None:
        searched_fidelity = evaluate_fidelity(stack, batches_inputs, [searched], progress)[0]
        cut_inputs = batches_inputs
    else:  # the searched schedule with its vision cut, against the uncut model
        cut_inputs = [adapter.prepare(loaded, [s.image for s in b], [s.prompt for s in b], cut) for b in batches]
        reference = [HalfVReference(stack, None).prefill(inp).logits for inp in batches_inputs]
        searched_fidelity = evaluate_fidelity(stack, cut_inputs, [searched], progress, reference)[0]
    if answered:
        accuracy.update(evaluate_accuracy(adapter, loaded, batches, cut_inputs, {"searched": searched}))
    fidelity = {"searched": searched_fidelity, "paper": paper_fidelity}
    cuts = {"searched": cut, "paper": None}
    rows = {name: {"schedule": asdict(s), "vision_cut": None if cuts[name] is None else asdict(cuts[name]),
                   "ratio": round(budget.ratio(shape, s, cuts[name]), 4), **fidelity[name],
                   "accuracy": accuracy.get(name)} for name, s in schedules.items()}
    return {"samples": len(samples), "ratio_kind": search["ratio_kind"], "bucket": search["bucket"],
            "target_ratio": search["target_ratio"], "full_accuracy": accuracy.get("full"), **rows,
            "paper_ratio_at_most_searched": rows["paper"]["ratio"] <= rows["searched"]["ratio"]}
