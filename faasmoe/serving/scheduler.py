"""The step scheduler: continuous batching over one engine, across every tenant.

A thread loops: admit waiting requests into the running batch (round-robin over
tenants, so none starves another), advance the whole batch by one token with one
`engine.step` (so at every MoE layer the tokens of all running requests, whatever
their tenant, go out in one dispatch), hand each request its new text, drop the
finished. Requests join and leave at any step. It knows nothing of HTTP: a request
carries an `emit` callback, which the HTTP layer or the private-mode IPC provides.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from faasmoe.control.sequence import SamplingParams, Sequence
from faasmoe.engines.base import BaseEngine
from faasmoe.engines.output import TextOutput
from faasmoe.serving.messages import DoneEvent, Event, TextEvent, Usage

log = logging.getLogger("faasmoe.scheduler")


class QueueFull(RuntimeError):
    """No room to wait for a batch slot: the caller answers 429."""


@dataclass(eq=False)
class Request:
    id: str
    tenant: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]  # called on the scheduler thread
    seq: Sequence | None = None
    output: TextOutput | None = None  # its text, made from its token ids after each step
    cancelled: bool = False
    counted: int = 0  # output tokens already reported in events
    cold_prefill: bool = False  # a function cold-started during the step that made the first token
    submitted_at: float = field(default_factory=time.perf_counter)


class StepScheduler:
    """Each tenant's admission (its concurrency and queue allowance) is decided before `submit`; here only
    the server-wide queue bound applies.

    The engine is built, stepped and closed on the scheduler's own thread, from `factory`: torch's OpenMP
    pool belongs to the thread that first runs a parallel region (loading does), and a second pool left on
    another thread beside the stepping one means more OpenMP threads than cores, when libgomp stops
    spinning between parallel regions (a batch-8 step took 2.5x as long, measured on 2 cores). A Ray that
    the engine starts lives as long as this thread, which is the server's lifetime."""

    def __init__(self, factory: Callable[[], BaseEngine], max_batch: int = 16, max_queue: int = 64,
                 on_step: Callable[[int], None] | None = None):
        self._factory = factory
        self.engine: BaseEngine | None = None
        self.max_batch, self.max_queue = max_batch, max_queue
        self.on_step = on_step
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._waiting: OrderedDict[str, deque[Request]] = OrderedDict()  # tenant -> its queue, in turn order
        self._running: list[Request] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="faasmoe-scheduler", daemon=True)

    # -- called from other threads -----------------------------------------------------------
    def start(self) -> BaseEngine:
        """Build the engine on the scheduler thread and start stepping; its error is raised here."""
        self._thread.start()
        self._ready.wait()
        if self._failed is not None:
            raise self._failed
        return self.engine

    def submit(self, req: Request) -> None:
        """Queue a request; InvalidRequest if the model cannot serve it, QueueFull if there is no room."""
        self.engine.check_request(req.prompt_ids, req.params)
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self.queue_depth() >= self.max_queue:
                raise QueueFull(f"the server queue is full ({self.max_queue} requests waiting)")
            self._waiting.setdefault(req.tenant, deque()).append(req)
            self._cond.notify()

    def cancel(self, req: Request) -> None:
        """Free the request's slot at the next step (a client that went away)."""
        with self._cond:
            req.cancelled = True
            self._cond.notify()

    def queue_depth(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def running(self) -> int:
        return len(self._running)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop stepping (every waiting and running request gets a 'cancelled' end) and close the engine."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._thread.is_alive() and self.engine is not None:  # a step that hangs: stop its functions anyway
            log.warning("the scheduler did not stop in %g s; closing its engine from here", timeout)
            self.engine.close()

    # -- the scheduler thread ----------------------------------------------------------------
    def _admit(self) -> None:
        """Round-robin over tenants with waiting requests until the batch is full."""
        while len(self._running) < self.max_batch and self._waiting:
            tenant, queue = next(iter(self._waiting.items()))
            req = queue.popleft()
            self._waiting.move_to_end(tenant)
            if not queue:
                del self._waiting[tenant]
            if req.cancelled:
                self._end(req, "cancelled")
                continue
            try:
                req.seq = self.engine.new_sequence(req.prompt_ids, req.params, req.tenant)
                req.output = TextOutput(self.engine.decode, req.params.stop)
            except (ValueError, RuntimeError) as e:  # its cache could not be allocated
                self._end(req, "error", str(e))
                continue
            self._running.append(req)

    def _run(self) -> None:
        try:
            self.engine = self._factory()
        except BaseException as e:  # raised by start() in the caller's thread
            self._failed = e
            return
        finally:
            self._ready.set()
        try:
            self._loop()
        finally:
            self.engine.close()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._running:
                    self._cond.wait()
                if self._stopping:
                    break
                for req in [r for r in self._running if r.cancelled]:
                    self._running.remove(req)
                    self._end(req, "cancelled")
                self._admit()
                batch = list(self._running)
            if not batch:
                continue
            cold_before = self.engine.cold_starts()
            try:
                self.engine.step([r.seq for r in batch])
            except Exception as e:  # a function failed for good: these requests fail, the server goes on
                log.error("step failed: %s", e)
                with self._cond:
                    for req in batch:
                        if req in self._running:
                            self._running.remove(req)
                        self._end(req, "error", str(e))
                continue
            if self.on_step:
                self.on_step(len(batch))
            cold = self.engine.cold_starts() != cold_before
            with self._cond:
                for req in batch:
                    seq = req.seq
                    made = len(seq.output_ids) - req.counted
                    if made:
                        req.cold_prefill |= cold and req.counted == 0
                        req.counted += made
                        text = self._text(req) if seq.finish_reason != "error" else ""
                        self._emit(req, TextEvent(text=text, tokens=made, ids=seq.output_ids[-made:]))
                    if seq.finished:
                        self._running.remove(req)
                        self._end(req, seq.finish_reason, seq.error)
        with self._cond:  # shutting down: nobody is left waiting for an answer that will not come
            for req in self._running + [r for q in self._waiting.values() for r in q]:
                self._end(req, "cancelled", "the server is shutting down")
            self._running.clear()
            self._waiting.clear()

    @staticmethod
    def _text(req: Request) -> str:
        """The request's new text (it may end the sequence: a stop string); a text that cannot be made ends
        this sequence alone."""
        try:
            return req.output.update(req.seq)
        except Exception as e:
            req.seq.finish("error", f"detokenising failed: {e}")
            return ""

    @staticmethod
    def _end(req: Request, reason: str, error: str | None = None) -> None:
        seq = req.seq
        if seq is not None:
            seq.finish(reason, error)
            delta = req.output.new_text(True) if req.output is not None else ""
            if delta and reason in ("stop", "length"):
                StepScheduler._emit(req, TextEvent(text=delta, tokens=0))
        usage = Usage(prompt_tokens=len(req.prompt_ids), completion_tokens=len(seq.output_ids) if seq else 0)
        StepScheduler._emit(req, DoneEvent(finish_reason=reason, usage=usage, error=error or None,
                                           cold_prefill=req.cold_prefill))

    @staticmethod
    def _emit(req: Request, event: Event) -> None:
        try:
            req.emit(event)
        except Exception as e:  # a consumer that is gone must not stop the scheduler; its slot is freed
            log.info("request %s: consumer gone (%s)", req.id, e)
            req.cancelled = True
