"""The step scheduler on its own: where the engine lives, admission, fairness, cancellation, bounds."""

from __future__ import annotations

import threading

import pytest

from faasmoe.control.sequence import SamplingParams
from faasmoe.engines.base import InvalidRequest
from faasmoe.engines.monolithic import MonolithicEngine
from faasmoe.serving.messages import DoneEvent, TextEvent
from faasmoe.serving.scheduler import QueueFull, Request, StepScheduler


class Client:
    """Collects one request's events (emitted on the scheduler thread)."""

    def __init__(self, rid: str, tenant: str, order: list[str] | None = None):
        self.rid, self.tenant, self.order = rid, tenant, order
        self.events: list = []
        self.done = threading.Event()

    def emit(self, event) -> None:
        self.events.append(event)
        if isinstance(event, DoneEvent):
            if self.order is not None:
                self.order.append(self.rid)
            self.done.set()

    def request(self, max_tokens: int = 3) -> Request:
        return Request(self.rid, self.tenant, [5, 6, 7], SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                       self.emit)

    @property
    def final(self) -> DoneEvent:
        assert self.done.wait(60), f"{self.rid} never ended"
        return self.events[-1]


def test_the_engine_is_built_stepped_and_closed_on_the_scheduler_thread(tiny):
    """So that the stepping thread owns the process's only OpenMP pool (see StepScheduler)."""
    seen = {}

    class Recorded(MonolithicEngine):
        def __init__(self, *a, **k):
            seen["built"] = threading.current_thread()
            super().__init__(*a, **k)

        def step(self, seqs):
            seen["stepped"] = threading.current_thread()
            super().step(seqs)

        def close(self):
            seen["closed"] = threading.current_thread()

    sched = StepScheduler(lambda: Recorded(tiny), max_batch=4)
    engine = sched.start()
    c = Client("r", "t")
    sched.submit(c.request())
    assert c.final.finish_reason == "length"
    sched.stop()
    assert seen["built"] is seen["stepped"] is seen["closed"] is sched._thread
    assert not sched._thread.is_alive() and isinstance(engine, Recorded)


def test_an_engine_that_fails_to_build_fails_start():
    def broken():
        raise ValueError("no such checkpoint")

    with pytest.raises(ValueError, match="no such checkpoint"):
        StepScheduler(broken).start()


@pytest.fixture(scope="module")
def engine(tiny):
    return MonolithicEngine(tiny)


def _scheduler(engine, **kw) -> StepScheduler:
    sched = StepScheduler(lambda: engine, **kw)
    sched.start()
    return sched


def test_tenants_take_turns_for_batch_slots(engine):
    """One slot, tenant a with three requests queued before tenant b's one: b runs second, not fourth."""
    sched = _scheduler(engine, max_batch=1)
    order: list[str] = []
    clients = [Client("a1", "a", order), Client("a2", "a", order), Client("a3", "a", order), Client("b1", "b", order)]
    try:
        with sched._cond:  # queued together: the scheduler admits nothing until all four wait
            for c in clients:
                sched.submit(c.request())
        for c in clients:
            assert c.final.finish_reason == "length"
    finally:
        sched.stop(timeout=30)
    assert order == ["a1", "b1", "a2", "a3"]
    for c in clients:  # every token made was reported as it was made, and the total agrees
        assert sum(e.tokens for e in c.events if isinstance(e, TextEvent)) == c.final.usage.completion_tokens == 3


def test_a_full_queue_refuses_and_a_request_the_model_cannot_serve_is_invalid(engine):
    sched = _scheduler(engine, max_batch=1, max_queue=1)
    first, second = Client("q1", "a"), Client("q2", "b")
    try:
        with sched._cond:  # nothing is admitted while we hold it: q1 waits, and the queue is full
            sched.submit(first.request())
            with pytest.raises(QueueFull):
                sched.submit(second.request())
        with pytest.raises(InvalidRequest, match="context") as e:
            sched.submit(Request("big", "a", [1] * 10, SamplingParams(max_tokens=10**6), first.emit))
        assert e.value.code == "context_length_exceeded"
        assert first.final.finish_reason == "length"
    finally:
        sched.stop(timeout=30)


def test_cancelled_requests_end_cancelled_with_the_tokens_they_made(engine):
    sched = _scheduler(engine, max_batch=1)
    running, waiting = Client("run", "a"), Client("wait", "b")
    try:
        long = running.request(max_tokens=200)
        with sched._cond:
            sched.submit(long)
            req = waiting.request()
            sched.submit(req)
            sched.cancel(req)  # cancelled before it was ever admitted
        while not any(isinstance(e, TextEvent) and e.tokens for e in running.events):
            threading.Event().wait(0.01)
        sched.cancel(long)
        assert running.final.finish_reason == "cancelled"
        assert 0 < running.final.usage.completion_tokens < 200
        assert waiting.final.finish_reason == "cancelled" and waiting.final.usage.completion_tokens == 0
    finally:
        sched.stop(timeout=30)


def test_stopping_ends_every_request_cancelled(engine):
    sched = _scheduler(engine, max_batch=1)
    clients = [Client(f"s{i}", "a") for i in range(3)]
    with sched._cond:
        for c in clients:
            sched.submit(c.request(max_tokens=200))
    sched.stop(timeout=30)
    assert all(c.final.finish_reason == "cancelled" for c in clients)
    with pytest.raises(QueueFull):
        sched.submit(Client("late", "a").request())
