"""Task accuracy: greedy answers scored by exact match against the reference answers of the data.

An answer is the greedy continuation up to (not including) the first end-of-sequence token, decoded without
special tokens; it matches when normalise(answer) == normalise(reference) (tasks.digits.normalise_answer: stripped,
lower-case, inner whitespace collapsed, a trailing full stop dropped). Scores are kept per question type; samples
without a `type` count under "untyped".
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field

import numpy as np

from ..tasks.digits import normalise_answer

NORMALISATION = "strip, lower-case, collapse whitespace, drop a trailing full stop; exact match"
UNTYPED = "untyped"


def cut_at_eos(tokens, eos_ids) -> list[int]:
    """Token ids up to the first EOS (exclusive)."""
    out = []
    for t in (int(x) for x in tokens):
        if t in eos_ids:
            break
        out.append(t)
    return out


def answer_budget(tokenizer, answers: list[str | None], floor: int = 0) -> int:
    """New tokens enough for the longest reference answer (with a leading space, as LLaVA templates produce it),
    its EOS and one spare token."""
    longest = max((len(tokenizer.encode(" " + a, add_special_tokens=False)) for a in answers if a is not None),
                  default=0)
    return max(floor, longest + 2)


@dataclass
class AccuracyTable:
    """Correct/incorrect per system ("full", "halfv", "engine", baselines, ...) and question type."""

    hits: dict = field(default_factory=dict)  # system -> type -> [bool]
    examples: list = field(default_factory=list)  # a few wrong answers, for the report

    def add(self, system: str, kind: str | None, answer: str, reference: str, name: str = "") -> bool:
        ok = normalise_answer(answer) == normalise_answer(reference)
        self.hits.setdefault(system, {}).setdefault(kind or UNTYPED, []).append(ok)
        if not ok and len(self.examples) < 12:
            self.examples.append({"system": system, "sample": name, "type": kind or UNTYPED, "answer": answer,
                                  "reference": reference})
        return ok

    def accuracy(self, system: str, kind: str | None = None) -> float | None:
        table = self.hits.get(system, {})
        values = table.get(kind, []) if kind is not None else [x for v in table.values() for x in v]
        return float(np.mean(values)) if values else None

    def count(self, system: str, kind: str | None = None) -> int:
        table = self.hits.get(system, {})
        return len(table.get(kind, [])) if kind is not None else sum(len(v) for v in table.values())

    def systems(self) -> list[str]:
        return list(self.hits)

    def types(self) -> list[str]:
        return sorted({k for table in self.hits.values() for k in table})


def retention(part: float | None, whole: float | None) -> float | None:
    return None if part is None or not whole else part / whole


def standard_error(p: float | None, n: int) -> float | None:
    return None if p is None or n < 1 else math.sqrt(p * (1 - p) / n)


def accuracy_section(table: AccuracyTable, systems=("full", "halfv", "engine")) -> dict:
    """report.json's "accuracy": overall and per type, with counts; retention = halfv / full (eager),
    engine_retention = engine / full."""
    def block(kind):
        row = {s: table.accuracy(s, kind) for s in systems if s in table.hits}
        row["count"] = table.count(systems[0], kind)
        row["retention"] = retention(row.get("halfv"), row.get("full"))
        if "engine" in row:
            row["engine_retention"] = retention(row.get("engine"), row.get("full"))
        return row

    section = block(None)
    # the standard error of each accuracy as a binomial proportion over these answers: what a second draw of the
    # same number of questions could move it by
    section["stderr"] = {s: standard_error(section[s], section["count"]) for s in systems if s in section}
    section["per_type"] = {kind: block(kind) for kind in table.types()}
    section["normalisation"] = NORMALISATION
    section["wrong_examples"] = table.examples
    return section
