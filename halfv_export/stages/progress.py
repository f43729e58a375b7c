"""How a stage tells its caller how far it is: one callback, called with a ProgressEvent. The library prints
nothing; the CLI draws bars and lines from these events (cli/render.py), a notebook may log them or pass nothing."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Callable, Iterable, Iterator


class Stage(StrEnum):
    CALIBRATE = "calibrate"
    EXPORT = "export"
    ENGINE = "engine"
    VALIDATE = "validate"
    MAKE_TASK = "make-task"
    COMPARE = "compare"


@dataclass(frozen=True)
class ProgressEvent:
    """One of three kinds: a task moved (`task` with `done` / `total`: total None while unknown, done None when it
    has just started and counts nothing; `detail` what it is doing right now), a task ended (`finished`), or a line
    worth showing (`message`, no task)."""

    stage: Stage
    task: str | None = None
    done: int | None = None
    total: int | None = None
    finished: bool = False
    message: str | None = None
    detail: str | None = None


ProgressCallback = Callable[[ProgressEvent], None]


def _ignore(event: ProgressEvent) -> None:
    pass


class Reporter:
    """What a stage holds to emit events for one Stage; every method is a no-op without a callback."""

    def __init__(self, stage: Stage, callback: ProgressCallback | None):
        self.stage, self.callback = stage, callback or _ignore

    def message(self, text: str) -> None:
        self.callback(ProgressEvent(self.stage, message=text))

    @contextmanager
    def status(self, task: str):
        """A step without a count (loading a model, hashing the artifacts)."""
        self.callback(ProgressEvent(self.stage, task))
        try:
            yield
        finally:
            self.callback(ProgressEvent(self.stage, task, finished=True))

    def counted(self, task: str, total: int | None = None) -> "Count":
        self.callback(ProgressEvent(self.stage, task, None, total))
        return Count(self, task, total)

    def tracker(self, task: str) -> Callable[[Iterable], Iterator]:
        """A `progress=` argument for a function that batches its own items: the total is set from the list it
        iterates; each call of the returned function is one pass over a list."""
        def track(items: Iterable) -> Iterator:
            items = list(items)
            advance = self.counted(task, len(items))
            for done, item in enumerate(items, 1):
                yield item
                advance(done)
            advance.finish()

        return track


class Count:
    """A counted task: `count(done)` reports `done` items (with `total` when it changes, and what is being done
    now as `detail`); `finish()` ends it."""

    def __init__(self, reporter: Reporter, task: str, total: int | None):
        self.reporter, self.task, self.total = reporter, task, total

    def __call__(self, done: int, total: int | None = None, detail: str | None = None) -> None:
        self.total = self.total if total is None else total
        self.reporter.callback(ProgressEvent(self.reporter.stage, self.task, done, self.total, detail=detail))

    def finish(self) -> None:
        self.reporter.callback(ProgressEvent(self.reporter.stage, self.task, finished=True))
