"""The one greedy decode loop. The eager reference (graphs/halfv.py), the engine pipeline that validate gates
(engines/pipeline.py) and the Python API / server (engines/api.py) all step through `Greedy`, so their tokens can
only differ where their logits do.

A `Stepper` holds one batch's logits and cache wherever they were computed (torch on the host, ONNX Runtime arrays,
TensorRT device tensors); the loop only ever asks it for the argmax ids, so the [B, V] logits never cross to the
host. Rows leave the batch on an end-of-sequence token, on their own token budget or through `cancel`; the stepper
then drops their cache rows, so a batch never pays for prompts that are done.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np


class Stepper(Protocol):
    def argmax(self) -> np.ndarray:
        """[rows] int64 host ids: the argmax of the current logits of the rows still decoding."""

    def advance(self, tokens: np.ndarray) -> None:
        """One decode step that feeds `tokens` [rows] and leaves the next logits in place."""

    def keep(self, positions: list[int]) -> None:
        """Keep only these rows (positions in the current batch) of the cache, positions and logits."""


class Greedy:
    """Greedy decoding of one prefilled batch. `step()` returns one token per prompt still decoding: after the
    prefill, the argmax of its logits; later, one decode step over the rows still active."""

    def __init__(self, stepper: Stepper, budgets: Sequence[int], eos: set[int] | frozenset[int] = frozenset()):
        self.stepper = stepper
        self.budgets = [int(b) for b in budgets]
        self.eos = {int(t) for t in eos}
        self.generated: list[list[int]] = [[] for _ in self.budgets]
        self.finish: list[str | None] = [None] * len(self.budgets)  # "stop" (EOS) or "length" (budget)
        self.rows = list(range(len(self.budgets)))  # prompt index of each batch row still decoding
        self.pending: np.ndarray | None = None  # [rows] tokens the next decode step feeds

    @property
    def done(self) -> bool:
        return not self.rows

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def step(self) -> list[tuple[int, int, str | None]]:
        """[(prompt index, token id, finish_reason or None)] for every row that was still decoding."""
        if not self.rows:
            return []
        if self.pending is not None:
            self.stepper.advance(self.pending)
        tokens = np.asarray(self.stepper.argmax(), dtype=np.int64).reshape(-1)
        out, keep = [], []
        for pos, (row, token) in enumerate(zip(self.rows, tokens.tolist())):
            self.generated[row].append(token)
            finish = ("stop" if token in self.eos else
                      "length" if len(self.generated[row]) >= self.budgets[row] else None)
            self.finish[row] = finish
            out.append((row, token, finish))
            if finish is None:
                keep.append(pos)
        self.pending = tokens
        self._keep(keep)
        return out

    def cancel(self, indices) -> None:
        """Stop decoding these prompts (e.g. their client went away); the others carry on unchanged."""
        gone = set(indices)
        self._keep([pos for pos, row in enumerate(self.rows) if row not in gone])

    def run(self) -> "Greedy":
        while not self.done:
            self.step()
        return self

    def tokens(self) -> np.ndarray:
        """[B, T] int64, T the longest answer; a shorter (finished) answer repeats its last token, its EOS."""
        width = max((len(g) for g in self.generated), default=0)
        out = np.zeros((len(self.generated), width), dtype=np.int64)
        for b, ids in enumerate(self.generated):
            if ids:
                out[b, :len(ids)], out[b, len(ids):] = ids, ids[-1]
        return out

    def _keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[pos] for pos in keep]
        if self.pending is not None:
            self.pending = self.pending[keep]
        self.stepper.keep(keep)
