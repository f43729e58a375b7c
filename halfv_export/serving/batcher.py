"""A request queue in front of one Model, drained by a single engine thread (engine sessions are not re-entrant).

Batching rule: the oldest waiting request picks the group, key = (bucket, pruned): the exported graphs take one
image-size bucket per prefill (text-only prompts are their own group and always run the unpruned graphs), and the
pruned and unpruned graphs are different files. The engine thread takes up to `max_batch` waiting requests of that
key, after waiting at most `batch_wait` seconds counted from the oldest request's arrival (so under load, when the
queue already holds a backlog, batches form without any extra wait). max_tokens need not match: each prompt leaves
its batch when it finishes (see Decoding), and its answer is delivered at once, not when the batch ends.

There is no in-flight admission: requests that arrive while a batch decodes wait for it to finish. A request whose
client went away (`cancelled` set) is skipped in the queue or dropped from its running batch at the next step.

Events go to each job's `deliver` callback from the engine thread: Started, then Token per generated token (the
last one carries finish_reason), or Failed (a one-line message and an HTTP-style status) at any point.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable

from ..base.errors import BadInput, HalfvError
from ..engines.api import Detokenizer, Model


@dataclass(frozen=True)
class Started:
    batch_size: int  # prompts prefilled together with this one (itself included)
    bucket: tuple[int, int] | None
    prompt_tokens: int
    queued_s: float  # from submit until its batch's prefill began


@dataclass(frozen=True)
class Token:
    token_id: int
    text: str  # what this token adds to the answer (may be "")
    finish_reason: str | None  # "stop" | "length" on the last token


@dataclass(frozen=True)
class Failed:
    message: str  # one line
    status: int  # 400: the request cannot run; 500: the engine failed; 503: shutting down


class Overloaded(Exception):
    """The queue is full; the caller answers 503 and the client retries later."""


@dataclass
class Job:
    image: object  # a fitted PIL image (Model.image) or None
    prompt: str
    max_new_tokens: int
    full: bool
    deliver: Callable[[object], None]  # called from the engine thread; must not block
    bucket: tuple[int, int] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = 0.0

    @property
    def key(self) -> tuple:
        return self.bucket, not self.full and self.bucket is not None  # text-only: unpruned whatever `full` says


class Stats:
    """Counters the server exposes at /metrics; updated by the engine thread and the request handlers."""

    def __init__(self):
        self.lock = threading.Lock()
        self.received = self.completed = self.failed = self.cancelled = self.rejected = self.invalid = 0
        self.batches: Counter = Counter()  # batch size -> batches formed
        self.prompt_tokens = self.completion_tokens = 0
        self.busy_s = 0.0

    def add(self, **counts) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def batch(self, size: int) -> None:
        with self.lock:
            self.batches[size] += 1

    def snapshot(self) -> dict:
        with self.lock:
            formed = sum(self.batches.values())
            prompts = sum(size * n for size, n in self.batches.items())
            return {
                "requests": {"received": self.received, "completed": self.completed, "failed": self.failed,
                             "cancelled": self.cancelled, "rejected": self.rejected,
                             "invalid": self.invalid},
                "batches": {"formed": formed, "sizes": {str(k): v for k, v in sorted(self.batches.items())},
                            "mean_size": round(prompts / formed, 3) if formed else None,
                            "max_size": max(self.batches) if self.batches else None},
                "tokens": {"prompt": self.prompt_tokens, "completion": self.completion_tokens},
                "engine_busy_s": round(self.busy_s, 3),
            }


class Batcher:
    def __init__(self, model: Model, max_batch: int = 8, batch_wait: float = 0.01, max_queue: int = 256):
        self.model = model
        self.max_batch = max_batch
        self.batch_wait = batch_wait
        self.max_queue = max_queue
        self.stats = Stats()
        self.queue: deque[Job] = deque()
        self.running = 0  # prompts in the batch now decoding
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="halfv-engine", daemon=True)

    def start(self) -> "Batcher":
        self.thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish nothing new: waiting jobs get 503, the running batch is cancelled at its next step."""
        with self.cond:
            self.stopping = True
            waiting, self.queue = list(self.queue), deque()
            self.cond.notify_all()
        for job in waiting:
            job.deliver(Failed("the server is shutting down; retry on another instance", 503))
        self.thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise Overloaded("the server is shutting down")
            if len(self.queue) >= self.max_queue:
                self.stats.add(rejected=1)
                raise Overloaded(f"{len(self.queue)} requests are waiting (--max-queue {self.max_queue}); retry later")
            job.submitted = time.monotonic()
            self.queue.append(job)
            self.cond.notify_all()

    def depth(self) -> dict:
        with self.cond:
            return {"waiting": len(self.queue), "running": self.running}

    # -------------------------------------------------------------------------------------------- engine thread
    def _next_batch(self) -> list[Job] | None:
        with self.cond:
            while True:
                for job in [j for j in self.queue if j.cancelled.is_set()]:
                    self.queue.remove(job)
                    self.stats.add(cancelled=1)
                if self.stopping:
                    return None
                if not self.queue:
                    self.cond.wait()
                    continue
                oldest = self.queue[0]
                same = [j for j in self.queue if j.key == oldest.key and not j.cancelled.is_set()]
                left = oldest.submitted + self.batch_wait - time.monotonic()
                if same and (len(same) >= self.max_batch or left <= 0):
                    batch = same[:self.max_batch]
                    for job in batch:
                        self.queue.remove(job)
                    self.running = len(batch)
                    return batch
                self.cond.wait(left)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            started = time.monotonic()
            try:
                self._run(batch)
            except Exception as e:  # noqa: BLE001 - the engine thread must outlive any one batch
                self._fail(batch, f"engine failure: {e.__class__.__name__}: {_line(e)}", 500)
            finally:
                with self.cond:
                    self.running = 0
                self.stats.add(busy_s=time.monotonic() - started)

    def _run(self, jobs: list[Job]) -> None:
        began = time.monotonic()
        try:
            decoding = self.model.start([j.image for j in jobs], [j.prompt for j in jobs],
                                        [j.max_new_tokens for j in jobs], full=jobs[0].full)
        except HalfvError as e:
            if len(jobs) > 1:  # one request's input spoiled the batch: run each alone so only it fails
                for job in jobs:
                    self._run([job])
                return
            self._fail(jobs, str(e), 400 if isinstance(e, BadInput) else 500)
            return
        self.stats.batch(len(jobs))
        for job, prompt_tokens in zip(jobs, decoding.prompt_tokens):
            job.deliver(Started(len(jobs), decoding.bucket, prompt_tokens, began - job.submitted))
            self.stats.add(prompt_tokens=prompt_tokens)
        texts = [Detokenizer(self.model.tokenizer) for _ in jobs]
        while not decoding.done:
            if self.stopping:
                self._fail([jobs[row] for row in decoding.rows], "the server is shutting down; retry later", 503)
                return
            gone = [row for row in decoding.rows if jobs[row].cancelled.is_set()]
            if gone:
                decoding.cancel(gone)
                self.stats.add(cancelled=len(gone))
                if decoding.done:
                    break
            try:
                events = decoding.step()
            except Exception as e:  # noqa: BLE001
                self._fail([jobs[row] for row in decoding.rows], f"engine failure: {e.__class__.__name__}: "
                                                                  f"{_line(e)}", 500)
                return
            for row, token, finish in events:
                text = texts[row].push(token) + (texts[row].flush() if finish else "")
                jobs[row].deliver(Token(token, text, finish))
                if finish:
                    self.stats.add(completed=1, completion_tokens=len(decoding.generated[row]))

    def _fail(self, jobs: list[Job], message: str, status: int) -> None:
        for job in jobs:
            job.deliver(Failed(message, status))
        self.stats.add(failed=len(jobs))


def _line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]
