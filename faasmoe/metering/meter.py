"""Measure every process faasmoe runs while it lives: CPU and memory, and their integrals over time.

A `Meter` samples a changing set of processes (each labelled with a role and, where
it serves one tenant, that tenant) on a background thread. Memory is RSS, and PSS/USS
where Linux gives them (PSS splits a page shared by n processes n ways, so memory-mapped
weights are not counted n times). Two memory integrals are kept:

* `gb_s` (GB-seconds, "physical"): PSS (RSS where PSS is missing) over time;
* `gb_s_billed` (GB-seconds, "billed"): RSS over time, what a FaaS or container provider
  charges each instance for: all of its resident memory, shared pages included.

PSS comes from smaps_rollup, which costs the kernel milliseconds per process: read for 400
function instances every second, it would take a whole core of the machine being measured.
So CPU and RSS are read at every sample, PSS/USS of each process at its first sample and
then at most as often as keeps all readings within `pss_share` of one core (the processes
take turns); between two readings a process's PSS and USS move with its RSS.

Every process is integrated from its start to its exit, not from its first sample to its last:

* CPU-seconds are the kernel's cumulative counters (user + system). A process born while the
  meter runs counts from zero, so its CPU before its first sample is counted; a process that
  already lived when the meter started (or was first named by the source later) counts from
  its counter at its first sample: the meter's window, not the process's past.
* GB-seconds: from the process's start (its kernel start time, 10 ms resolution; the first
  sample for one born before the meter started) to its first sample at the first sample's
  memory; between samples at the later sample's memory; from its last sample to its exit at
  the last sample's memory. The exit is the time a platform noted with `note_exit` just before
  it killed the process, else the first sample that found the process gone (an upper bound:
  up to one interval too much, never too little).
* The CPU a process spends after its last sample is lost unless its final counter is read at
  exit: a platform that kills its instances calls `note_exit(pid)` right before the kill (the
  local platform does), and a zombie's final counter is read when a sample finds one. The
  residual error is the CPU that processes the meter's own process did not kill spent after
  their last sample (an instance evicted after its keep-alive was idle then, so about zero;
  one killed mid-call, or by a platform in another process, loses at most one interval of
  CPU), plus processes that lived and died between two samples, which are never seen.
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import psutil

GB = 1e9
PAGE_CACHE_INTERVAL_S = 5.0  # the least time between two page-cache readings (mincore: ~22 ms per GB here)
PSS_SHARE = 0.05  # the most of one core that PSS readings may take (smaps_rollup: ~6 ms per function instance)


@dataclass(frozen=True)
class Label:
    role: str  # server, orchestrator, control-plane, function, zygote, baseline, ...
    tenant: str | None = None  # the one tenant a process serves, if any


@dataclass
class ProcessRecord:
    pid: int
    label: Label
    first_seen: float  # the first sample that saw it (monotonic clock)
    last_seen: float  # the last sample that saw it
    cpu_start: float | None = None  # the counter its CPU-seconds count from: 0 for a process born while metered
    cpu_s: float = 0.0  # CPU-seconds, from its start (or first sample) to its last sample or its noted exit
    gb_s: float = 0.0  # integral of PSS (or RSS) in GB over time: physical memory
    rss: int = 0
    pss: int | None = None
    uss: int | None = None
    peak_rss: int = 0
    peak_pss: int = 0
    gb_s_billed: float = 0.0  # integral of RSS in GB over time: what a provider bills an instance for
    started: float | None = None  # where its integrals start: its birth, or its first sample (see the module doc)
    ended: float | None = None  # where they end once it is gone: its noted exit, or the sample that found it gone
    start_id: float | int | None = None  # with the pid, identifies the process (kernel start time)
    cpu_last: float = 0.0  # its CPU counter at the last reading


@dataclass
class Sample:
    """Totals over all metered processes at one instant (for plots over time)."""

    t: float
    cpu_percent: float
    rss: int
    pss: int
    processes: int
    by_role: dict[str, dict[str, float]] = field(default_factory=dict)
    page_cache_bytes: int = 0  # of the meter's page_cache_files, at the latest reading (0 without files)


class ProcReading(NamedTuple):
    """One reading of one process. `born` is on the meter's clock; `start_id` tells a reused pid apart."""

    cpu: float  # cumulative CPU-seconds (user + system)
    rss: int
    pss: int | None
    uss: int | None
    born: float | None
    start_id: float | int | None
    alive: bool = True  # False for a zombie: exited, `cpu` is final, no memory


class _PssReading(NamedTuple):
    start_id: float | int | None
    rss: int  # at the reading, so that later RSS readings can move PSS and USS along
    pss: int | None
    uss: int | None
    due: float  # time.monotonic() of the next reading


class ExitNote(NamedTuple):
    start_id: float | int | None
    cpu: float  # the final CPU counter
    at: float  # time.monotonic() of the exit


_EXITS: OrderedDict[int, ExitNote] = OrderedDict()
_EXITS_LOCK = threading.Lock()
_EXITS_KEEP = 4096


def record_exit(pid: int, start_id: float | int | None, cpu: float, at: float) -> None:
    """Remember a process's final CPU counter and exit time for the meters of this process."""
    with _EXITS_LOCK:
        _EXITS[pid] = ExitNote(start_id, cpu, at)
        _EXITS.move_to_end(pid)
        while len(_EXITS) > _EXITS_KEEP:
            _EXITS.popitem(last=False)


def note_exit(pid: int) -> None:
    """Call right before killing process `pid`: reads its final CPU counter (one /proc read, ~20 us)."""
    try:
        cpu, start_id, _ = _proc_stat(pid)
    except (OSError, ValueError, IndexError):
        return
    record_exit(pid, start_id, cpu, time.monotonic())


def _exit_of(pid: int) -> ExitNote | None:
    with _EXITS_LOCK:
        return _EXITS.get(pid)


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: int) -> tuple[float, int, str]:
    """(cumulative CPU-seconds, start time in clock ticks since boot, state) from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # after the command: state is field 3, utime 14, stime 15, starttime 22 (man 5 proc)
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK, int(fields[19]), fields[0].decode()


def read_process(p: psutil.Process) -> tuple[float, int, int | None, int | None]:
    """(CPU-seconds, RSS, PSS, USS) of one process; PSS/USS are None where the OS does not give them."""
    with p.oneshot():
        t = p.cpu_times()
        cpu = t.user + t.system
        try:
            m = p.memory_full_info()
            return cpu, m.rss, getattr(m, "pss", None), getattr(m, "uss", None)
        except (psutil.AccessDenied, AttributeError):
            return cpu, p.memory_info().rss, None, None


class Meter:
    """Sample the processes `source()` names, every `interval` seconds, until stopped.

    `page_cache_files`: checkpoint files whose page-cache residency each `Sample` carries
    (`page_cache_bytes`), read at most every `page_cache_interval` seconds and at most 1 % of
    the time (mincore costs ~22 ms per GB here). `pss_share`: see the module doc. `reader` and
    `clock` are for tests: a function pid -> `ProcReading` and the clock `born`, samples and
    exits are measured on.
    """

    _GONE = (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied, ProcessLookupError,
             FileNotFoundError)

    def __init__(self, source: Callable[[], dict[int, Label]], interval: float = 0.25, keep_samples: int = 100_000,
                 page_cache_files: Sequence[Path | str] | None = None,
                 page_cache_interval: float = PAGE_CACHE_INTERVAL_S, pss_share: float = PSS_SHARE,
                 reader: Callable[[int], ProcReading] | None = None, clock: Callable[[], float] = time.monotonic):
        self.source, self.interval, self.keep_samples = source, interval, keep_samples
        self.pss_share = pss_share
        self._pss: dict[int, _PssReading] = {}  # by pid: the latest smaps reading, and when the next is due
        self._pss_cost = 0.0  # seconds per smaps reading, a moving average
        self.page_cache_files = [Path(f) for f in page_cache_files or ()]
        self.page_cache_interval = page_cache_interval
        self.reader = reader or self._read
        self.clock = clock
        self.records: dict[int, ProcessRecord] = {}  # by pid: the latest process with that pid
        self.finished: list[ProcessRecord] = []  # earlier processes of a reused pid, earlier labels of a process
        self.samples: list[Sample] = []
        self.started_at = clock()
        self._procs: dict[int, tuple[object, psutil.Process]] = {}
        self._page_cache = (0, float("-inf"))  # latest reading, when the next one is due
        self._lock = threading.Lock()
        self._sampling = threading.Lock()  # one sample at a time: the meter's thread, or a reader wanting one now
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="faasmoe-meter", daemon=True)

    def start(self) -> "Meter":
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # metering must never take the server down
                pass

    # -- reading -------------------------------------------------------------------------------
    def _read(self, pid: int) -> ProcReading:
        """Counters from /proc/<pid>/stat (psutil elsewhere), memory from psutil (smaps_rollup for PSS/USS)."""
        if sys.platform.startswith("linux"):
            cpu, start_id, state = _proc_stat(pid)
            born = time.monotonic() - (time.clock_gettime(time.CLOCK_BOOTTIME) - start_id / _CLK_TCK)
            if state in ("Z", "X"):  # exited, not reaped yet: its counter is final
                return ProcReading(cpu, 0, None, None, born, start_id, alive=False)
        else:
            cpu = start_id = born = None
        cached = self._procs.get(pid)
        if cached is None or cached[0] != start_id:
            cached = self._procs[pid] = (start_id, psutil.Process(pid))
        p = cached[1]
        if cpu is None:
            start_id = p.create_time()
            born = time.monotonic() - (time.time() - start_id)
            t = p.cpu_times()
            cpu = t.user + t.system
        rss = p.memory_info().rss  # statm: cheap
        last = self._pss.get(pid)
        now = time.monotonic()
        if last is not None and last.start_id == start_id and now < last.due:
            if last.pss is None:
                return ProcReading(cpu, rss, None, None, born, start_id)
            moved = rss - last.rss
            return ProcReading(cpu, rss, max(0, last.pss + moved), max(0, last.uss + moved), born, start_id)
        t0 = time.perf_counter()
        try:
            m = p.memory_full_info()
            pss, uss, rss = getattr(m, "pss", None), getattr(m, "uss", None), m.rss
        except (psutil.AccessDenied, AttributeError):
            pss = uss = None
        cost = time.perf_counter() - t0
        self._pss_cost = cost if not self._pss_cost else 0.9 * self._pss_cost + 0.1 * cost
        period = max(self.interval, len(self._procs) * self._pss_cost / self.pss_share)
        due = now + period * random.uniform(0.5, 1.5)  # spread, so that processes forked together take turns
        self._pss[pid] = _PssReading(start_id, rss, pss, uss, due)
        return ProcReading(cpu, rss, pss, uss, born, start_id)

    def _read_page_cache(self, now: float) -> int:
        value, due = self._page_cache
        if self.page_cache_files and now >= due:
            from faasmoe.metering.pagecache import resident_bytes

            t0 = time.perf_counter()
            value = resident_bytes(self.page_cache_files)
            cost = time.perf_counter() - t0
            self._page_cache = (value, now + max(self.page_cache_interval, 100 * cost))
        return value

    # -- integration ---------------------------------------------------------------------------
    def _begin(self, pid: int, label: Label, r: ProcReading, now: float,
               before: ProcessRecord | None) -> ProcessRecord:
        """A new record; its integrals start where the module doc says, so this sample adds [start, now]."""
        if before is not None:  # the same process under a new label: takes over where the old record ended
            start, cpu_start = before.last_seen, before.cpu_last
        elif r.born is not None and r.born >= self.started_at:  # born while metered: from its birth, CPU from 0
            start, cpu_start = min(max(r.born, self.started_at), now), 0.0
        else:  # lived before the meter started (or its start is unknown): from now
            start, cpu_start = now, r.cpu
        rec = ProcessRecord(pid, label, now, start, cpu_start=cpu_start, started=start, start_id=r.start_id,
                            cpu_last=cpu_start)
        self.records[pid] = rec
        return rec

    @staticmethod
    def _integrate(rec: ProcessRecord, until: float, rss: int, mem: int) -> float:
        """Add [rec.last_seen, until] at this memory; returns the interval's length."""
        dt = until - rec.last_seen
        if dt > 0:
            rec.gb_s += mem / GB * dt
            rec.gb_s_billed += rss / GB * dt
        return dt

    def _end(self, rec: ProcessRecord, now: float, final_cpu: float | None = None) -> None:
        """The process is gone: integrate to its exit (noted, else now) at its last memory."""
        end = now
        note = _exit_of(rec.pid)
        if note is not None and note.start_id == rec.start_id and note.at >= rec.last_seen - 1e-6:
            end = min(note.at, now)
            final_cpu = note.cpu if final_cpu is None else max(final_cpu, note.cpu)
        if final_cpu is not None:
            rec.cpu_s = max(rec.cpu_s, final_cpu - (rec.cpu_start or 0.0))
            rec.cpu_last = max(rec.cpu_last, final_cpu)
        self._integrate(rec, end, rec.rss, rec.pss if rec.pss is not None else rec.rss)
        rec.ended = max(end, rec.last_seen)

    def sample(self) -> Sample:
        """Read every process now (the meter's thread does every `interval`; a reader may too, to be current)."""
        with self._sampling:
            return self._sample()

    def _sample(self) -> Sample:
        now = self.clock()
        labels = self.source()
        page_cache = self._read_page_cache(now)
        totals = Sample(now - self.started_at, 0.0, 0, 0, 0, page_cache_bytes=page_cache)
        seen: set[int] = set()
        with self._lock:
            for pid, label in labels.items():
                try:
                    r = self.reader(pid)
                except self._GONE:
                    continue
                rec = self.records.get(pid)
                if not r.alive:  # a zombie: exited since its last sample, with its final counter
                    if rec is not None and rec.ended is None and rec.start_id == r.start_id:
                        self._end(rec, now, final_cpu=r.cpu)
                    continue
                before = None
                if rec is not None and (rec.start_id != r.start_id or rec.label != label):
                    if rec.start_id == r.start_id:  # relabelled: the old record ends at its last sample
                        before = rec
                        if rec.ended is None:
                            rec.ended = rec.last_seen
                    elif rec.ended is None:  # the pid was reused: the old process is gone
                        self._end(rec, min(now, r.born) if r.born is not None else now)
                    self.finished.append(rec)
                    rec = None
                elif rec is not None and rec.ended is not None:  # back after a sample missed it
                    rec.last_seen, rec.ended = rec.ended, None
                if rec is None:
                    rec = self._begin(pid, label, r, now, before)
                seen.add(pid)
                mem = r.pss if r.pss is not None else r.rss
                prev_cpu = rec.cpu_s
                rec.cpu_s = r.cpu - (rec.cpu_start or 0.0)
                rec.cpu_last = r.cpu
                dt = self._integrate(rec, now, r.rss, mem)  # the memory held over the interval just ended
                cpu_pct = 100.0 * (rec.cpu_s - prev_cpu) / dt if dt > 0 else 0.0
                rec.last_seen = now
                rec.rss, rec.pss, rec.uss = r.rss, r.pss, r.uss
                rec.peak_rss = max(rec.peak_rss, r.rss)
                rec.peak_pss = max(rec.peak_pss, mem)
                totals.cpu_percent += cpu_pct
                totals.rss += r.rss
                totals.pss += mem
                totals.processes += 1
                role = totals.by_role.setdefault(label.role, {"cpu_percent": 0.0, "pss": 0.0, "rss": 0.0})
                role["cpu_percent"] += cpu_pct
                role["pss"] += mem
                role["rss"] += r.rss
            for pid, rec in self.records.items():
                if rec.ended is None and pid not in seen:  # gone since the last sample
                    self._end(rec, now)
            for pid in [p for p in self._procs if p not in seen]:
                del self._procs[pid]
                self._pss.pop(pid, None)
            if len(self.samples) < self.keep_samples:
                self.samples.append(totals)
        return totals

    # -- views ---------------------------------------------------------------------------------
    def _all_records(self) -> list[ProcessRecord]:
        return [*self.finished, *self.records.values()]

    def by(self, key: Callable[[Label], str | None]) -> dict[str | None, dict[str, float]]:
        """CPU-seconds, GB-seconds (PSS: `gb_seconds`; RSS: `gb_seconds_billed`) and current memory by `key(label)`."""
        out: dict[str | None, dict[str, float]] = {}
        with self._lock:
            records = self._all_records()
            latest = max((r.last_seen for r in records if r.ended is None), default=0.0)
            for rec in records:
                d = out.setdefault(key(rec.label), {"cpu_seconds": 0.0, "gb_seconds": 0.0, "gb_seconds_billed": 0.0,
                                                    "rss_bytes": 0.0, "pss_bytes": 0.0, "uss_bytes": 0.0,
                                                    "processes": 0, "alive": 0})
                d["cpu_seconds"] += rec.cpu_s
                d["gb_seconds"] += rec.gb_s
                d["gb_seconds_billed"] += rec.gb_s_billed
                d["processes"] += 1
                if rec.ended is None and rec.last_seen == latest:  # alive at the latest sample
                    d["alive"] += 1
                    d["rss_bytes"] += rec.rss
                    d["pss_bytes"] += rec.pss or rec.rss
                    d["uss_bytes"] += rec.uss or 0
        return out

    def totals(self) -> dict[str, float]:
        """Every process together: `cpu_seconds`, `gb_seconds` (PSS), `gb_seconds_billed` (RSS), ..."""
        t = self.by(lambda _: "all").get("all", {"cpu_seconds": 0.0, "gb_seconds": 0.0, "gb_seconds_billed": 0.0})
        return dict(t)

    def page_cache_gb_avg(self) -> float:
        """Time-average of the page-cache residency of `page_cache_files` over the samples, in GB
        (each sample's value holds until the next sample)."""
        with self._lock:
            samples = list(self.samples)
        if not samples:
            return 0.0
        span = samples[-1].t - samples[0].t
        if span <= 0:
            return samples[-1].page_cache_bytes / GB
        area = sum(a.page_cache_bytes * (b.t - a.t) for a, b in zip(samples, samples[1:]))
        return area / span / GB

    def records_json(self) -> list[dict]:
        with self._lock:
            return [{**asdict(r), "label": asdict(r.label)} for r in self._all_records()]
