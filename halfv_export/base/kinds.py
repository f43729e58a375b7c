"""The closed sets of names that schedule.json, artifacts.json and the CLI carry as plain strings, as enums checked
in one place. StrEnum members are str: they compare equal to, and serialise as, their values."""

from enum import StrEnum


class SSRMode(StrEnum):
    """What SSR does from layer L2 on (method §5)."""

    TOPK = "topk"  # Qwen: extreme token sparsity, keep K2 = floor(N * sigma) visual rows
    FREEZE = "freeze"  # LLaVA: layer-level inactivity, visual rows stop updating (still keys / values)


SSR_MODES = tuple(m.value for m in SSRMode)


class RatioKind(StrEnum):
    """What a FLOPs ratio (unpruned / HalfV) counts."""

    PREFILL = "prefill"  # the LLM prefill alone
    TTFT = "ttft"  # time to first token: the vision tower (not pruned) + the LLM prefill


RATIO_KINDS = tuple(k.value for k in RatioKind)
