"""Measure every process faasmoe runs while it lives: CPU and memory, and their integrals over time.

A `Meter` samples a changing set of processes (each labelled with a role and, where
it serves one tenant, that tenant) on a background thread. CPU-seconds come from the
kernel's own counters (user + system time), so nothing between samples is lost while
the process lives; memory is RSS, and PSS/USS where Linux gives them (PSS splits a
page shared by n processes n ways, so memory-mapped weights are not counted n times).
GB-seconds integrate PSS (RSS where PSS is missing) over time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import psutil

GB = 1e9


@dataclass(frozen=True)
class Label:
    role: str  # server, orchestrator, control-plane, function, zygote, baseline, ...
    tenant: str | None = None  # the one tenant a process serves, if any


@dataclass
class ProcessRecord:
    pid: int
    label: Label
    first_seen: float
    last_seen: float
    cpu_start: float | None = None  # the process's CPU-seconds when first seen
    cpu_s: float = 0.0  # CPU-seconds spent while metered
    gb_s: float = 0.0  # integral of PSS (or RSS) in GB over time
    rss: int = 0
    pss: int | None = None
    uss: int | None = None
    peak_rss: int = 0
    peak_pss: int = 0


@dataclass
class Sample:
    """Totals over all metered processes at one instant (for plots over time)."""

    t: float
    cpu_percent: float
    rss: int
    pss: int
    processes: int
    by_role: dict[str, dict[str, float]] = field(default_factory=dict)


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
    """Sample the processes `source()` names, every `interval` seconds, until stopped."""

    def __init__(self, source: Callable[[], dict[int, Label]], interval: float = 0.25, keep_samples: int = 100_000):
        self.source, self.interval, self.keep_samples = source, interval, keep_samples
        self.records: dict[int, ProcessRecord] = {}
        self.samples: list[Sample] = []
        self.started_at = time.monotonic()
        self._procs: dict[int, psutil.Process] = {}
        self._lock = threading.Lock()
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

    def sample(self) -> Sample:
        now = time.monotonic()
        labels = self.source()
        totals = Sample(now - self.started_at, 0.0, 0, 0, 0)
        with self._lock:
            for pid, label in labels.items():
                proc = self._procs.get(pid)
                rec = self.records.get(pid)
                try:
                    if proc is None or rec is None or rec.label != label:
                        proc = self._procs[pid] = psutil.Process(pid)
                    cpu, rss, pss, uss = read_process(proc)
                except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                    continue
                if rec is None or rec.label != label:
                    rec = self.records[pid] = ProcessRecord(pid, label, now, now, cpu_start=cpu)
                dt = now - rec.last_seen
                mem = pss if pss is not None else rss
                prev_cpu = rec.cpu_s
                rec.cpu_s = cpu - (rec.cpu_start or 0.0)
                if dt > 0:
                    rec.gb_s += mem / GB * dt  # the memory held over the interval just ended
                    cpu_pct = 100.0 * (rec.cpu_s - prev_cpu) / dt
                else:
                    cpu_pct = 0.0
                rec.last_seen = now
                rec.rss, rec.pss, rec.uss = rss, pss, uss
                rec.peak_rss = max(rec.peak_rss, rss)
                rec.peak_pss = max(rec.peak_pss, pss or rss)
                totals.cpu_percent += cpu_pct
                totals.rss += rss
                totals.pss += mem
                totals.processes += 1
                role = totals.by_role.setdefault(label.role, {"cpu_percent": 0.0, "pss": 0.0, "rss": 0.0})
                role["cpu_percent"] += cpu_pct
                role["pss"] += mem
                role["rss"] += rss
            if len(self.samples) < self.keep_samples:
                self.samples.append(totals)
        return totals

    # -- views ---------------------------------------------------------------------------------
    def by(self, key: Callable[[Label], str | None]) -> dict[str | None, dict[str, float]]:
        """CPU-seconds, GB-seconds and current memory summed by `key(label)`."""
        out: dict[str | None, dict[str, float]] = {}
        with self._lock:
            latest = max((r.last_seen for r in self.records.values()), default=0.0)
            for rec in self.records.values():
                d = out.setdefault(key(rec.label), {"cpu_seconds": 0.0, "gb_seconds": 0.0, "rss_bytes": 0.0,
                                                    "pss_bytes": 0.0, "uss_bytes": 0.0, "processes": 0, "alive": 0})
                d["cpu_seconds"] += rec.cpu_s
                d["gb_seconds"] += rec.gb_s
                d["processes"] += 1
                if rec.last_seen == latest:  # alive at the latest sample
                    d["alive"] += 1
                    d["rss_bytes"] += rec.rss
                    d["pss_bytes"] += rec.pss or rec.rss
                    d["uss_bytes"] += rec.uss or 0
        return out

    def totals(self) -> dict[str, float]:
        t = self.by(lambda _: "all").get("all", {"cpu_seconds": 0.0, "gb_seconds": 0.0})
        return dict(t)

    def records_json(self) -> list[dict]:
        with self._lock:
            return [{**asdict(r), "label": asdict(r.label)} for r in self.records.values()]
