"""`faasmoe bench --quick` end to end (seconds of load), and the load generator's guarantees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from faasmoe.bench.load import Workload, schedule

RUN_FIELDS = ("requests", "errors", "arrival_window_s", "drain_s", "generated_tokens", "cpu_seconds",
              "cpu_seconds_per_token", "gb_seconds_physical", "gb_seconds_billed", "gb_seconds_per_token_physical",
              "avg_mem_gb_physical", "peak_mem_gb_physical", "avg_mem_gb_billed", "avg_cpu_percent",
              "page_cache_gb_avg", "cold_starts", "evictions", "ttft_p50_s", "ttft_p99_s", "tpot_p50_ms",
              "tpot_p99_ms", "expert_top10pct_share", "idle_warm_fraction", "by_role", "per_tenant", "timeline")
STRATEGIES = {"baseline", "shared-monolithic", "faasmoe-private", "faasmoe-shared", "local-distribution"}


def test_quick_bench_runs_every_strategy_with_zero_errors(tiny, tmp_path):
    out = tmp_path / "bench"
    r = subprocess.run([sys.executable, "-m", "faasmoe", "bench", "--quick", "--model", tiny, "--out", str(out),
                        "--tenants", "2", "--duration", "3", "--rate", "1", "--burst-on", "1", "--burst-off", "1",
                        "--keep-alive", "0.5"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    runs = {run["strategy"]: run for run in report["runs"]}
    assert set(runs) == STRATEGIES and len(report["runs"]) == 5
    for name, run in runs.items():
        for field in RUN_FIELDS:
            assert field in run, (name, field)
        assert run["errors"] == 0 and run["requests"] > 0 and run["generated_tokens"] > 0
        assert run["cpu_seconds"] > 0 and run["gb_seconds_physical"] > 0 and len(run["per_tenant"]) == 2
        assert run["gb_seconds_billed"] >= run["gb_seconds_physical"] * 0.99  # RSS counts shared pages in full
        assert run["drain_s"] >= run["arrival_window_s"] and run["page_cache_gb_avg"] >= 0
    for name in ("baseline", "shared-monolithic"):
        assert runs[name]["invocations"] == 0 and runs[name]["experts_per_function"] is None
        assert 0 < runs[name]["expert_top10pct_share"] <= 1  # monolithic servers count their routing too
    shared = runs["faasmoe-shared"]
    assert shared["invocations_per_token"] > 0 and shared["cold_starts"] + shared["prefetches"] > 0
    assert shared["evictions"] >= 0  # evictions depend on timing: scale-to-zero itself is tested in test_platform
    assert "function" in shared["by_role"] and 0 <= shared["idle_warm_fraction"] <= 1
    assert runs["local-distribution"]["evictions"] == 0
    h = report["headline"]
    assert h["rate_per_tenant"] == 1 and set(h["versus"]["faasmoe-shared"]) == {"baseline", "shared-monolithic"}
    assert set(h["goals"]) == {"memory_at_most_a_third_of_baseline", "cpu_per_token_at_most_baseline",
                               "memory_below_shared_monolithic", "cpu_per_token_within_1_3x_shared_monolithic"}
    for f in ("results.md", "memory.png", "cpu.png", "rates.png"):
        assert (out / f).stat().st_size > 0
    assert "| faasmoe-shared |" in (out / "results.md").read_text()


def test_a_bench_plan_runs_each_strategy_at_each_rate_then_the_keep_alive_sweep(tiny):
    from pathlib import Path

    from faasmoe.bench.multitenant import BenchConfig, plan, tenant_rates

    cfg = BenchConfig(model=Path(tiny), workload=Workload(tenants=3), rates=[0.1, 0.2, 0.4], experts_per_function=4,
                      keep_alive_s=10, keep_alive_sweep=[2, 10, 60], keep_alive_ks=(1, 4))
    runs = plan(cfg)
    main = [r for r in runs if r.purpose == "main"]
    assert len(main) == 15 and {r.rate for r in main} == {0.1, 0.2, 0.4}
    assert all(r.k is None and r.keep_alive_s is None for r in main if r.strategy in ("baseline", "shared-monolithic"))
    sweep = [(r.k, r.keep_alive_s) for r in runs if r.purpose == "keep-alive"]
    assert sorted(sweep) == [(1, 2), (1, 10), (1, 60), (4, 2), (4, 60)]  # (4, 10) at 0.2/s is a main run already
    assert all(r.rate == 0.2 for r in runs if r.purpose == "keep-alive")
    rates = tenant_rates(0.2, 3)
    assert abs(sum(rates) / 3 - 0.2) < 1e-12 and rates[0] > rates[1] > rates[2]


def test_the_same_seed_gives_the_same_requests_and_rates_are_respected():
    w = Workload(tenants=3, rates=[1.0, 2.0, 4.0], duration_s=200, seed=5)
    a, b = schedule(w), schedule(w)
    assert a == b and a != schedule(Workload(tenants=3, rates=[1.0, 2.0, 4.0], duration_s=200, seed=6))
    counts = [sum(1 for x in a if x.tenant == t) for t in range(3)]
    for count, rate in zip(counts, [1.0, 2.0, 4.0]):
        assert abs(count - rate * 200) < 4 * (rate * 200) ** 0.5  # Poisson: within 4 standard deviations
    assert all(16 <= len(x.prompt) <= 64 and 16 <= x.max_tokens <= 32 for x in a)


def test_text_prompts_come_from_the_corpus_with_the_drawn_lengths(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    arrivals = schedule(Workload(tenants=2, rates=[1.0], duration_s=20, prompt_tokens=(8, 24), seed=3), tok)
    assert arrivals and all(isinstance(a.prompt, str) for a in arrivals)
    assert all(8 <= len(tok.encode(a.prompt, add_special_tokens=False)) <= 24 for a in arrivals)
    again = schedule(Workload(tenants=2, rates=[1.0], duration_s=20, prompt_tokens=(8, 24), seed=3), tok)
    assert [a.prompt for a in again] == [a.prompt for a in arrivals]


def test_bursty_arrivals_come_in_on_periods():
    w = Workload(tenants=1, rates=[2.0], arrival="bursty", duration_s=300, burst_on_s=10, burst_off_s=20, seed=1)
    times = [x.at for x in schedule(w)]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert max(gaps) > 5  # silent off periods
    assert sorted(gaps)[len(gaps) // 2] < 0.5  # and dense bursts (3x the rate while on)


def test_max_requests_caps_each_tenant():
    arrivals = schedule(Workload(tenants=2, rates=[10.0], duration_s=100, max_requests=7))
    assert [sum(1 for x in arrivals if x.tenant == t) for t in range(2)] == [7, 7]


def test_results_name_the_commit_that_ran():
    """A figure in the docs can be traced to its code: machine_info records the checkout's commit."""
    from faasmoe.bench.machine import machine_info

    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode:
        pytest.skip("not a git checkout")
    assert machine_info()["code"].startswith(head.stdout.strip())


def test_concurrent_arrivals_are_a_closed_loop_of_every_tenant_at_once():
    arrivals = schedule(Workload(tenants=3, arrival="concurrent", max_requests=2, rates=[0.01], duration_s=1))
    assert len(arrivals) == 6 and all(a.at == 0 for a in arrivals)
    for t in range(3):
        assert [a.after_previous for a in arrivals if a.tenant == t] == [False, True]
    assert len(schedule(Workload(tenants=4, arrival="concurrent"))) == 4  # one request each unless told


def _stub_completions_server():
    """A streaming /v1/completions stub that answers each request after 20 ms: a server for the client's side."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            time.sleep(0.02)
            chunks = [{"choices": [{"text": "a", "token_ids": [7]}]} for _ in range(body["max_tokens"])]
            chunks.append({"choices": [], "usage": {"completion_tokens": body["max_tokens"], "prompt_tokens": 3}})
            data = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks).encode() + b"data: [DONE]\n\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_closed_loop_tenant_sends_its_next_request_when_the_previous_has_ended():
    import asyncio

    from faasmoe.bench.load import Target, run_load

    server = _stub_completions_server()
    try:
        arrivals = schedule(Workload(tenants=2, arrival="concurrent", max_requests=3, output_tokens=(2, 4)))
        target = Target(f"http://127.0.0.1:{server.server_address[1]}", "sk-test", "m")
        results = asyncio.run(run_load(arrivals, {0: target, 1: target}))
    finally:
        server.shutdown()
        server.server_close()
    assert [r.tenant for r in results] == [a.tenant for a in arrivals] and all(r.ok for r in results)
    for t in range(2):
        mine = [r for r in results if r.tenant == t]
        for before, after in zip(mine, mine[1:]):
            assert after.end_s - after.latency_s >= before.end_s  # it started once its previous one had ended


def test_bench_runs_a_closed_loop_and_reports_its_throughput(tiny, tmp_path):
    out = tmp_path / "bench"
    base = [sys.executable, "-m", "faasmoe", "bench", "--model", tiny, "--out", str(out), "--tenants", "2",
            "--arrival", "concurrent", "--prompt-tokens", "8:8", "--output-tokens", "6:6", "--no-sweep",
            "--strategy", "shared-monolithic"]
    refused = subprocess.run([*base, "--rate", "1"], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--rate does not apply" in refused.stdout + refused.stderr
    r = subprocess.run([*base, "--max-requests", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    (run,) = report["runs"]
    assert run["requests"] == 4 and run["errors"] == 0 and run["generated_tokens"] == 24
    assert run["arrival_window_s"] == 0 and run["sustained"] is None
    assert run["throughput_tokens_per_s"] == pytest.approx(24 / run["drain_s"])
    assert "(a closed loop)" in (out / "results.md").read_text()
    assert (out / "memory.png").exists() and not (out / "rates.png").exists()  # a closed loop has no rates
