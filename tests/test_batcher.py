"""The serve request queue without HTTP: waiting requests are grouped by (bucket, pruned), capped at max_batch, in
arrival order; answers equal the single-prompt answers; a cancelled request is skipped in the queue or dropped from
its running batch while the others finish; the engine thread survives a failing batch."""

import threading
import time

import pytest

import halfv_export
from halfv_export.serving.batcher import Batcher, Failed, Job, Started, Token
from tests.conftest import make_image


@pytest.fixture(scope="module")
def model(exported):
    return halfv_export.load(exported)


def submit_all(batcher, model, specs, max_new_tokens=3):
    """Queue every (image, prompt, full) before the engine thread starts, so the grouping is deterministic."""
    events = {i: [] for i in range(len(specs))}
    done = {i: threading.Event() for i in range(len(specs))}
    jobs = []
    for i, (image, prompt, full) in enumerate(specs):
        def deliver(event, i=i):
            events[i].append(event)
            if isinstance(event, Failed) or (isinstance(event, Token) and event.finish_reason):
                done[i].set()

        fitted = model.image(image)
        job = Job(fitted, prompt, max_new_tokens, full, deliver, bucket=model.bucket_of(fitted))
        batcher.submit(job)
        jobs.append(job)
    return jobs, events, done


def wait(done, indices, timeout=120):
    deadline = time.monotonic() + timeout
    for i in indices:
        assert done[i].wait(max(0.0, deadline - time.monotonic())), f"request {i} got no answer"


def test_waiting_requests_are_grouped_by_bucket_and_graph(model):
    square, wide = make_image(448, 448, 41), make_image(504, 336, 42)
    specs = [(square, "a", False), (wide, "b", False), (square, "c", False), (None, "d", False),
             (square, "e", True), (square, "f", False), (wide, "g", False), (None, "h", True)]
    batcher = Batcher(model, max_batch=8, batch_wait=0.2)
    _, events, done = submit_all(batcher, model, specs)
    batcher.start()
    try:
        wait(done, range(len(specs)))
    finally:
        batcher.stop()
    sizes = {i: events[i][0].batch_size for i in events}
    # 448 pruned: a, c, f; 336x504: b, g; text-only d and h share the unpruned graphs whatever `full` says; e alone
    assert sizes == {0: 3, 2: 3, 5: 3, 1: 2, 6: 2, 3: 2, 7: 2, 4: 1}
    assert batcher.stats.snapshot()["batches"]["sizes"] == {"1": 1, "2": 2, "3": 1}
    for i, (image, prompt, full) in enumerate(specs):
        started, tokens = events[i][0], events[i][1:]
        assert isinstance(started, Started) and all(isinstance(t, Token) for t in tokens)
        alone = model.generate(image, prompt, max_new_tokens=3, full=full)
        assert [t.token_id for t in tokens] == alone.token_ids
        assert "".join(t.text for t in tokens) == alone.text and started.prompt_tokens == alone.prompt_tokens


def test_max_batch_caps_a_group_and_cancelled_requests_are_skipped(model):
    square = make_image(448, 448, 43)
    prompts = ("a", "b", "c", "d")
    alone = {p: model.generate(square, p, max_new_tokens=3).token_ids for p in prompts}  # before the engine thread
    batcher = Batcher(model, max_batch=2, batch_wait=0.2)
    jobs, events, done = submit_all(batcher, model, [(square, p, False) for p in prompts])
    jobs[1].cancelled.set()
    batcher.start()
    try:
        wait(done, [0, 2, 3])
        # b's place went to c: a + c, then d alone; b is never started and never answered
        assert events[1] == [] and [events[i][0].batch_size for i in (0, 2, 3)] == [2, 2, 1]
        for i in (0, 2, 3):
            assert [t.token_id for t in events[i][1:]] == alone[prompts[i]], prompts[i]
        assert batcher.stats.snapshot()["requests"]["cancelled"] == 1
        _, more, more_done = submit_all(batcher, model, [(square, "b", False)])  # the thread serves on
        wait(more_done, [0])
        assert [t.token_id for t in more[0][1:]] == alone["b"]
    finally:
        batcher.stop()


def test_a_request_cancelled_mid_answer_leaves_its_batch_and_the_other_finishes(model):
    square = make_image(448, 448, 44)
    prompts = ["Describe the picture in detail.", "What is in this image?"]
    alone = [model.generate(square, p, max_new_tokens=6) for p in prompts]  # before the engine thread starts
    assert len(alone[0].token_ids) >= 3  # long enough that a cut after one token shows
    batcher = Batcher(model, max_batch=2, batch_wait=0.2)
    jobs, events, done = submit_all(batcher, model, [(square, p, False) for p in prompts], max_new_tokens=6)
    deliver = jobs[0].deliver

    def client_leaves_after_one_token(event):
        deliver(event)
        if isinstance(event, Token):
            jobs[0].cancelled.set()

    jobs[0].deliver = client_leaves_after_one_token
    batcher.start()
    try:
        wait(done, [1])
        deadline = time.monotonic() + 60
        while batcher.depth() != {"waiting": 0, "running": 0} and time.monotonic() < deadline:
            time.sleep(0.05)
        started, *tokens = events[0]
        assert started.batch_size == 2 and [(t.token_id, t.finish_reason) for t in tokens] == [
            (alone[0].token_ids[0], None)]  # one token, then nothing: no finish, no failure
        assert [t.token_id for t in events[1][1:]] == alone[1].token_ids
        assert events[1][-1].finish_reason == alone[1].finish_reason
        counts = batcher.stats.snapshot()["requests"]
        assert (counts["completed"], counts["cancelled"], counts["failed"]) == (1, 1, 0)
        _, more, more_done = submit_all(batcher, model, [(square, prompts[0], False)], max_new_tokens=6)
        wait(more_done, [0])  # the same prompt again, uncancelled: the whole answer
        assert [t.token_id for t in more[0][1:]] == alone[0].token_ids and more[0][0].batch_size == 1
    finally:
        batcher.stop()


def test_a_request_that_cannot_run_fails_alone_and_the_thread_lives_on(model):
    batcher = Batcher(model, max_batch=4, batch_wait=0.2)
    specs = [(None, "too long " * 3000, False), (None, "fine", False), (None, "also fine", False)]
    jobs, events, done = submit_all(batcher, model, specs, max_new_tokens=2000)
    batcher.start()
    try:
        wait(done, [0])
        for job in jobs[1:]:  # they run alone after the failed batch; no need to decode 2000 tokens each
            job.cancelled.set()
        deadline = time.monotonic() + 60
        while batcher.depth() != {"waiting": 0, "running": 0} and time.monotonic() < deadline:
            time.sleep(0.05)
        assert isinstance(events[0][-1], Failed) and events[0][-1].status == 400
        assert "exceeds the 8192-token context" in events[0][-1].message
        assert not any(isinstance(e, Failed) for i in (1, 2) for e in events[i])
        assert all(e[0].batch_size == 1 for e in (events[1], events[2]) if e)  # split, each alone
        _, more, more_done = submit_all(batcher, model, [(None, "after", False)])
        wait(more_done, [0])
        assert isinstance(more[0][-1], Token) and batcher.thread.is_alive()
    finally:
        batcher.stop()
