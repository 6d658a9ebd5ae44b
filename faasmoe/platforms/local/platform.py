"""The embedded FaaS platform (`local`, the default): instances are real processes on this machine.

Instances are forked by a zygote (shared by the platforms of this process) that has
already imported torch, serve one Unix
socket each and take one call at a time. An instance idle for `keep_alive_s` is
stopped (scale to zero: its process exits and its memory goes back to the OS); the
next call cold-starts a new one. When every instance of a function is busy, a new
one starts, up to `max_instances`, but only for a call that has waited `scale_out_after_s`
for a busy one (a function with no instance starts one at once); past that, calls wait
their turn. A call whose
instance dies or times out is retried on another instance. A frame larger than its
function may legally get (`spec.max_frame_bytes`) is answered with an error frame here,
without bothering an instance that would refuse it anyway.

Memory: a function's instances map its weights shared from the page cache, so a
function costs its weight bytes once however many instances it has. The platform
counts them (`memory`). With a `memory_budget`, a cold start that would pass it first
stops idle functions (by default those of the layers that come last in the layer cycle
after the one that needs room: a decode step sweeps the layers in order, so they wait
longest; `eviction="lru"`: least recently used) and drops their byte ranges from the
page cache once their processes are gone (the pages then really return to the OS); a
function stopped for its keep-alive is dropped the same way. With every resident
function busy a call waits, except that one function may start while the pool is below
the budget (it can end above the budget by less than that function's size).

The hot path is plain blocking sockets on the caller's thread: `submit` writes every
frame of a MoE layer to its instance and returns; `gather` reads the replies. The
instances compute in parallel meanwhile, and no event loop or thread hop sits in
between (measured here: a loop-based version spent 0.5 ms per call in overhead).
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
from faasmoe.functions.spec import FunctionSpec, max_frame_bytes
from faasmoe.metering.meter import Label, note_exit
from faasmoe.metering.pagecache import evict_ranges
from faasmoe.platforms.base import InstanceInfo, InvocationError, Platform, PlatformConfig
from faasmoe.platforms.local.transport import recv_frame, send_frame
from faasmoe.platforms.local.zygote import Zygote, ZygoteError

CONNECT_POLL_S = 0.0005  # a starting instance's socket appears within milliseconds: poll finely
EXIT_WAIT_S = 5.0  # how long dropping a function's pages waits for its SIGKILLed instances to exit


class InstanceStartError(InvocationError):
    pass


@dataclass(eq=False)
class _Instance:
    name: str
    pid: int
    path: str
    sock: socket.socket | None = None
    load_s: float = 0.0
    spawned_at: float = field(default_factory=time.perf_counter)
    started_at: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = True  # an instance is created for the call that needed it
    used: bool = False


@dataclass(eq=False)
class _Pool:
    spec: FunctionSpec
    max_frame: int  # the largest invocation its instances accept
    instances: list[_Instance] = field(default_factory=list)  # ready ones
    starting: int = 0
    charged: bool = False  # its weight bytes are counted as resident
    stopped: list[int] = field(default_factory=list)  # pids of its instances stopped since it was charged

    def idle(self) -> bool:
        """Has instances, none of them busy or starting: stopping it disturbs no call."""
        return bool(self.instances) and not self.starting and not any(i.busy for i in self.instances)


@dataclass(eq=False)
class _Call:
    function: str
    frame: bytes
    pool: _Pool
    inst: _Instance | None = None
    cold: bool = False  # `inst` was forked for this call and is not ready yet
    sent_at: float = 0.0
    errors: list[str] = field(default_factory=list)
    refused: bytes | None = None  # the error frame answering a frame no instance would accept
    queued_at: float = field(default_factory=time.monotonic)  # when it first asked for an instance


class LocalPlatform(Platform):
    name = "local"

    def __init__(self, config: PlatformConfig | None = None, test_hooks: dict | None = None):
        """`test_hooks` is for tests only: passed to every instance (see `worker`), e.g. {"hang_on_frame": 1}."""
        super().__init__(config or PlatformConfig())
        self._test_hooks = dict(test_hooks or {})
        self._pools: dict[str, _Pool] = {}
        self._lock = threading.Condition()  # guards pools and instances; notified when one frees up
        self._zygote: Zygote | None = None
        self._dir = tempfile.mkdtemp(prefix="faasmoe-")
        self._seq = itertools.count()
        self._closed = threading.Event()
        self._reaper: threading.Thread | None = None
        self._warmer = ThreadPoolExecutor(max_workers=4, thread_name_prefix="faasmoe-warm")  # `warm`'s cold starts
        self._budget = self.config.memory_budget
        self._resident = 0  # weight bytes of functions with an instance, and of those whose pages are being dropped
        self._dropping = 0  # of which: stopped functions whose pages are being dropped
        self._drops: queue.SimpleQueue = queue.SimpleQueue()  # (pids to outlive, spec) for the dropper
        self._dropper: threading.Thread | None = None

    def shares_host_cores(self) -> bool:
        return True

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._zygote = Zygote.shared()
        self._zygote.wait_ready()  # ready means ready: the first call will not wait for torch to import
        self._reaper = threading.Thread(target=self._reap_idle, name="faasmoe-reaper", daemon=True)
        self._reaper.start()
        if self._budget is not None:
            self._dropper = threading.Thread(target=self._drop_pages, name="faasmoe-dropper", daemon=True)
            self._dropper.start()

    def deploy(self, spec: FunctionSpec) -> None:
        with self._lock:
            if spec.id not in self._pools:
                self._pools[spec.id] = _Pool(spec, max_frame_bytes(spec))
                self.log.function(spec.id)  # listed (with zeros) from deployment on

    def finish_deploy(self) -> None:
        """With a memory budget, start from a page cache that holds none of the functions' bytes (writing or
        reading the checkpoint leaves them there), so that what is resident is what the platform counts."""
        if self._budget is None:
            return
        with self._lock:
            idle = [p.spec for p in self._pools.values() if not p.charged]
        _drop_from_page_cache(idle)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with self._lock:
            for pool in self._pools.values():
                for inst in list(pool.instances):
                    self._stop(pool, inst)
            self._lock.notify_all()
        self._warmer.shutdown(wait=False, cancel_futures=True)
        if self._reaper:
            self._reaper.join(timeout=2)
        if self._dropper:
            self._drops.put(None)
            self._dropper.join(timeout=EXIT_WAIT_S + 2)
        try:
            for f in os.listdir(self._dir):
                os.unlink(os.path.join(self._dir, f))
            os.rmdir(self._dir)
        except OSError:
            pass

    # -- invocation --------------------------------------------------------------------------
    def submit(self, calls: Sequence[tuple[str, bytes]]) -> list[_Call]:
        """Send every call that finds a warm instance; fork instances for the others (they start in parallel).

        The warm ones are all leased first: making room within the memory budget for a cold one stops only idle
        functions, and this batch's own warm functions must not be among them."""
        batch, cold = [], []
        for fid, frame in calls:
            pool = self._pools.get(fid)
            if pool is None:
                raise KeyError(f"function {fid} is not deployed")
            self.log.invoked(fid)
            call = _Call(fid, frame, pool)
            batch.append(call)
            if len(frame) > pool.max_frame:
                call.refused = wire.encode_error(f"{fid}: frame of {len(frame)} bytes exceeds the {pool.max_frame}"
                                                 f"-byte limit (raise FAASMOE_MAX_TOKENS_PER_CALL to send more tokens)")
                continue
            if self._lease_idle(call):
                self._send(call)
            else:
                cold.append(call)
        for call in cold:
            self._lease(call, wait=False)
            if call.inst is not None and not call.cold:
                self._send(call)
        return batch

    def gather(self, batch: list[_Call]) -> list[bytes]:
        """The reply frame of every call, in order; retries a call whose instance died or hung.

        Calls that hold an instance are finished first: a call still waiting for one (a full pool, the memory
        budget) must never wait on an instance that only this thread would free by reading its reply."""
        out: list[bytes] = [b""] * len(batch)
        done = 0
        try:
            for i in sorted(range(len(batch)), key=lambda i: batch[i].inst is None):
                out[i] = self._complete(batch[i])
                done += 1
        finally:
            if done < len(batch):  # a call failed: the others' instances must not stay leased (and counted)
                for call in batch:
                    if call.inst is not None and call.inst.busy:
                        self._drop(call)
        return out

    def _complete(self, call: _Call) -> bytes:
        if call.refused is not None:
            return call.refused
        while True:
            try:
                if call.inst is None:
                    self._lease(call, wait=True)
                if call.cold:
                    self._await_ready(call)
                    self._send(call)
                elif not call.sent_at:
                    self._send(call)
                reply = recv_frame(call.inst.sock)
                if reply is None:
                    raise ConnectionError("connection closed")
            except (OSError, wire.WireError, InstanceStartError) as e:  # socket.timeout is an OSError
                if isinstance(e, InstanceStartError):  # killed, hung or failing while it started
                    call.errors.append(str(e))
                else:
                    kind = "timeout" if isinstance(e, TimeoutError) else "crash"
                    call.errors.append(f"instance {call.inst.name} "
                                       + ("timed out" if kind == "timeout" else f"died ({type(e).__name__})"))
                    self.log.event(kind, call.function, call.inst.name, time.perf_counter() - call.sent_at)
                self._drop(call)
                if len(call.errors) > self.config.max_retries:
                    raise InvocationError(f"function {call.function} failed after {len(call.errors)} attempts: "
                                          + "; ".join(call.errors)) from e
                self.log.retried(call.function)
                continue
            except BaseException:  # interrupted mid-call: the instance's state is unknown
                self._drop(call)
                raise
            dt = time.perf_counter() - call.sent_at
            inst = call.inst
            self.log.called(call.function, dt, warm_hit=inst.used)
            with self._lock:
                inst.used = True
                inst.busy = False
                inst.last_used = time.monotonic()
                self._lock.notify_all()
            return reply

    def _lease_idle(self, call: _Call) -> bool:
        """Give the call an idle instance of its function if there is one."""
        with self._lock:
            return not self._closed.is_set() and self._take_idle(call)

    def _take_idle(self, call: _Call) -> bool:
        """(Caller holds the lock.) Lease the call its function's most recently used idle instance, if any, so that
        the others go idle and scale to zero."""
        idle = [i for i in call.pool.instances if not i.busy]
        if not idle:
            return False
        call.inst = max(idle, key=lambda i: i.last_used)
        call.inst.busy = True
        call.cold = False
        return True

    def _lease(self, call: _Call, wait: bool) -> None:
        """Give the call an idle instance, or fork one for it if the function may scale out; else wait or leave."""
        pool = call.pool
        with self._lock:
            while True:
                if self._closed.is_set():
                    raise InvocationError("platform is closed")
                if self._take_idle(call):
                    return
                live = len(pool.instances) + pool.starting
                waited = time.monotonic() - call.queued_at
                if live < self.config.max_instances and (live == 0 or waited >= self.config.scale_out_after_s):
                    if self._charge(pool):
                        pool.starting += 1
                        break
                    if not wait:  # over the memory budget with nothing idle to stop: wait in `gather`
                        return
                    if waited > self.config.cold_start_timeout_s:
                        raise InvocationError(f"function {pool.spec.id}: no room within the memory budget for "
                                              f"{self.config.cold_start_timeout_s:g} s (every resident function busy)")
                    self._lock.wait(0.1)  # for a call to end or a drop to land (both notify)
                    continue
                if not wait:
                    return
                self._lock.wait(None if live >= self.config.max_instances
                                else self.config.scale_out_after_s - waited)
        try:
            call.inst = self._fork(pool.spec)
            call.cold = True
        except BaseException:
            with self._lock:
                pool.starting -= 1
                self._settle(pool)
                self._lock.notify_all()
            raise

    def _send(self, call: _Call) -> None:
        call.sent_at = time.perf_counter()
        try:
            send_frame(call.inst.sock, call.frame)
        except OSError:
            pass  # a dead instance shows up when its reply is read, and the call is retried there

    def _drop(self, call: _Call) -> None:
        inst, pool = call.inst, call.pool
        call.inst, call.sent_at = None, 0.0
        if inst is None:
            return
        with self._lock:
            if call.cold:
                pool.starting -= 1
            self._stop(pool, inst)
            self._lock.notify_all()
        call.cold = False

    # -- instances ---------------------------------------------------------------------------
    def _fork(self, spec: FunctionSpec) -> _Instance:
        name = f"{spec.id}.{next(self._seq)}"
        path = os.path.join(self._dir, f"{name}.sock")
        if self._zygote is None:
            raise InstanceStartError("the platform is not started")
        try:
            spec_json = {**spec.to_json(), "test_hooks": self._test_hooks} if self._test_hooks else spec.to_json()
            pid = self._zygote.fork(spec_json, path, self.config.threads_per_instance)
        except ZygoteError as e:
            raise InstanceStartError(str(e)) from e
        return _Instance(name, pid, path)

    def warm(self, function_ids: Sequence[str]) -> int:
        todo = []
        with self._lock:
            for fid in function_ids:
                pool = self._pools.get(fid)
                if (pool is not None and not pool.instances and not pool.starting and not self._closed.is_set()
                        and self._charge(pool, make_room=False)):  # a hint: only into free budget
                    pool.starting += 1
                    todo.append(pool)
        for pool in todo:
            self._warmer.submit(self._warm_one, pool)
        return len(todo)

    def _warm_one(self, pool: _Pool) -> None:
        """Fork an instance for nobody in particular; once ready it waits idle for the first call."""
        inst = None
        try:
            inst = self._fork(pool.spec)
            self._ready(pool, inst, "prefetch")
        except Exception:  # a hint: the next call starts one the ordinary way
            with self._lock:
                pool.starting -= 1
                if inst is not None:
                    self._stop(pool, inst)
                self._settle(pool)
                self._lock.notify_all()
            return
        with self._lock:
            inst.busy, inst.used = False, True  # its first call is a warm hit: that call started nothing
            inst.last_used = time.monotonic()
            if self._closed.is_set():
                self._stop(pool, inst)
            self._lock.notify_all()

    def _await_ready(self, call: _Call) -> None:
        self._ready(call.pool, call.inst)
        call.cold = False

    def _ready(self, pool: _Pool, inst: _Instance, kind: str = "cold_start") -> None:
        """Connect to a forked instance, wait for its READY frame (the end of its cold start), add it to its pool."""
        deadline = inst.spawned_at + self.config.cold_start_timeout_s
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            while True:
                try:
                    sock.connect(inst.path)
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    if not _alive(inst.pid):
                        raise InstanceStartError(f"instance {inst.name} exited during start (see its stderr)")
                    if time.perf_counter() > deadline:
                        raise InstanceStartError(f"instance {inst.name} did not start in "
                                                 f"{self.config.cold_start_timeout_s:g} s")
                    time.sleep(CONNECT_POLL_S)
            sock.settimeout(max(0.1, deadline - time.perf_counter()))
            try:
                inst.load_s = wire.decode_ready(recv_frame(sock) or b"")
            except (OSError, wire.WireError) as e:
                raise InstanceStartError(f"instance {inst.name} failed while loading its weights "
                                         f"(see its stderr): {e}") from e
            sock.settimeout(self.config.invoke_timeout_s)
        except BaseException:
            sock.close()
            self.log.event("start_failed", pool.spec.id, inst.name, time.perf_counter() - inst.spawned_at)
            raise
        inst.sock = sock
        with self._lock:
            pool.starting -= 1
            inst.started_at = inst.last_used = time.monotonic()
            pool.instances.append(inst)
            self.log.instances_now(pool.spec.id, len(pool.instances))
        self.log.event(kind, pool.spec.id, inst.name, time.perf_counter() - inst.spawned_at, inst.load_s)

    def _stop(self, pool: _Pool, inst: _Instance) -> None:
        """Stop an instance (caller holds the lock): close its socket, end its process."""
        if inst in pool.instances:
            pool.instances.remove(inst)
        if inst.sock is not None:
            inst.sock.close()
        note_exit(inst.pid)  # its final CPU counter and exit time, for the meters of this process
        _kill(inst.pid)  # SIGKILL: an instance holds no state worth a goodbye, and a hung one ignores SIGTERM
        try:
            os.unlink(inst.path)
        except OSError:
            pass
        self.log.instances_now(pool.spec.id, len(pool.instances))
        pool.stopped.append(inst.pid)
        self._settle(pool)

    # -- memory ------------------------------------------------------------------------------
    def _charge(self, pool: _Pool, make_room: bool = True) -> bool:
        """(Caller holds the lock.) Count the pool's weight bytes as resident if they are not yet, within the
        budget: True if its next instance may start now. `make_room`: stop idle functions for it."""
        if pool.charged:  # its pages are counted already: another instance shares them
            return True
        need = pool.spec.nbytes
        budget = self._budget
        if budget is not None and self._resident + need > budget:
            if not make_room:
                return False
            self._make_room(need, budget, pool.spec.layer)
            if self._resident + need > budget and (self._dropping or self._resident >= budget):
                return False  # drops still landing, or over budget with everything busy: wait
        pool.charged = True
        self._resident += need
        return True

    def _make_room(self, need: int, budget: int, layer: int) -> None:
        """Stop idle functions until `need` more bytes fit for a function of `layer` (counting the pages being
        dropped as gone already), in the order of the `eviction` policy."""
        layers = 1 + max(p.spec.layer for p in self._pools.values())

        def recency(p: _Pool) -> float:
            return max(i.last_used for i in p.instances)

        def next_use(p: _Pool) -> tuple[int, float]:  # needed last in the layer cycle first, then LRU
            return -((p.spec.layer - layer - 1) % layers), recency(p)  # this layer's idle ones: a cycle away

        idle = sorted((p for p in self._pools.values() if p.charged and p.idle()),
                      key=next_use if self.config.eviction == "next-use" else recency)
        now = time.monotonic()
        for pool in idle:
            if self._resident - self._dropping + need <= budget:
                return
            for inst in list(pool.instances):
                self._stop(pool, inst)
                self.log.event("budget_eviction", pool.spec.id, inst.name, now - inst.last_used)

    def _settle(self, pool: _Pool) -> None:
        """(Caller holds the lock.) A pool left without instances stops counting: at once without a budget; with
        one, once the dropper has dropped its pages, after every instance it stopped has exited (pages a live
        process maps cannot be dropped)."""
        if not pool.charged or pool.instances or pool.starting:
            return
        pool.charged = False
        pids, pool.stopped = pool.stopped, []
        if self._budget is None:
            self._resident -= pool.spec.nbytes
            return
        self._dropping += pool.spec.nbytes
        self._drops.put((pids, pool.spec))

    def _drop_pages(self) -> None:
        """Drop stopped functions' byte ranges from the page cache, so that their memory really goes back."""
        while (item := self._drops.get()) is not None:
            pids, spec = item
            try:
                deadline = time.monotonic() + EXIT_WAIT_S
                while any(_alive(p) for p in pids) and time.monotonic() < deadline:
                    time.sleep(0.001)
                _drop_from_page_cache([spec])
            finally:  # whatever happened, the bytes stop counting: a stuck count would block every cold start
                with self._lock:
                    self._dropping -= spec.nbytes
                    self._resident -= spec.nbytes
                    self._lock.notify_all()

    def memory(self) -> dict[str, int]:
        with self._lock:
            out = {"resident_bytes": self._resident}
        if self._budget is not None:
            out["budget_bytes"] = int(self._budget)
        return out

    def _reap_idle(self) -> None:
        """Scale to zero: stop every instance idle for longer than the keep-alive."""
        period = min(1.0, max(0.02, self.config.keep_alive_s / 4))
        while not self._closed.wait(period):
            self._evict(self.config.keep_alive_s)

    def _evict(self, min_idle_s: float) -> int:
        now = time.monotonic()
        n = 0
        with self._lock:
            for pool in self._pools.values():
                for inst in [i for i in pool.instances if not i.busy]:
                    idle = now - inst.last_used
                    if idle >= min_idle_s:
                        self._stop(pool, inst)
                        self.log.event("eviction", pool.spec.id, inst.name, idle)
                        n += 1
        return n

    def scale_to_zero(self) -> int:
        return self._evict(0.0)

    # -- introspection -----------------------------------------------------------------------
    def instances(self) -> list[InstanceInfo]:
        with self._lock:
            return [InstanceInfo(p.spec.id, i.name, i.pid, i.busy, i.started_at, i.last_used)
                    for p in self._pools.values() for i in p.instances]

    def processes(self) -> dict[int, Label]:
        with self._lock:
            out = {i.pid: Label("function") for p in self._pools.values() for i in p.instances}
        if self._zygote and self._zygote.alive:
            out[self._zygote.pid] = Label("zygote")
        return out


def _drop_from_page_cache(specs: Sequence[FunctionSpec]) -> None:
    """Drop the functions' weight bytes from the page cache (advice: pages a live process maps stay)."""
    try:
        evict_ranges((t.file, t.offset, t.nbytes) for spec in specs for t in spec.tensors)
    except OSError:  # a checkpoint file gone: nothing of it left to drop
        pass


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
