"""The Platform interface every FaaS backend implements, and the records they all keep.

A platform deploys expert functions, invokes them (many at once), keeps an
instance warm for `keep_alive_s`, scales to zero after it, scales out under load
up to `max_instances`, retries a call whose instance died, and reports instance
events and resource use. It moves opaque wire frames: it never looks inside.
"""

from __future__ import annotations

import math
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, model_validator

from faasmoe.functions.spec import FunctionSpec
from faasmoe.metering.meter import Label

EventKind = Literal["cold_start", "prefetch", "warm_hit", "eviction", "budget_eviction", "crash", "timeout",
                    "start_failed"]


class PlatformConfig(BaseModel):
    """Scaling and fault settings, the same for every platform (validated once, passed down as a value)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep_alive_s: float = Field(30.0, ge=0, description="idle seconds before an instance is scaled to zero")
    max_instances: int = Field(4, ge=1, description="instances per function under concurrent load (local "
                                                   "platform: host processes, each of which loads any function)")
    scale_out_after_s: float = Field(
        0.25, ge=0, description="how long a call waits for a busy instance (local: host) before another one is "
                                "started: a warm call takes milliseconds, a cold start far more, so starting one at "
                                "once under a burst only slows the machine down")
    invoke_timeout_s: float = Field(60.0, gt=0, description="seconds before a call to an instance is abandoned")
    cold_start_timeout_s: float = Field(120.0, gt=0, description="seconds an instance may take to become ready")
    max_retries: int = Field(2, ge=0, description="retries of a call whose instance died or timed out")
    threads_per_instance: int = Field(1, ge=1, description="torch threads in each function instance (local: "
                                                           "host process)")
    compile_experts: bool = Field(
        False, description="compute a one-token call's experts as code compiled by torch's inductor (which needs a C++ "
                           "compiler): a bf16 expert 3-4x faster on the Zen 4 EPYC measured; the local platform "
                           "compiles once in its zygote while it starts (seconds, less with inductor's cache), a "
                           "Ray host in its actor (its cold start grows by as much); needs threads_per_instance 1")
    eviction: Literal["next-use", "lru"] = Field(
        "next-use", description="which idle function the memory budget stops first: next-use, the one whose layer "
                                "comes last in the model's layer cycle after the layer that needs room (decoding "
                                "sweeps the layers in order, so that function waits longest; least recently used "
                                "among equals), or lru, least recently used (which, when a step needs more than "
                                "the budget holds, unloads exactly the functions the next step needs first)")
    memory_budget: ByteSize | None = Field(
        None, gt=0, description="expert weight bytes the function pool may hold in memory (local platform): a cold "
                                "start that would pass it first unloads idle functions (in the order of "
                                "`eviction`) and drops their pages from the page cache; with every resident "
                                "function busy it waits. A number of bytes or a size such as 14GiB; none: no "
                                "budget")

    @model_validator(mode="after")
    def _one_thread_to_compile(self) -> "PlatformConfig":
        # the compiled code is generated for the thread count it was compiled under (the zygote's one): a host
        # given more threads would compute its experts on one and leave the rest idle, not what was asked for
        if self.compile_experts and self.threads_per_instance != 1:
            raise ValueError("compile_experts needs threads_per_instance = 1")
        return self


class InvocationError(RuntimeError):
    """A call that failed on every attempt (instance crashes, timeouts); names the function."""


@dataclass
class InstanceEvent:
    kind: EventKind
    function: str
    instance: str
    at: float  # wall-clock time.time()
    duration_s: float  # cold start, prefetch: spawn to ready; warm hit: the call; eviction: idle time; crash: the call
    load_s: float | None = None  # cold start, prefetch: weight load inside the instance


@dataclass
class FunctionStats:
    invocations: int = 0
    cold_starts: int = 0  # calls that started an instance and waited for it
    prefetches: int = 0  # instances started ahead of any call (`warm`); their first call is a warm hit
    warm_hits: int = 0
    evictions: int = 0  # keep-alive ran out
    budget_evictions: int = 0  # stopped to make room within the memory budget
    crashes: int = 0
    timeouts: int = 0
    retries: int = 0
    instances: int = 0  # running now
    peak_instances: int = 0
    busy_s: float = 0.0  # summed call time
    cold_start_s: float = 0.0  # summed cold-start time
    weight_bytes: int = 0  # the function's weights (as deployed)
    load_s: float = 0.0  # summed weight-load time inside instances (cold starts and prefetches that report it)
    loaded_bytes: int = 0  # weight bytes those loads mapped (page-cache hits included): / load_s, their load rate


@dataclass
class InstanceInfo:
    function: str
    instance: str
    pid: int | None
    busy: bool
    started_at: float
    last_used: float


@dataclass
class EventLog:
    """Counters per function plus the most recent events (bounded): every platform's bookkeeping, thread-safe."""

    maxlen: int = 100_000
    stats: dict[str, FunctionStats] = field(default_factory=dict)
    recent: deque = field(default_factory=deque)
    cold_starts: int = 0  # over every function: cheap to read at every step
    prefetches: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def event(self, kind: EventKind, function: str, instance: str, duration_s: float,
              load_s: float | None = None) -> None:
        """Something happened to an instance now (see InstanceEvent)."""
        self.record(InstanceEvent(kind, function, instance, time.time(), duration_s, load_s))

    def record(self, ev: InstanceEvent) -> None:
        with self._lock:
            s = self.stats.setdefault(ev.function, FunctionStats())
            if (ev.kind in ("cold_start", "prefetch") and s.weight_bytes and ev.load_s is not None
                    and math.isfinite(ev.load_s)):
                s.load_s += ev.load_s
                s.loaded_bytes += s.weight_bytes
            if ev.kind == "cold_start":
                self.cold_starts += 1
                s.cold_starts += 1
                s.cold_start_s += ev.duration_s
            elif ev.kind == "prefetch":
                self.prefetches += 1
                s.prefetches += 1
            elif ev.kind == "warm_hit":
                s.warm_hits += 1
            elif ev.kind == "eviction":
                s.evictions += 1
            elif ev.kind == "budget_eviction":
                s.budget_evictions += 1
            elif ev.kind == "crash":
                s.crashes += 1
            elif ev.kind == "timeout":
                s.timeouts += 1
            if ev.kind != "warm_hit":  # warm hits are counted, not kept one by one
                self.recent.append(ev)
                while len(self.recent) > self.maxlen:
                    self.recent.popleft()

    def invoked(self, function: str) -> None:
        with self._lock:
            self.function(function).invocations += 1

    def retried(self, function: str, times: int = 1) -> None:
        with self._lock:
            self.function(function).retries += times

    def called(self, function: str, busy_s: float, warm_hit: bool = False) -> None:
        """A call returned after `busy_s` seconds; a warm hit is counted here, not logged as an event."""
        with self._lock:
            s = self.function(function)
            s.busy_s += busy_s
            s.warm_hits += warm_hit

    def instances_now(self, function: str, running: int) -> None:
        with self._lock:
            s = self.function(function)
            s.instances = running
            s.peak_instances = max(s.peak_instances, running)

    def deployed(self, fid: str, weight_bytes: int) -> None:
        """A function is deployed: listed (with zeros) from now on, with its weights' size."""
        with self._lock:
            self.function(fid).weight_bytes = weight_bytes

    def function(self, fid: str) -> FunctionStats:
        return self.stats.setdefault(fid, FunctionStats())


def totals(stats: dict[str, FunctionStats]) -> dict[str, float]:
    """Sum of every counter over all functions."""
    out: dict[str, float] = {}
    for s in stats.values():
        for k, v in asdict(s).items():
            out[k] = out.get(k, 0) + v
    return out


class Platform(ABC):
    """What the control plane needs from a FaaS platform.

    Calls go out in batches (every function a MoE layer needs, at once): `submit`
    starts them and returns, `gather` waits for their replies. Both are thread-safe,
    so several orchestrators (threads) may share one platform.
    """

    name: str = "abstract"

    def __init__(self, config: PlatformConfig):
        self.config = config
        self.log = EventLog()

    def start(self) -> None:
        """Bring up whatever the platform needs (a zygote, a Ray connection)."""

    def shares_host_cores(self) -> bool:
        """Whether the functions run on this machine's cores, next to the control plane."""
        return False

    def concurrent_batches(self) -> int:
        """How many batches of one caller may be in flight at once, each answered without waiting for the others
        to be gathered (1: a second batch may wait for the first's `gather`)."""
        return 1

    @abstractmethod
    def deploy(self, spec: FunctionSpec) -> None:
        """Register a function; no instance starts until it is invoked (scale from zero)."""

    def finish_deploy(self) -> None:
        """Every function is deployed: a platform that batches deployments applies them now."""

    @abstractmethod
    def submit(self, calls: Sequence[tuple[str, bytes]]) -> Any:
        """Start every (function id, frame) call; returns a handle for `gather` without waiting for replies."""

    @abstractmethod
    def gather(self, batch: Any) -> list[bytes]:
        """The reply frame of every submitted call, in order (cold-starting, retrying as needed)."""

    def invoke_many(self, calls: Sequence[tuple[str, bytes]]) -> list[bytes]:
        return self.gather(self.submit(calls))

    def invoke(self, function_id: str, frame: bytes) -> bytes:
        return self.invoke_many([(function_id, frame)])[0]

    @abstractmethod
    def close(self) -> None:
        """Stop every instance this platform started."""

    def warm(self, function_ids: Sequence[str]) -> int:
        """Start an instance of each function that has none, without waiting: a hint from a control plane that
        expects to call them soon, so that their cold starts overlap its work. Returns how many started."""
        return 0

    def any_cold(self, function_ids: Sequence[str]) -> bool:
        """Whether `warm` could start any of these functions now (one has no instance): a control plane predicts
        a layer's routing only then. False where the platform does not warm."""
        return False

    def scale_to_zero(self, functions: Sequence[str] | None = None) -> int:
        """Stop every idle instance (of `functions`, or of all) now, as if its keep-alive had run out; returns how
        many stopped."""
        return 0

    def instances(self) -> list[InstanceInfo]:
        return []

    def memory(self) -> dict[str, int]:
        """Expert memory of the function pool: `resident_bytes` (and `budget_bytes` where a budget is set), for
        platforms that hold the functions' weights on this machine; empty elsewhere."""
        return {}

    def processes(self) -> dict[int, Label]:
        """Every process this platform runs on this machine, labelled by role (for metering)."""
        return {}

    def __enter__(self) -> "Platform":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
