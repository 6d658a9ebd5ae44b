"""`faasmoe bench --quick` end to end (seconds of load), and the load generator's guarantees."""

from __future__ import annotations

import json
import subprocess
import sys

from faasmoe.bench.load import Workload, schedule

STRATEGY_FIELDS = ("cpu_seconds", "gb_seconds", "requests", "completed", "errors", "avg_cpu_percent",
                   "peak_cpu_percent", "avg_memory_gb", "peak_memory_gb", "ttft_p50_s", "ttft_p95_s", "tpot_p50_s",
                   "tpot_p95_s", "throughput_tokens_per_s", "invocations_per_token", "cold_starts", "per_tenant",
                   "timeline", "by_role")


def test_quick_bench_runs_every_strategy_with_zero_errors(tiny, tmp_path):
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "-m", "faasmoe", "bench", "--quick", "--model", tiny, "--out", str(out),
                        "--tenants", "2", "--duration", "2", "--rate", "2", "--sweep", "8"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    assert set(report["strategies"]) == {"baseline", "faasmoe-private", "faasmoe-shared", "local-distribution"}
    for name, s in report["strategies"].items():
        for field in STRATEGY_FIELDS:
            assert field in s, (name, field)
        assert s["errors"] == 0 and s["requests"] == s["completed"] > 0
        assert s["cpu_seconds"] > 0 and s["gb_seconds"] > 0 and len(s["per_tenant"]) == 2
        assert s["tpot_p50_s"] is not None and s["ttft_p50_s"] is not None
    assert report["strategies"]["baseline"]["invocations"] == 0
    assert report["strategies"]["faasmoe-shared"]["invocations_per_token"] > 0
    assert {"baseline", "function", "zygote", "orchestrator", "control-plane", "server"} >= {
        role for s in report["strategies"].values() for role in s["by_role"]}
    assert "function" in report["strategies"]["faasmoe-shared"]["by_role"]
    assert sorted(p["experts_per_function"] for p in report["sweep"] if p["strategy"] == "faasmoe-shared") == [2, 8]
    assert set(report["comparison"]) == {"faasmoe-private", "faasmoe-shared", "local-distribution"}
    for f in ("results.md", "memory.png", "cpu.png", "tenants.png", "granularity.png"):
        assert (out / f).stat().st_size > 0
    assert "| faasmoe-shared |" in (out / "results.md").read_text()


def test_the_same_seed_gives_the_same_requests_and_rates_are_respected():
    w = Workload(tenants=3, rates=[1.0, 2.0, 4.0], duration_s=200, seed=5)
    a, b = schedule(w), schedule(w)
    assert a == b and a != schedule(Workload(tenants=3, rates=[1.0, 2.0, 4.0], duration_s=200, seed=6))
    counts = [sum(1 for x in a if x.tenant == t) for t in range(3)]
    for count, rate in zip(counts, [1.0, 2.0, 4.0]):
        assert abs(count - rate * 200) < 4 * (rate * 200) ** 0.5  # Poisson: within 4 standard deviations
    assert all(16 <= len(x.prompt) <= 64 and 16 <= x.max_tokens <= 32 for x in a)


def test_bursty_arrivals_come_in_on_periods():
    w = Workload(tenants=1, rates=[2.0], arrival="bursty", duration_s=300, burst_on_s=10, seed=1)
    times = [x.at for x in schedule(w)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) > 5  # silent off periods
    assert sorted(gaps)[len(gaps) // 2] < 0.5  # and dense bursts (3x the rate while on)


def test_max_requests_caps_each_tenant():
    arrivals = schedule(Workload(tenants=2, rates=[10.0], duration_s=100, max_requests=7))
    assert [sum(1 for x in arrivals if x.tenant == t) for t in range(2)] == [7, 7]
