"""The embedded FaaS platform (`local`, the default): functions run in host processes on this machine.

A function instance is a function loaded in a host: a long-lived process, forked by a zygote
that has already imported torch, that maps any number of functions' weights and answers
their calls (see `host`). Functions are stateless, so sharing a process costs them nothing,
and it removes what a process per function cost: a fork in every cold start, ~6-10 MB of
process overhead per function (at k = 1 on the full-size model, about as much memory again as
the weights), and one round trip per function and layer.

Every batch of calls (one MoE layer of one control plane) leases an idle host and sends it one
request: functions to unmap, functions to map (their cold starts), then the calls; a batch of
many token rows is split over as many hosts as there are cores (`_groups`). A host serves one
request at a time; concurrent batches (several control planes, private mode) take other hosts:
when none is idle, one more is started, up to `max_instances`, for a batch that has waited
`scale_out_after_s` (at once for the first host, the parts of a split batch and prefetches). A
batch prefers the idle host that already holds most of its functions. A function idle for `keep_alive_s`
is unmapped (scale to zero: its pages stop counting) and a host left holding nothing exits.
A request whose host dies or times out is retried on another host.

Memory: hosts map weights shared from the page cache, so a function costs its weight bytes
once however many hosts map it; the platform counts them (`memory`). With a `memory_budget`,
a cold start that would pass it first unmaps idle functions (by default those of the layers
that come last in the layer cycle after the one that needs room: a decode step sweeps the
layers in order, so they wait longest; `eviction="lru"`: least recently used); the host that
unmaps a function no other host maps also drops its byte ranges from the page cache, in the
same request before it maps anything new, so what is resident is what is counted. With every
resident function in use a call waits, except that one function may start while the pool is
below the budget (it can end above the budget by less than that function's size).

The hot path is plain blocking sockets on the caller's thread: `submit` writes the layer's
request and returns; `gather` reads the reply. The host computes meanwhile, and no event loop
or thread hop sits in between.
"""

from __future__ import annotations

import itertools
import os
import queue
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from faasmoe.functions import wire
from faasmoe.functions.spec import FunctionSpec, drop_from_page_cache, max_frame_bytes
from faasmoe.metering.meter import Label, note_exit
from faasmoe.models.weights import read_ahead
from faasmoe.platforms.base import InstanceInfo, InvocationError, Platform, PlatformConfig
from faasmoe.platforms.local import protocol
from faasmoe.platforms.local.transport import recv_frame, send_frame
from faasmoe.platforms.local.zygote import Zygote, ZygoteError

CONNECT_POLL_S = 0.0005  # a starting host's socket appears within milliseconds: poll finely
EXIT_WAIT_S = 5.0  # how long dropping a dead host's pages waits for it to exit
_CORES = os.cpu_count() or 1  # read once: os.cpu_count() costs ~13 us, and a layer's batch asks for it
SPREAD_ROWS = 16  # a batch with at least this many token rows is split over several hosts (see `_groups`)


class InstanceStartError(InvocationError):
    pass


@dataclass(eq=False)
class _Host:
    name: str
    pid: int | None  # None until the zygote has forked it (outside the platform's lock)
    path: str  # where it listens: a Unix socket here, "ip:port" for a Ray actor (set once it has started)
    sock: socket.socket | None = None
    spawned_at: float = field(default_factory=time.perf_counter)
    started_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = True  # a host is forked for the request that needed it
    loaded: dict[str, float] = field(default_factory=dict)  # function id -> its last call here (monotonic)
    unload: set[str] = field(default_factory=set)  # functions to unmap with its next request
    warm: list[dict] = field(default_factory=list)  # specs whose kernels the zygote runs before forking it
    actor: object = None  # the Ray platform's actor handle


@dataclass(eq=False)
class _Pool:
    """A deployed function and where it is loaded."""

    spec: FunctionSpec
    max_frame: int  # the largest invocation it accepts
    hosts: set[_Host] = field(default_factory=set)  # hosts that map it, or are mapping it now
    users: int = 0  # calls in flight on it, and prefetches
    charged: bool = False  # its weight bytes are counted as resident
    leaving: bool = False  # being unloaded from every host that maps it: its bytes count as going

    def idle(self) -> bool:
        """Loaded, and no call uses it: unloading it disturbs nobody."""
        return bool(self.hosts) and not self.users and not self.leaving


@dataclass(eq=False)
class _Call:
    function: str
    frame: bytes
    pool: _Pool
    reply: bytes | memoryview | None = None  # the answer (or the error frame answering a frame too large)
    errors: list[str] = field(default_factory=list)
    queued_at: float = field(default_factory=time.monotonic)  # when it first asked for a host


@dataclass(eq=False)
class _Request:
    host: _Host
    calls: list[_Call]
    loads: list[_Pool]  # functions the host maps for these calls (their cold starts)
    unloads: list[tuple[_Pool, bool]]  # (function, drop its pages) the host unmaps first
    cold: bool  # the host was forked for it and is not ready yet
    prefetch: bool = False  # loads only, ahead of any call
    sent_at: float = 0.0

    def __post_init__(self):
        self.spawned = self.cold  # its loads' cold starts include the host's own start


@dataclass(eq=False)
class _Batch:
    calls: list[_Call]
    requests: list[_Request] = field(default_factory=list)  # in flight


class LocalPlatform(Platform):
    name = "local"

    def __init__(self, config: PlatformConfig | None = None, test_hooks: dict | None = None):
        """`test_hooks` is for tests only: {"hang_on_frame": n} makes every host hang on its n-th request."""
        super().__init__(config or PlatformConfig())
        self._hang_on = int(dict(test_hooks or {}).get("hang_on_frame", 0))
        self._pools: dict[str, _Pool] = {}
        self._hosts: list[_Host] = []  # ready or starting
        self._lock = threading.Condition()  # guards pools and hosts; notified when a host frees up
        self._zygote: Zygote | None = None
        self._dir = tempfile.mkdtemp(prefix="faasmoe-")
        self._seq = itertools.count()
        self._closed = threading.Event()
        self._reaper: threading.Thread | None = None
        self._janitor: threading.Thread | None = None
        self._warmer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="faasmoe-warm")  # `warm`'s loads
        self._budget = self.config.memory_budget
        self._resident = 0  # weight bytes of loaded functions, and of those whose pages are being dropped
        self._dropping = 0  # of which: functions being unloaded everywhere, or dropped after their host died
        self._drops: queue.SimpleQueue = queue.SimpleQueue()  # (pid to outlive, spec) after a host died

    def shares_host_cores(self) -> bool:
        return True

    def concurrent_batches(self) -> int:
        """Two where a caller's second batch always gets a host while its first holds theirs until gathered: a
        batch spreads over at most `min(cores, max_instances)` hosts (`_groups`), so with fewer cores than
        `max_instances` one more host can always be started; and two cores at least, or the second batch has
        nothing to run on while the caller computes. Under a memory budget the second batch could wait for room
        the first one's functions hold: one. (Per caller: several callers each holding a batch could hold
        every host; the private mode's orchestrators come through the gateway, which says one.)"""
        cores = self._cores()
        return 2 if self._budget is None and 2 <= cores < self.config.max_instances else 1

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._boot()
        self._reaper = threading.Thread(target=self._reap_idle, name="faasmoe-reaper", daemon=True)
        self._reaper.start()
        self._janitor = threading.Thread(target=self._clean, name="faasmoe-janitor", daemon=True)
        self._janitor.start()

    def _boot(self) -> None:
        """Get ready to start hosts: here, the zygote."""
        self._zygote = Zygote.shared()
        self._zygote.wait_ready()  # ready means ready: the first call will not wait for torch to import

    def _cores(self) -> int:
        """Cores the hosts run on: a large batch is split over this many hosts."""
        return _CORES

    def deploy(self, spec: FunctionSpec) -> None:
        with self._lock:
            if spec.id not in self._pools:
                self._pools[spec.id] = _Pool(spec, max_frame_bytes(spec))
                self.log.deployed(spec.id, spec.nbytes)  # listed (with zeros) from deployment on

    def finish_deploy(self) -> None:
        """With `compile_experts`, compile the functions' kernels in the zygote now (seconds), not in the first
        call. With a memory budget, start from a page cache that holds none of the functions' bytes (writing or
        reading the checkpoint leaves them there), so that what is resident is what the platform counts."""
        if self.config.compile_experts and self._zygote is not None:
            with self._lock:
                shapes = self._one_spec_per_shape()
            try:
                self._zygote.warm(shapes, compiled=True)
            except ZygoteError as e:
                raise InstanceStartError(str(e)) from e
        if self._budget is None:
            return
        with self._lock:
            idle = [p.spec for p in self._pools.values() if not p.charged]
        drop_from_page_cache(idle)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            for host in list(self._hosts):
                self._stop_host(host)
            self._lock.notify_all()
        self._warmer.shutdown(wait=False, cancel_futures=True)
        self._drops.put(None)
        for t in (self._reaper, self._janitor):
            if t:
                t.join(timeout=EXIT_WAIT_S + 2)
        try:
            for f in os.listdir(self._dir):
                os.unlink(os.path.join(self._dir, f))
            os.rmdir(self._dir)
        except OSError:
            pass

    # -- invocation --------------------------------------------------------------------------
    def submit(self, calls: Sequence[tuple[str, bytes]]) -> _Batch:
        """Send the batch to an idle host (mapping the functions it lacks), or to one forked for it; a batch that
        finds neither waits in `gather`."""
        batch = _Batch([])
        for fid, frame in calls:
            pool = self._pools.get(fid)
            if pool is None:
                raise KeyError(f"function {fid} is not deployed")
            self.log.invoked(fid)
            call = _Call(fid, frame, pool)
            batch.calls.append(call)
            if len(frame) > pool.max_frame:
                call.reply = wire.encode_error(f"{fid}: frame of {len(frame)} bytes exceeds the {pool.max_frame}"
                                               f"-byte limit (raise FAASMOE_MAX_TOKENS_PER_CALL to send more tokens)")
        groups = self._groups([c for c in batch.calls if c.reply is None])
        try:
            for group in groups:
                self._dispatch(batch, group, wait=False, spread=len(groups) > 1)
        except BaseException:  # nobody will gather this batch: free what it holds
            for req in batch.requests:
                self._fail(req, None)
            raise
        return batch

    def _groups(self, calls: list[_Call]) -> list[list[_Call]]:
        """The batch's calls in one group per host that should run them. A host runs its calls one after another
        on one core, so a batch of many token rows (prefill, a large decode batch) is split over as many hosts as
        there are cores (the control plane only waits meanwhile), each function always in the same part (by its
        block) so that each host keeps loading the same functions. A small batch stays whole: one request is
        cheaper than the parallelism is worth (a single sequence's decode step: ~4 rows)."""
        n = min(self._cores(), self.config.max_instances)
        if n < 2 or sum(_rows(c.frame) for c in calls) < SPREAD_ROWS:
            return [calls] if calls else []
        parts: list[list[_Call]] = [[] for _ in range(n)]
        for c in calls:
            parts[c.pool.spec.block % n].append(c)
        return [p for p in parts if p]

    def gather(self, batch: _Batch) -> list[bytes]:
        """The reply frame of every call, in order; retries calls whose host died or hung.

        A batch never waits for a host while it holds one: its requests in flight are finished first."""
        try:
            while True:
                for req in list(batch.requests):
                    batch.requests.remove(req)
                    self._finish(req)
                if all(c.reply is not None for c in batch.calls):
                    return [c.reply for c in batch.calls]
                self._dispatch(batch, [c for c in batch.calls if c.reply is None], wait=True)
        except BaseException as e:
            for req in batch.requests:
                if isinstance(e, InvocationError):  # a call failed for good: the others' hosts are healthy
                    try:
                        self._finish(req)
                    except Exception:  # noqa: BLE001 - the batch fails with the first error anyway
                        pass
                else:  # interrupted mid-call: those hosts' states are unknown
                    self._fail(req, None)
            batch.requests.clear()
            raise

    def _dispatch(self, batch: _Batch, pending: list[_Call], wait: bool, spread: bool = False) -> None:
        """Lease a host for `pending` and send it what fits in the memory budget (the rest waits for the next
        round); without `wait`, only if a host is free now (or, with `spread`, may be forked now)."""
        if not pending:
            return
        with self._lock:
            req = self._plan(pending, wait, spread)
        if req is not None:
            batch.requests.append(req)
            if req.cold:
                self._launch(req.host)
            else:
                self._send(req)

    def _plan(self, pending: list[_Call], wait: bool, spread: bool = False) -> _Request | None:
        """(Caller holds the lock.) A host and a request for as many of `pending` as the budget lets in."""
        needed = {c.pool for c in pending}
        since = min(c.queued_at for c in pending)
        started = time.monotonic()
        while True:
            if self._closed.is_set():
                raise InvocationError("platform is closed")
            host, cold = self._lease_host(needed, since, spread, may_fork=self._could_fit(needed))
            if host is not None:
                for pool in needed:  # ours now: making room must not unload them
                    pool.users += 1
                    if host in pool.hosts:  # was it about to go? keep it
                        self._unleave(pool)
                loads, fits = [], set()
                for pool in sorted(needed, key=lambda p: p.spec.id):
                    if host in pool.hosts:
                        fits.add(pool)
                    elif self._charge(pool):
                        pool.hosts.add(host)
                        loads.append(pool)
                        fits.add(pool)
                for pool in needed - fits:
                    pool.users -= 1
                calls = [c for c in pending if c.pool in fits]
                if calls:
                    return _Request(host, calls, loads, self._take_unloads(host), cold)
                self._release(host)
                if cold:  # started for nothing: let it go
                    self._stop_host(host)
                if not wait:
                    return None
                if time.monotonic() - started > self.config.cold_start_timeout_s:
                    raise InvocationError(f"function {pending[0].function}: no room within the memory budget for "
                                          f"{self.config.cold_start_timeout_s:g} s (every resident function busy)")
                self._lock.wait(0.1)  # for a call to end or an unload to land (both notify)
                continue
            if not wait:
                return None
            waited = time.monotonic() - since
            live = len(self._hosts)
            self._lock.wait(None if live >= self.config.max_instances
                            else max(0.001, self.config.scale_out_after_s - waited))

    def _lease_host(self, needed: set[_Pool], since: float, spread: bool = False,
                    may_fork: bool = True) -> tuple[_Host | None, bool]:
        """(Caller holds the lock.) The idle host holding most of `needed` (then the most recently used), or a
        new host (started in `_await_ready`) if none is idle, `may_fork`, and the pool of hosts may grow: at once
        for the first host and for a part of a split batch while there are fewer hosts than cores, else after
        `scale_out_after_s`; (None, False) otherwise."""
        idle = [h for h in self._hosts if not h.busy and h.sock is not None]
        if idle:
            host = max(idle, key=lambda h: (sum(h in p.hosts for p in needed), h.last_used))
            host.busy = True
            return host, False
        live = len(self._hosts)
        waited = time.monotonic() - since
        if may_fork and live < self.config.max_instances and (
                live == 0 or waited >= self.config.scale_out_after_s or (spread and live < self._cores())):
            return self._new_host(), True
        return None, False

    def _could_fit(self, needed: set[_Pool]) -> bool:
        """(Caller holds the lock.) Whether a new host could get any of `needed` now: without a budget always;
        with one, if one is resident already or room can be had (free bytes, or idle functions to unload and
        no unloads still landing). A batch waiting for room must not start hosts that would only stop again."""
        if self._budget is None or any(p.charged for p in needed):
            return True
        return not self._dropping and (self._resident < self._budget
                                       or any(p.idle() for p in self._pools.values()))

    def _take_unloads(self, host: _Host) -> list[tuple[_Pool, bool]]:
        """(Caller holds the lock.) The host's pending unloads, each with whether its pages go too: with a budget,
        when no other host maps the function (pages a live process maps cannot be dropped)."""
        out = []
        for fid in sorted(host.unload):
            pool = self._pools[fid]
            out.append((pool, self._budget is not None and pool.hosts == {host}))
        host.unload.clear()
        return out

    def _send(self, req: _Request) -> None:
        msg = protocol.Request([(p.spec.id, drop) for p, drop in req.unloads], [p.spec.to_json() for p in req.loads],
                               [(c.function, c.frame) for c in req.calls])
        req.sent_at = time.perf_counter()
        try:
            send_frame(req.host.sock, protocol.encode_request(msg))
        except OSError:
            pass  # a dead host shows up when its reply is read, and the calls are retried there

    def _finish(self, req: _Request) -> None:
        """Read a request's reply and account for it; a dead, hung or failing host is stopped and its calls are
        queued again (or fail, past `max_retries`)."""
        host = req.host
        try:
            if req.cold:
                self._await_ready(host)
                req.cold = False
                self._send(req)
            raw = recv_frame(host.sock)
            if raw is None:
                raise ConnectionError("connection closed")
            if bytes(raw[:4]) == wire.MAGIC:  # an error frame: the host could not read the request
                raise wire.WireError(wire.error_message(raw))
            rep = protocol.decode_reply(raw)
            if (len(rep.loads), len(rep.results)) != (len(req.loads), len(req.calls)):
                raise wire.WireError("the host's reply does not match its request")
        except (OSError, wire.WireError, InstanceStartError) as e:  # socket.timeout is an OSError
            self._fail(req, e)
            return
        except BaseException:
            self._fail(req, None)
            raise
        dt = time.perf_counter() - req.sent_at
        now = time.monotonic()
        failed: dict[str, str] = {}
        retry: list[_Call] = []
        with self._lock:
            for pool, drop in req.unloads:
                self._unloaded(pool, host, drop)
            for pool, (load_s, error) in zip(req.loads, rep.loads):
                if error:  # its calls (or the prefetch) still hold it: settled when they let go
                    failed[pool.spec.id] = error
                    pool.hosts.discard(host)
                    self.log.event("start_failed", pool.spec.id, host.name, load_s)
                else:
                    host.loaded[pool.spec.id] = now
                    self.log.instances_now(pool.spec.id, len(pool.hosts))
            for call, result in zip(req.calls, rep.results):
                if call.function in failed:
                    retry.append(call)
                    continue
                call.reply = result
                host.loaded[call.function] = now
            for pool in {c.pool for c in req.calls}:  # `_plan` counted each function once
                pool.users -= 1
                self._settle(pool)  # one whose load failed everywhere stops counting
            self._release(host)
            for call in retry:  # past max_retries this raises: every count above is settled by then
                self._retry(call, InstanceStartError(f"host {host.name} failed to load {call.function}: "
                                                     f"{failed[call.function]}"))
        for pool, (load_s, error) in zip(req.loads, rep.loads):
            if not error:
                spawn = time.perf_counter() - host.spawned_at if req.spawned else 0.0
                self.log.event("prefetch" if req.prefetch else "cold_start", pool.spec.id, host.name,
                               max(spawn, load_s), load_s)
        loaded = {p.spec.id for p in req.loads}
        share = dt / max(1, len(req.calls))  # the host's busy time, split among the calls it ran
        for call in req.calls:
            if call.reply is not None:
                self.log.called(call.function, share, warm_hit=call.function not in loaded)

    def _retry(self, call: _Call, error: Exception) -> None:
        """(Caller holds the lock.) Count a failed attempt; past `max_retries` the call fails for good."""
        call.errors.append(str(error))
        if len(call.errors) > self.config.max_retries:
            raise InvocationError(f"function {call.function} failed after {len(call.errors)} attempts: "
                                  + "; ".join(call.errors)) from error
        self.log.retried(call.function)

    def _fail(self, req: _Request, error: Exception | None) -> None:
        """Stop the request's host (a dead or hung one, or one whose state is unknown) and queue its calls
        again; `error` None: an interruption, nothing is retried."""
        host = req.host
        with self._lock:
            for pool in {c.pool for c in req.calls}:
                pool.users -= 1
            self._stop_host(host)
            self._lock.notify_all()
            if error is None:
                return
            started = not isinstance(error, InstanceStartError)
            if started:
                kind = "timeout" if isinstance(error, TimeoutError) else "crash"
                message = f"host {host.name} " + ("timed out" if kind == "timeout" else
                                                  f"died ({type(error).__name__}: {error})")
            else:
                kind, message = "start_failed", str(error)
            took = time.perf_counter() - (req.sent_at if started else host.spawned_at)
            for fid in {c.function for c in req.calls} | {p.spec.id for p in req.loads}:
                self.log.event(kind, fid, host.name, took)
            for call in req.calls:
                self._retry(call, InvocationError(message))

    def _release(self, host: _Host) -> None:
        """(Caller holds the lock.) The host is free again; one left holding nothing exits."""
        host.busy = False
        host.last_used = time.monotonic()
        if not host.loaded and not host.unload and host.sock is not None:
            self._stop_host(host)
        self._lock.notify_all()

    # -- hosts -------------------------------------------------------------------------------
    def _new_host(self) -> _Host:
        """(Caller holds the lock.) The record of a host to start: `_await_ready` forks it, outside the lock (a
        fork, and the zygote's first warm-up of each function shape, must not stall every other call)."""
        name = f"host{next(self._seq)}"
        host = _Host(name, None, os.path.join(self._dir, f"{name}.sock"), warm=self._one_spec_per_shape())
        self._hosts.append(host)
        return host

    def _one_spec_per_shape(self) -> list[dict]:
        """(Caller holds the lock.) A deployed spec of each function shape: the zygote warms their kernels once."""
        shapes = {}
        for pool in self._pools.values():
            shapes.setdefault(pool.spec.shape, pool.spec)
        return [s.to_json() for s in shapes.values()]

    def _launch(self, host: _Host) -> None:
        """(Without the lock.) Begin starting a new host that a request was just planned on, where a start takes
        long enough that several should overlap (a split batch's hosts); `_await_ready` completes it. Here a
        fork takes milliseconds and happens in `_start`."""

    def _start(self, host: _Host) -> None:
        """Fork the host from the zygote; one stopped meanwhile (`close`) is killed at once."""
        if self._zygote is None:
            raise InstanceStartError("the platform is not started")
        try:
            pid = self._zygote.fork(host.path, self.config.threads_per_instance, host.warm, self._hang_on,
                                    self.config.compile_experts)
        except ZygoteError as e:
            raise InstanceStartError(str(e)) from e
        with self._lock:
            host.pid = pid
            stopped = host not in self._hosts
        if stopped:
            _kill(pid)
            raise InstanceStartError(f"host {host.name} was stopped while it started")

    def _await_ready(self, host: _Host) -> None:
        """Start a new host, connect to it and wait for its READY frame."""
        if host.pid is None:
            self._start(host)
        deadline = host.spawned_at + self.config.cold_start_timeout_s
        sock = self._connect(host, deadline)
        try:
            sock.settimeout(max(0.1, deadline - time.perf_counter()))
            try:
                wire.decode_ready(recv_frame(sock) or b"")
            except (OSError, wire.WireError) as e:
                raise InstanceStartError(f"host {host.name} failed to start (see its stderr): {e}") from e
            sock.settimeout(self.config.invoke_timeout_s)
        except BaseException:
            sock.close()
            raise
        host.sock = sock
        host.started_at = host.last_used = time.monotonic()

    def _connect(self, host: _Host, deadline: float) -> socket.socket:
        """A connection to the started host (by `deadline`, a perf_counter time), ready to read its READY frame."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            while True:
                try:
                    sock.connect(host.path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if not _alive(host.pid):
                        raise InstanceStartError(f"host {host.name} exited during start (see its stderr)")
                    if time.perf_counter() > deadline:
                        raise InstanceStartError(f"host {host.name} did not start in "
                                                 f"{self.config.cold_start_timeout_s:g} s")
                    time.sleep(CONNECT_POLL_S)
        except BaseException:
            sock.close()
            raise
        return sock

    def _end(self, host: _Host) -> None:
        """(Caller holds the lock.) End the host's process (SIGKILL: a host holds no state worth a goodbye, and a
        hung one ignores SIGTERM); quick, it is called under the lock."""
        if host.pid is not None:
            note_exit(host.pid)  # its final CPU counter and exit time, for the meters of this process
            _kill(host.pid)
        try:
            os.unlink(host.path)
        except OSError:
            pass

    def _stop_host(self, host: _Host) -> None:
        """(Caller holds the lock.) End a host's process; the functions it mapped are no longer loaded there."""
        if host in self._hosts:
            self._hosts.remove(host)
        if host.sock is not None:
            host.sock.close()
        host.sock = None
        self._end(host)
        host.unload.clear()
        host.loaded.clear()
        for pool in self._pools.values():
            if host in pool.hosts:
                pool.hosts.discard(host)
                self.log.instances_now(pool.spec.id, len(pool.hosts))
                self._settle(pool, died=host.pid)

    # -- prefetch ----------------------------------------------------------------------------
    def any_cold(self, function_ids: Sequence[str]) -> bool:
        """Whether one of them has no host and would fit in the free budget (`warm` never makes room). Without
        the lock: a hint, read once per layer by the control plane."""
        budget, resident = self._budget, self._resident
        return any(not pool.hosts and (budget is None or resident + pool.spec.nbytes <= budget)
                   for f in function_ids if (pool := self._pools.get(f)) is not None)

    def warm(self, function_ids: Sequence[str]) -> int:
        """Load functions that are not loaded anywhere, ahead of their calls: their bytes are read into the page
        cache now (POSIX_FADV_WILLNEED, the kernel reads while the caller computes) and a host maps them as soon
        as one is free. Only into free budget: a hint never unloads anything."""
        todo = []
        with self._lock:
            for fid in function_ids:
                pool = self._pools.get(fid)
                if (pool is not None and not pool.hosts and not pool.users and not self._closed.is_set()
                        and self._charge(pool, make_room=False)):
                    pool.users += 1  # the prefetch holds it until a host has mapped it
                    todo.append(pool)
        if todo:
            try:
                read_ahead(t for p in todo for t in p.spec.tensors)
            except OSError:  # a hint: the load reads them anyway
                pass
            self._warmer.submit(self._warm, todo)
        return len(todo)

    def _warm(self, pools: list[_Pool]) -> None:
        req = None
        try:
            with self._lock:
                host, cold = None, False
                while host is None and not self._closed.is_set():
                    host, cold = self._lease_host(set(pools), time.monotonic() - self.config.scale_out_after_s)
                    if host is None:
                        self._lock.wait(None)
                if host is None:
                    raise InvocationError("platform is closed")
                for pool in pools:
                    pool.hosts.add(host)
                req = _Request(host, [], pools, self._take_unloads(host), cold, prefetch=True)
            if cold:
                self._launch(host)
            else:
                self._send(req)
            self._finish(req)
        except Exception:  # noqa: BLE001 - a hint: the next call loads them the ordinary way
            pass
        finally:
            with self._lock:
                for pool in pools:
                    pool.users -= 1
                    self._settle(pool)
                self._lock.notify_all()

    # -- memory ------------------------------------------------------------------------------
    def _charge(self, pool: _Pool, make_room: bool = True) -> bool:
        """(Caller holds the lock.) Count the pool's weight bytes as resident if they are not yet, within the
        budget: True if a host may map it now. `make_room`: unload idle functions for it."""
        if pool.charged:  # its pages are counted already: another host maps them
            self._unleave(pool)
            return True
        need = pool.spec.nbytes
        budget = self._budget
        if budget is not None and self._resident + need > budget:
            if not make_room:
                return False
            self._make_room(need, budget, pool.spec.layer)
            if self._resident + need > budget and (self._dropping or self._resident >= budget):
                return False  # unloads still landing, or over budget with everything in use: wait
        pool.charged = True
        self._resident += need
        return True

    def _make_room(self, need: int, budget: int, layer: int) -> None:
        """Unload idle functions until `need` more bytes fit for a function of `layer` (counting the bytes being
        unloaded as gone already), in the order of the `eviction` policy."""
        layers = 1 + max(p.spec.layer for p in self._pools.values())

        def recency(p: _Pool) -> float:
            return max(h.loaded.get(p.spec.id, 0.0) for h in p.hosts)

        def next_use(p: _Pool) -> tuple[int, float]:  # needed last in the layer cycle first, then LRU
            return -((p.spec.layer - layer - 1) % layers), recency(p)  # this layer's idle ones: a cycle away

        idle = sorted((p for p in self._pools.values() if p.charged and p.idle()),
                      key=next_use if self.config.eviction == "next-use" else recency)
        now = time.monotonic()
        for pool in idle:
            if self._resident - self._dropping + need <= budget:
                return
            self._unload(pool, "budget_eviction", now)

    def _unload(self, pool: _Pool, kind: str, now: float) -> None:
        """(Caller holds the lock.) Unload an idle function from every host that maps it (at each host's next
        request, or by the janitor if the host stays idle); its bytes count as going from now on."""
        for host in pool.hosts:
            host.unload.add(pool.spec.id)
            self.log.event(kind, pool.spec.id, host.name, now - host.loaded.get(pool.spec.id, now))
        pool.leaving = True
        self._dropping += pool.spec.nbytes
        self._lock.notify_all()  # the janitor

    def _unleave(self, pool: _Pool) -> None:
        """(Caller holds the lock.) A function being unloaded is wanted again before it went."""
        if pool.leaving:
            pool.leaving = False
            self._dropping -= pool.spec.nbytes
            for host in pool.hosts:
                host.unload.discard(pool.spec.id)

    def _unloaded(self, pool: _Pool, host: _Host, dropped: bool) -> None:
        """(Caller holds the lock.) The host has unmapped the function (and `dropped` its pages)."""
        host.loaded.pop(pool.spec.id, None)
        pool.hosts.discard(host)
        self.log.instances_now(pool.spec.id, len(pool.hosts))
        self._settle(pool, dropped=dropped)

    def _settle(self, pool: _Pool, dropped: bool = False, died: int | None = None) -> None:
        """(Caller holds the lock.) A function no host maps any more stops counting. With a budget, its pages are
        dropped first unless the last host to unmap it did (two hosts unmapping it at once each see the other
        still mapping it, so neither may): by the janitor, after `died` (a dead host's pid) has exited."""
        if not pool.charged or pool.hosts or pool.users:
            return
        pool.charged = False
        if pool.leaving:
            pool.leaving = False
            self._dropping -= pool.spec.nbytes
        if self._budget is not None and not dropped:
            self._dropping += pool.spec.nbytes
            self._drops.put((died, pool.spec))
            self._lock.notify_all()
            return
        self._resident -= pool.spec.nbytes

    def memory(self) -> dict[str, int]:
        with self._lock:
            out = {"resident_bytes": self._resident}
        if self._budget is not None:
            out["budget_bytes"] = int(self._budget)
        return out

    # -- background work ---------------------------------------------------------------------
    def _reap_idle(self) -> None:
        """Scale to zero: unload every function idle for longer than the keep-alive."""
        period = min(1.0, max(0.02, self.config.keep_alive_s / 4))
        while not self._closed.wait(period):
            self._evict(self.config.keep_alive_s)

    def _evict(self, min_idle_s: float, functions: Sequence[str] | None = None) -> int:
        now = time.monotonic()
        n = 0
        with self._lock:
            pools = self._pools.values() if functions is None else [self._pools[f] for f in functions]
            for pool in pools:
                if pool.idle() and all(now - h.loaded.get(pool.spec.id, now) >= min_idle_s for h in pool.hosts):
                    self._unload(pool, "eviction", now)
                    n += 1
        return n

    def scale_to_zero(self, functions: Sequence[str] | None = None) -> int:
        """Unload every idle function (of `functions`, or all) now; returns how many, once their hosts have
        unmapped them. A host left holding nothing exits."""
        n = self._evict(0.0, functions)
        deadline = time.monotonic() + self.config.invoke_timeout_s
        with self._lock:
            while any(p.leaving for p in self._pools.values()) and time.monotonic() < deadline:
                self._lock.wait(0.05)
        return n

    def _clean(self) -> None:
        """The janitor: flushes pending unloads on idle hosts (a busy host's next request carries them), and drops
        the pages of functions whose host died."""
        while not self._closed.is_set():
            try:
                while (item := self._drops.get_nowait()) is not None:
                    self._drop_after_exit(*item)
                return  # None: closing
            except queue.Empty:
                pass
            with self._lock:
                host = next((h for h in self._hosts if h.unload and not h.busy and h.sock is not None), None)
                if host is None:
                    self._lock.wait(0.1)
                    continue
                host.busy = True
                req = _Request(host, [], [], self._take_unloads(host), False)
            try:
                self._send(req)
                self._finish(req)
            except Exception:  # noqa: BLE001 - the janitor must outlive any one host (a failed one is stopped)
                pass

    def _drop_after_exit(self, pid: int | None, spec: FunctionSpec) -> None:
        try:
            deadline = time.monotonic() + EXIT_WAIT_S
            while pid is not None and _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.001)
            drop_from_page_cache([spec])
        finally:  # whatever happened, the bytes stop counting: a stuck count would block every cold start
            with self._lock:
                self._dropping -= spec.nbytes
                self._resident -= spec.nbytes
                self._lock.notify_all()

    # -- introspection -----------------------------------------------------------------------
    def instances(self) -> list[InstanceInfo]:
        """One per function loaded in a host (the host's pid: several functions share one)."""
        with self._lock:
            return [InstanceInfo(fid, f"{fid}@{h.name}", h.pid, self._pools[fid].users > 0, h.started_at, last)
                    for h in self._hosts for fid, last in h.loaded.items()]

    def hosts(self) -> list[int]:
        """Pids of the running host processes."""
        with self._lock:
            return [h.pid for h in self._hosts if h.pid is not None]

    def processes(self) -> dict[int, Label]:
        with self._lock:
            out = {h.pid: Label("function") for h in self._hosts if h.pid is not None}
        if self._zygote and self._zygote.alive:
            out[self._zygote.pid] = Label("zygote")
        return out


def _rows(frame: bytes) -> int:
    """Token rows an invocation frame carries (0 for a malformed one: its function answers it with an error)."""
    try:
        return wire.decode_header(frame).T
    except wire.WireError:
        return 0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped) is not alive
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
