"""Metering is plausible: a known allocation and a known amount of CPU work are measured as such."""

from __future__ import annotations

import subprocess
import sys
import time

from faasmoe.metering.billing import SharedCostLedger, split_interval
from faasmoe.metering.meter import Label, Meter, ProcessRecord

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
