"""Metering is plausible: a known allocation and a known amount of CPU work are measured as such."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest
import torch

from faasmoe.metering import meter as meter_module
from faasmoe.metering.billing import SharedCostLedger, split_interval
from faasmoe.metering.meter import GB, Label, Meter, ProcessRecord, ProcReading, note_exit, record_exit

ALLOCATE = """
import sys, time
buf = bytearray(int(sys.argv[1]))
for i in range(0, len(buf), 4096):
    buf[i] = 1
print("ready", flush=True)
time.sleep(60)
"""

SPIN = """
import time
t = time.process_time()
while time.process_time() - t < 1.0:
    pass
print("done", flush=True)
time.sleep(60)
"""


def _start(code: str, *args: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True)
    return p


def test_a_known_buffer_is_measured_within_10_percent():
    size = 300 * 2**20
    small, big = _start(ALLOCATE, "0"), _start(ALLOCATE, str(size))
    try:
        assert small.stdout.readline().strip() == "ready" and big.stdout.readline().strip() == "ready"
        meter = Meter(lambda: {small.pid: Label("test", "a"), big.pid: Label("test", "b")}, interval=0.1).start()
        time.sleep(1.0)
        meter.stop()
        rec = {r.pid: r for r in meter.records.values()}
        for kind in ("rss", "pss", "uss"):
            diff = getattr(rec[big.pid], kind) - getattr(rec[small.pid], kind)
            assert abs(diff - size) < 0.1 * size, (kind, diff)
        by_tenant = meter.by(lambda lb: lb.tenant)
        gb_s_diff = by_tenant["b"]["gb_seconds"] - by_tenant["a"]["gb_seconds"]
        elapsed = rec[big.pid].last_seen - rec[big.pid].first_seen
        assert abs(gb_s_diff - size / 1e9 * elapsed) < 0.1 * size / 1e9 * elapsed
        billed_diff = by_tenant["b"]["gb_seconds_billed"] - by_tenant["a"]["gb_seconds_billed"]
        assert abs(billed_diff - size / 1e9 * elapsed) < 0.1 * size / 1e9 * elapsed  # a private buffer: RSS = PSS
        assert rec[big.pid].gb_s_billed >= rec[big.pid].gb_s  # RSS >= PSS
        assert meter.totals()["gb_seconds_billed"] >= meter.totals()["gb_seconds"]
    finally:
        small.kill()
        big.kill()


def test_cpu_seconds_of_a_busy_process_within_10_percent():
    p = _start(SPIN)
    try:
        meter = Meter(lambda: {p.pid: Label("test")}, interval=0.1).start()
        assert p.stdout.readline().strip() == "done"
        time.sleep(0.3)
        meter.stop()
        cpu = meter.totals()["cpu_seconds"]
        assert 0.9 < cpu < 1.1 + 0.1  # the interpreter's own start-up may add a little
        assert max(s.cpu_percent for s in meter.samples) > 50
    finally:
        p.kill()


GROW = """
import sys, time
bufs = []
for line in sys.stdin:
    bufs.append(bytearray(int(line)))
    for i in range(0, len(bufs[-1]), 4096):
        bufs[-1][i] = 1
    print("ready", flush=True)
"""


def test_pss_is_read_within_its_cpu_share_and_moves_with_rss_between_readings(monkeypatch):
    reads = []
    full_info = psutil.Process.memory_full_info
    monkeypatch.setattr(psutil.Process, "memory_full_info", lambda self: reads.append(self.pid) or full_info(self))
    p = subprocess.Popen([sys.executable, "-c", GROW], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    size = 200 * 2**20
    try:
        p.stdin.write("0\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "ready"
        meter = Meter(lambda: {p.pid: Label("test")}, pss_share=1e-9)  # one smaps reading per ~forever
        first = meter.sample()
        p.stdin.write(f"{size}\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "ready"
        later = meter.sample()
        assert reads == [p.pid]  # the second sample read RSS only
        assert later.rss - first.rss > 0.9 * size
        assert later.pss - first.pss == later.rss - first.rss  # a private buffer: PSS grows as RSS does
    finally:
        p.kill()


def _meter_with(shared_cpu: float, shared_gb: float) -> Meter:
    meter = Meter(lambda: {})
    meter.records = {1: ProcessRecord(1, Label("orchestrator", "a"), 0, 1, cpu_s=2.0, gb_s=4.0),
                     2: ProcessRecord(2, Label("orchestrator", "b"), 0, 1, cpu_s=1.0, gb_s=1.0),
                     3: ProcessRecord(3, Label("function"), 0, 1, cpu_s=shared_cpu, gb_s=shared_gb)}
    return meter


def test_a_tenant_bill_is_its_own_processes_plus_its_part_of_each_interval_of_the_shared_ones():
    ledger = SharedCostLedger(["a", "b"])
    ledger.update(_meter_with(10.0, 20.0), {"a": 10, "b": 30})  # a had 1/4 of the tokens of this interval
    bill = ledger.bill(_meter_with(10.0, 20.0), "a")
    assert bill["cpu_seconds"] == 2.0 + 2.5 and bill["gb_seconds"] == 4.0 + 5.0
    assert set(bill) == {"cpu_seconds", "gb_seconds", "own_cpu_seconds", "own_gb_seconds", "shared_cpu_seconds",
                         "shared_gb_seconds"}  # amounts only: no ratio, no total of the shared processes


def test_an_idle_tenant_bill_does_not_move_with_another_tenants_traffic():
    ledger = SharedCostLedger(["a", "b"])
    ledger.update(_meter_with(10.0, 20.0), {"a": 10, "b": 10})
    before = ledger.bill(_meter_with(10.0, 20.0), "a")
    for step in range(1, 4):  # only b is served, a is idle
        ledger.update(_meter_with(10.0 + step, 20.0 + step), {"a": 10, "b": 10 + 100 * step})
    assert ledger.bill(_meter_with(13.0, 23.0), "a") == before
    assert ledger.bill(_meter_with(13.0, 23.0), "b")["shared_cpu_seconds"] == 5.0 + 3.0


def test_an_interval_nobody_was_served_in_is_split_equally():
    assert split_interval({"cpu_seconds": 4.0, "gb_seconds": 2.0}, {"a": 0, "b": 0, "c": 0, "d": 0})["c"] == {
        "cpu_seconds": 1.0, "gb_seconds": 0.5}


# -- the integration arithmetic, on fake processes and a fake clock (no real timing) ------------

class FakeProcs:
    """pid -> its counters; the meter reads them through `read` and tells time by `clock`."""

    def __init__(self, t: float = 100.0):
        self.t = t
        self.procs: dict[int, dict] = {}
        self.listed: dict[int, Label] = {}

    def add(self, pid: int, born: float, label: Label = Label("function"), start_id=None, **counters) -> None:
        self.procs[pid] = {"cpu": 0.0, "rss": 0, "pss": None, "born": born, "start_id": start_id or born,
                           "alive": True, **counters}
        self.listed[pid] = label

    def gone(self, pid: int) -> None:
        self.procs.pop(pid, None)
        self.listed.pop(pid, None)

    def clock(self) -> float:
        return self.t

    def read(self, pid: int) -> ProcReading:
        if pid not in self.procs:
            raise psutil.NoSuchProcess(pid)
        p = self.procs[pid]
        return ProcReading(p["cpu"], p["rss"], p["pss"], None, p["born"], p["start_id"], p["alive"])

    def meter(self, **kw) -> Meter:
        return Meter(lambda: dict(self.listed), reader=self.read, clock=self.clock, **kw)


def test_a_process_is_integrated_from_its_birth_to_the_sample_that_found_it_gone():
    f = FakeProcs(t=100.0)
    m = f.meter()
    m.sample()  # t = 100: nothing yet
    f.add(7001, born=101.0, cpu=0.5, rss=2 * GB, pss=1 * GB)
    f.t = 102.0
    m.sample()  # first seen 1 s after its birth: [101, 102] at this sample's memory, CPU since its birth
    rec = m.records[7001]
    assert rec.started == 101.0 and rec.first_seen == 102.0 and rec.cpu_start == 0.0
    assert rec.cpu_s == 0.5 and rec.gb_s == pytest.approx(1.0) and rec.gb_s_billed == pytest.approx(2.0)
    f.procs[7001].update(cpu=1.5, rss=3 * GB, pss=1.5 * GB)
    f.t = 104.0
    m.sample()  # [102, 104] at the memory of the sample that ends it
    assert rec.gb_s == pytest.approx(1.0 + 3.0) and rec.gb_s_billed == pytest.approx(2.0 + 6.0)
    f.gone(7001)
    f.t = 106.0
    m.sample()  # gone, no exit noted: [104, 106] at its last memory
    assert rec.ended == 106.0 and rec.last_seen == 104.0
    assert rec.gb_s == pytest.approx(4.0 + 3.0) and rec.gb_s_billed == pytest.approx(8.0 + 6.0)
    assert rec.cpu_s == 1.5
    f.t = 108.0
    m.sample()  # nothing more once it has ended
    t = m.totals()
    assert t["gb_seconds"] == pytest.approx(7.0) and t["gb_seconds_billed"] == pytest.approx(14.0)
    assert t["cpu_seconds"] == 1.5 and t["alive"] == 0 and t["processes"] == 1


def test_a_noted_exit_ends_the_integrals_at_the_exit_with_the_final_cpu():
    f = FakeProcs(t=100.0)
    m = f.meter()
    f.add(7002, born=100.5, start_id=424242, cpu=0.2, rss=4 * GB)  # no PSS: RSS stands in
    f.t = 101.0
    m.sample()
    f.procs[7002]["cpu"] = 0.4
    f.t = 103.0
    m.sample()
    record_exit(7002, 424242, 0.9, 104.5)  # what the platform read right before its kill
    f.gone(7002)
    f.t = 105.0
    m.sample()
    rec = m.records[7002]
    assert rec.ended == 104.5 and rec.cpu_s == pytest.approx(0.9)
    assert rec.gb_s == pytest.approx(4 * (104.5 - 100.5)) and rec.gb_s_billed == rec.gb_s


def test_an_exit_noted_for_another_process_with_the_same_pid_is_not_used():
    f = FakeProcs(t=100.0)
    m = f.meter()
    f.add(7003, born=100.0, start_id=1, cpu=0.2, rss=1 * GB)
    f.t = 101.0
    m.sample()
    record_exit(7003, 2, 50.0, 101.5)  # a different start time: not this process
    f.gone(7003)
    f.t = 102.0
    m.sample()
    rec = m.records[7003]
    assert rec.ended == 102.0 and rec.cpu_s == pytest.approx(0.2) and rec.gb_s == pytest.approx(2.0)


def test_a_process_older_than_the_meter_counts_from_its_first_sample():
    f = FakeProcs(t=100.0)
    f.add(7004, born=50.0, cpu=10.0, rss=2 * GB, pss=2 * GB)
    m = f.meter()
    m.sample()  # t = 100: its past is not the meter's
    f.procs[7004]["cpu"] = 11.0
    f.t = 102.0
    m.sample()
    rec = m.records[7004]
    assert rec.started == 100.0 and rec.cpu_start == 10.0
    assert rec.cpu_s == 1.0 and rec.gb_s == pytest.approx(4.0)
    assert m.samples[-1].cpu_percent == pytest.approx(50.0)


def test_a_zombie_gives_its_final_cpu_and_a_reused_pid_starts_a_new_record():
    f = FakeProcs(t=100.0)
    m = f.meter()
    f.add(7005, born=100.0, start_id=1, cpu=0.1, rss=1 * GB, pss=1 * GB)
    f.t = 101.0
    m.sample()
    f.procs[7005].update(cpu=0.7, alive=False, rss=0, pss=None)  # exited, not reaped yet
    f.t = 102.0
    m.sample()
    old = m.records[7005]
    assert old.ended == 102.0 and old.cpu_s == pytest.approx(0.7) and old.gb_s == pytest.approx(2.0)
    f.add(7005, born=102.5, start_id=2, cpu=0.3, rss=1 * GB, pss=1 * GB)  # the pid, reused
    f.t = 103.0
    m.sample()
    new = m.records[7005]
    assert new is not old and m.finished == [old]
    assert new.cpu_s == pytest.approx(0.3) and new.gb_s == pytest.approx(0.5)
    t = m.totals()
    assert t["cpu_seconds"] == pytest.approx(1.0) and t["gb_seconds"] == pytest.approx(2.5)
    assert t["processes"] == 2 and t["alive"] == 1


def test_a_relabelled_process_is_split_at_the_relabelling_sample_without_double_counting():
    f = FakeProcs(t=100.0)
    m = f.meter()
    f.add(7006, born=100.0, label=Label("orchestrator", "a"), cpu=1.0, rss=1 * GB, pss=1 * GB)
    f.t = 101.0
    m.sample()
    f.listed[7006] = Label("orchestrator", "b")
    f.procs[7006]["cpu"] = 3.0
    f.t = 103.0
    m.sample()
    by = m.by(lambda lb: lb.tenant)
    assert by["a"]["cpu_seconds"] == 1.0 and by["a"]["gb_seconds"] == pytest.approx(1.0)
    assert by["b"]["cpu_seconds"] == 2.0 and by["b"]["gb_seconds"] == pytest.approx(2.0)


def test_without_page_cache_files_samples_carry_zero():
    f = FakeProcs()
    m = f.meter()
    m.sample()
    f.t += 1
    m.sample()
    assert all(s.page_cache_bytes == 0 for s in m.samples) and m.page_cache_gb_avg() == 0.0


def test_note_exit_reads_the_final_counter_and_the_start_time():
    p = subprocess.Popen([sys.executable, "-c", SPIN.replace("1.0", "0.2")], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "done"
        note_exit(p.pid)
        note = meter_module._exit_of(p.pid)
        cpu, start_id, _ = meter_module._proc_stat(p.pid)
        assert note.start_id == start_id and 0.2 <= note.cpu <= cpu
    finally:
        p.kill()
        p.wait()


def test_the_local_platform_notes_a_host_exit_right_before_it_kills_it():
    from faasmoe.platforms.local.platform import LocalPlatform, _Host

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    platform = LocalPlatform()  # not started: no zygote needed to stop a host
    try:
        host = _Host("host0", child.pid, os.path.join(platform._dir, "host0.sock"))
        platform._hosts.append(host)
        start_id = meter_module._proc_stat(child.pid)[1]
        t0 = time.monotonic()
        platform._stop_host(host)
        note = meter_module._exit_of(child.pid)
        assert note is not None and note.start_id == start_id and note.at >= t0
        assert child.wait(10) == -9  # then killed
    finally:
        child.kill()
        child.wait()
        platform.close()


def test_metrics_export_routing_and_prefetch_accuracy_by_layer():
    from faasmoe.models.control_plane import RoutingCounts
    from faasmoe.serving.metrics import Metrics

    counts = RoutingCounts(routed=torch.tensor([[3, 0], [1, 2]]), predicted=torch.tensor([0, 3]),
                           predicted_hits=torch.tensor([0, 2]))
    text = Metrics(None, lambda: 0, lambda: 0, routing=lambda: counts).render().decode()
    assert 'faasmoe_routed_pairs_total{expert="0",layer="0"} 3.0' in text
    assert 'faasmoe_routed_pairs_total{expert="1",layer="0"}' not in text  # never routed: not listed
    assert 'faasmoe_prefetch_predicted_pairs_total{layer="1"} 3.0' in text
    assert 'faasmoe_prefetch_hit_pairs_total{layer="1"} 2.0' in text
    assert 'faasmoe_prefetch_predicted_pairs_total{layer="0"}' not in text  # no prediction for layer 0


def test_the_bench_reads_back_what_the_metrics_render(monkeypatch):
    """faasmoe bench scrapes /metrics with regexes: the names and labels it parses are the ones rendered."""
    from types import SimpleNamespace

    from faasmoe.bench import multitenant
    from faasmoe.models.control_plane import RoutingCounts
    from faasmoe.platforms.base import EventLog
    from faasmoe.serving.metrics import Metrics

    log = EventLog()
    log.deployed("f1", 1000)
    log.event("cold_start", "f1", "host0", 0.2, 0.05)
    log.event("prefetch", "f1", "host1", 0.1, 0.03)
    platform = SimpleNamespace(log=log, memory=lambda: {})
    counts = RoutingCounts(routed=torch.tensor([[3, 0], [1, 2]]), predicted=torch.tensor([0, 3]),
                           predicted_hits=torch.tensor([0, 2]))
    text = Metrics(platform, lambda: 0, lambda: 0, routing=lambda: counts).render().decode()
    monkeypatch.setattr(multitenant.httpx, "get", lambda *a, **k: SimpleNamespace(text=text))
    got = multitenant._scrape([SimpleNamespace(base_url="http://unused")])
    assert (got["cold_starts"], got["prefetches"], got["loaded_bytes"]) == (1, 1, 2000)
    assert got["load_seconds"] == pytest.approx(0.08)
    assert got["routed"] == {0: {0: 3.0}, 1: {0: 1.0, 1: 2.0}}
    assert (got["prefetch_predicted"], got["prefetch_hits"]) == ({1: 3.0}, {1: 2.0})
