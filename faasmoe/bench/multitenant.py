"""`faasmoe bench`: the four deployment strategies, one after the other, on the same machine and load.

* baseline: one full-model server per tenant (`faasmoe serve --mode monolithic`), every expert resident;
* faasmoe-private: `faasmoe serve --mode private`, experts on the embedded FaaS platform;
* faasmoe-shared: `faasmoe serve --mode shared`, one orchestrator batching every tenant;
* local-distribution: an orchestrator per tenant, expert blocks as always-on local processes
  (private mode with every function started up front, one instance each, never scaled to zero).

Each runs as real processes, metered from outside (CPU from the kernel's counters,
memory as PSS so pages shared between processes count once), under the same
multi-tenant load from the same seed. Then faasmoe's strategies are run again for each
experts-per-function in the sweep.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from tqdm import tqdm

from faasmoe.bench import cleanup
from faasmoe.bench.load import Arrival, Target, Workload, run_load, schedule, summarize, workload_json
from faasmoe.bench.machine import machine_info
from faasmoe.metering.meter import Label, Meter
from faasmoe.proctitle import role_of, set_title

STRATEGIES = ("baseline", "faasmoe-private", "faasmoe-shared", "local-distribution")
FAASMOE = ("faasmoe-private", "faasmoe-shared")


@dataclass
class BenchConfig:
    model: Path
    workload: Workload
    experts_per_function: int = 2
    sweep: list[int] = field(default_factory=list)
    sweep_strategies: tuple[str, ...] = FAASMOE
    keep_alive_s: float = 10.0
    strategies: tuple[str, ...] = STRATEGIES
    platform: str = "local"
    max_batch: int = 16
    meter_interval_s: float = 1.0  # reading a 2 GB process's smaps costs ~17 ms: sample sparingly
    startup_timeout_s: float = 600.0


@dataclass
class Server:
    proc: subprocess.Popen
    base_url: str
    tenants: list[str]
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _key(tenant: str) -> str:
    return f"sk-bench-{tenant}-0000"


def _start_server(cfg: BenchConfig, mode: str, tenants: list[str], k: int, workdir: Path,
                  always_on: bool = False) -> Server:
    port = _free_port()
    max_out = cfg.workload.output_tokens[1]
    lines = [f'model = "{cfg.model}"', f'mode = "{mode}"', f'platform = "{cfg.platform}"', f"port = {port}",
             f"experts_per_function = {k}", f"max_batch = {cfg.max_batch}", "max_queue = 4096",
             f"max_tokens_limit = {max(max_out, 16)}", 'admin_key = "sk-bench-admin-0000"',
             f"keep_alive_s = {1e9 if always_on else cfg.keep_alive_s}",
             "meter_interval_s = 10.0"]  # the bench meters from outside; the server's own meter stays quiet
    if always_on:
        lines += ["prewarm = true", "max_instances = 1"]
    for t in tenants:
        lines += ["[[tenants]]", f'name = "{t}"', f'key = "{_key(t)}"', "max_concurrency = 1024",
                  "tokens_per_minute = 1000000000", "max_queued = 4096"]
    conf = workdir / f"{mode}-{port}.toml"
    conf.write_text("\n".join(lines) + "\n")
    log = workdir / f"{mode}-{port}.log"
    # Idle OpenMP threads sleep instead of spinning, in every strategy, so no one's CPU-seconds count busy-waiting.
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", TOKENIZERS_PARALLELISM="false")
    if cfg.platform != "ray":  # the server's own temporary folders go in ours, removed even if it is SIGKILLed
        env["TMPDIR"] = str(workdir)  # (not Ray's: its socket paths would grow past the 107-byte limit)
    with log.open("w") as out:
        proc = cleanup.spawn([sys.executable, "-m", "faasmoe", "serve", "--config", str(conf), "--log-level",
                              "warning"], stdout=out, stderr=subprocess.STDOUT, env=env)
    return Server(proc, f"http://127.0.0.1:{port}", tenants, log)


def _wait_healthy(servers: list[Server], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(servers)
    while pending:
        s = pending[0]
        if s.proc.poll() is not None:
            raise RuntimeError(f"server exited with {s.proc.returncode}; its log:\n{s.log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{s.base_url}/health", timeout=5).status_code == 200:
                pending.pop(0)
                continue
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server did not start in {timeout:g} s; its log:\n{s.log.read_text()[-3000:]}")
        time.sleep(0.2)


def _stop(servers: list[Server]) -> None:
    """SIGTERM every server (each stops its orchestrators, zygote, instances, Ray); SIGKILL what is left of a
    server's tree after a grace period (short when the bench itself is being stopped)."""
    grace = 5.0 if cleanup.stopping() else 60.0
    for s in servers:
        if s.proc.poll() is None:
            s.proc.terminate()
    for s in servers:
        cleanup.stop_tree(s.proc, grace)


def label_tree(root: psutil.Process, root_label: Label) -> dict[int, Label]:
    """Every process under a server, labelled from its process title (faasmoe.proctitle) and its parent."""
    out = {root.pid: root_label}
    try:
        family = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return {}
    roles: dict[int, tuple[str, str | None]] = {}
    parents: dict[int, int] = {}
    for p in family:
        try:
            roles[p.pid], parents[p.pid] = role_of(p), p.ppid()
        except psutil.Error:
            continue
    for pid, (role, tenant) in roles.items():
        if role == "orchestrator":
            out[pid] = Label("orchestrator", tenant)
        elif role in ("zygote", "function"):  # an instance not yet titled still has its zygote's title
            parent_is_zygote = roles.get(parents[pid], ("", None))[0] == "zygote"
            out[pid] = Label("function" if parent_is_zygote else role)
        else:
            out[pid] = Label("other")
    return out


def _scrape(servers: list[Server]) -> dict[str, float]:
    """Invocations, cold starts, warm hits, evictions, mid-call crashes summed over the servers' /metrics."""
    import re

    sums = {"invocations": 0.0, "cold_starts": 0.0, "warm_hits": 0.0, "evictions": 0.0, "crashes": 0.0}
    for s in servers:
        try:
            text = httpx.get(f"{s.base_url}/metrics", headers={"Authorization": "Bearer sk-bench-admin-0000"},
                             timeout=30).text
        except httpx.HTTPError:
            continue
        for key in sums:
            for m in re.finditer(rf"^faasmoe_function_{key}_total{{[^}}]*}} (\S+)$", text, re.M):
                sums[key] += float(m.group(1))
    return sums


def run_strategy(cfg: BenchConfig, name: str, k: int, arrivals: list[Arrival], bar: tqdm | None = None) -> dict:
    tenants = [f"t{i}" for i in range(cfg.workload.tenants)]
    set_title("bench", name if name == "baseline" else f"{name} k={k}")
    workdir = cleanup.make_workdir()
    servers: list[Server] = []
    try:
        if name == "baseline":
            servers += [_start_server(cfg, "monolithic", [t], k, workdir) for t in tenants]
        else:
            mode = "shared" if name == "faasmoe-shared" else "private"
            servers.append(_start_server(cfg, mode, tenants, k, workdir, always_on=name == "local-distribution"))
        _wait_healthy(servers, cfg.startup_timeout_s)
        roots = [(psutil.Process(s.proc.pid), s) for s in servers]

        def processes() -> dict[int, Label]:
            out: dict[int, Label] = {}
            for root, s in roots:
                if name == "baseline":
                    label = Label("baseline", s.tenants[0])
                else:
                    label = Label("control-plane" if name == "faasmoe-shared" else "server")
                out.update(label_tree(root, label))
            return out

        targets = {}
        for s in servers:
            for t in s.tenants:
                targets[int(t[1:])] = Target(s.base_url, _key(t), cfg.model.name)
        if bar is not None:
            bar.set_description(f"{name} k={k}" if name != "baseline" else name)
        meter = Meter(processes, interval=cfg.meter_interval_s).start()
        t0 = time.perf_counter()
        results = asyncio.run(run_load(arrivals, targets, progress=(lambda r: bar.update(1)) if bar else None))
        wall = time.perf_counter() - t0
        meter.stop()
        counters = _scrape(servers)
    finally:
        _stop(servers)
        cleanup.remove_workdir(workdir)
    return _report(name, k, cfg, meter, results, wall, counters)


def _report(name: str, k: int, cfg: BenchConfig, meter: Meter, results, wall: float, counters: dict) -> dict:
    load = summarize(results, wall)
    total = meter.totals()
    samples = meter.samples
    tokens_by_tenant: dict[str, int] = {}
    for r in results:
        if r.ok:
            tokens_by_tenant[f"t{r.tenant}"] = tokens_by_tenant.get(f"t{r.tenant}", 0) + r.prompt_tokens + r.completion_tokens
    all_tokens = sum(tokens_by_tenant.values()) or 1
    by_tenant = meter.by(lambda lb: lb.tenant or "")
    shared = by_tenant.get("", {"cpu_seconds": 0.0, "gb_seconds": 0.0})
    per_tenant = {}
    for i in range(cfg.workload.tenants):
        t = f"t{i}"
        share = tokens_by_tenant.get(t, 0) / all_tokens
        own = by_tenant.get(t, {"cpu_seconds": 0.0, "gb_seconds": 0.0})
        cpu = own["cpu_seconds"] + share * shared["cpu_seconds"]
        gbs = own["gb_seconds"] + share * shared["gb_seconds"]
        per_tenant[t] = {"cpu_seconds": cpu, "gb_seconds": gbs, "token_share": share,
                         "avg_cpu_percent": 100 * cpu / wall, "avg_memory_gb": gbs / wall,
                         "requests": sum(1 for r in results if r.tenant == i),
                         "errors": sum(1 for r in results if r.tenant == i and not r.ok)}
    n = cfg.workload.tenants
    out = {
        "strategy": name, "experts_per_function": None if name == "baseline" else k, "wall_s": wall,
        **{key: load[key] for key in ("requests", "completed", "errors", "completion_tokens", "prompt_tokens",
                                      "throughput_tokens_per_s", "ttft_p50_s", "ttft_p95_s", "tpot_p50_s",
                                      "tpot_p95_s", "latency_mean_s", "error_examples")},
        "cpu_seconds": total["cpu_seconds"], "gb_seconds": total["gb_seconds"],
        "avg_cpu_percent": 100 * total["cpu_seconds"] / wall,
        "peak_cpu_percent": max((s.cpu_percent for s in samples[1:]), default=0.0),
        "avg_memory_gb": total["gb_seconds"] / wall,
        "peak_memory_gb": max((s.pss for s in samples), default=0) / 1e9,
        "per_tenant_avg_cpu_percent": 100 * total["cpu_seconds"] / wall / n,
        "per_tenant_avg_memory_gb": total["gb_seconds"] / wall / n,
        "invocations": counters["invocations"], "cold_starts": counters["cold_starts"],
        "warm_hits": counters["warm_hits"], "evictions": counters["evictions"],
        "invocations_per_token": counters["invocations"] / max(1, load["completion_tokens"]),  # per generated token
        "by_role": {role: {"cpu_seconds": d["cpu_seconds"], "gb_seconds": d["gb_seconds"], "processes": d["processes"]}
                    for role, d in meter.by(lambda lb: lb.role).items()},
        "per_tenant": per_tenant,
        "timeline": [{"t": s.t, "cpu_percent": s.cpu_percent, "pss_gb": s.pss / 1e9, "rss_gb": s.rss / 1e9,
                      "processes": s.processes} for s in samples],
    }
    return out


def run_bench(cfg: BenchConfig, out: Path) -> dict:
    arrivals = schedule(cfg.workload)
    sweep = [k for k in cfg.sweep if k != cfg.experts_per_function]
    runs = [(s, cfg.experts_per_function) for s in cfg.strategies]
    runs += [(s, k) for k in sweep for s in cfg.sweep_strategies if s in cfg.strategies]
    report = {"machine": machine_info(), "model": str(cfg.model), "workload": workload_json(cfg.workload),
              "experts_per_function": cfg.experts_per_function, "keep_alive_s": cfg.keep_alive_s,
              "strategies": {}, "sweep": []}
    with tqdm(total=len(arrivals) * len(runs), unit="req") as bar:
        for name, k in runs:
            r = run_strategy(cfg, name, k, arrivals, bar)
            if k == cfg.experts_per_function or name == "baseline":
                report["strategies"][name] = r
            if name in FAASMOE:
                report["sweep"].append({key: r[key] for key in (
                    "strategy", "experts_per_function", "invocations_per_token", "tpot_p50_s", "ttft_p50_s",
                    "avg_memory_gb", "peak_memory_gb", "cpu_seconds", "gb_seconds", "cold_starts", "errors")})
    report["comparison"] = compare(report["strategies"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown(report))
    from faasmoe.bench.plots import plot_all

    plot_all(report, out)
    return report


def compare(strategies: dict) -> dict:
    """The targets: each strategy against the Baseline, as ratios measured in this one run."""
    base = strategies.get("baseline")
    if not base:
        return {}
    out = {}
    for name, r in strategies.items():
        if name == "baseline":
            continue
        out[name] = {
            "cpu_seconds_ratio": r["cpu_seconds"] / base["cpu_seconds"] if base["cpu_seconds"] else None,
            "gb_seconds_ratio": r["gb_seconds"] / base["gb_seconds"] if base["gb_seconds"] else None,
            "tpot_p50_ratio": (r["tpot_p50_s"] / base["tpot_p50_s"]) if r["tpot_p50_s"] and base["tpot_p50_s"] else None,
            "ttft_p50_ratio": (r["ttft_p50_s"] / base["ttft_p50_s"]) if r["ttft_p50_s"] and base["ttft_p50_s"] else None,
        }
    return out


def _f(v, fmt: str = ".2f") -> str:
    return "n/a" if v is None else format(v, fmt)


def markdown(report: dict) -> str:
    w = report["workload"]
    lines = [f"# faasmoe bench: {report['model']}", "",
             f"{w['tenants']} tenants, {w['arrival']} arrivals at {w['rates']} req/s per tenant for "
             f"{w['duration_s']:g} s, prompts {w['prompt_tokens']} tokens, outputs {w['output_tokens']} tokens, "
             f"seed {w['seed']}; faasmoe at {report['experts_per_function']} experts per function, keep-alive "
             f"{report['keep_alive_s']:g} s. Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
             f"{report['machine']['memory_gib']} GiB, {report['machine']['date']}.", "",
             "| strategy | requests | errors | CPU-s | GB-s | avg CPU % | peak CPU % | avg mem GB | peak mem GB "
             "| per-tenant avg CPU % | per-tenant avg mem GB | TTFT p50/p95 s | TPOT p50/p95 ms | tokens/s "
             "| invocations/token | cold starts |",
             "|---|" + "---|" * 15]
    for name, r in report["strategies"].items():
        lines.append(
            f"| {name} | {r['requests']} | {r['errors']} | {_f(r['cpu_seconds'], '.1f')} | {_f(r['gb_seconds'], '.1f')} "
            f"| {_f(r['avg_cpu_percent'], '.1f')} | {_f(r['peak_cpu_percent'], '.0f')} | {_f(r['avg_memory_gb'])} "
            f"| {_f(r['peak_memory_gb'])} | {_f(r['per_tenant_avg_cpu_percent'], '.1f')} "
            f"| {_f(r['per_tenant_avg_memory_gb'], '.3f')} | {_f(r['ttft_p50_s'])}/{_f(r['ttft_p95_s'])} "
            f"| {_f(r['tpot_p50_s'] and 1000 * r['tpot_p50_s'], '.1f')}/{_f(r['tpot_p95_s'] and 1000 * r['tpot_p95_s'], '.1f')} "
            f"| {_f(r['throughput_tokens_per_s'], '.1f')} | {_f(r['invocations_per_token'])} | {int(r['cold_starts'])} |")
    if report.get("comparison"):
        lines += ["", "Against the Baseline (ratios in this run; the target for faasmoe-shared is at most 0.25 for "
                  "CPU-seconds and GB-seconds, and about 1.5 or less for TPOT p50):", "",
                  "| strategy | CPU-s ratio | GB-s ratio | TPOT p50 ratio | TTFT p50 ratio |", "|---|---|---|---|---|"]
        for name, c in report["comparison"].items():
            lines.append(f"| {name} | {_f(c['cpu_seconds_ratio'], '.3f')} | {_f(c['gb_seconds_ratio'], '.3f')} "
                         f"| {_f(c['tpot_p50_ratio'])} | {_f(c['ttft_p50_ratio'])} |")
    lines += ["", "Per tenant (own processes plus its token share of the shared ones):", "",
              "| strategy | " + " | ".join(f"{t} CPU-s / GB-s" for t in next(iter(report["strategies"].values()))
                                             ["per_tenant"]) + " |",
              "|---|" + "---|" * len(next(iter(report["strategies"].values()))["per_tenant"])]
    for name, r in report["strategies"].items():
        lines.append(f"| {name} | " + " | ".join(f"{_f(d['cpu_seconds'], '.1f')} / {_f(d['gb_seconds'], '.1f')}"
                                               for d in r["per_tenant"].values()) + " |")
    if report["sweep"]:
        lines += ["", "Granularity (experts per function):", "",
                  "| strategy | k | invocations/token | TPOT p50 ms | TTFT p50 s | avg mem GB | CPU-s | GB-s "
                  "| cold starts | errors |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(report["sweep"], key=lambda r: (r["strategy"], r["experts_per_function"])):
            lines.append(f"| {r['strategy']} | {r['experts_per_function']} | {_f(r['invocations_per_token'])} "
                         f"| {_f(r['tpot_p50_s'] and 1000 * r['tpot_p50_s'], '.1f')} | {_f(r['ttft_p50_s'])} "
                         f"| {_f(r['avg_memory_gb'])} | {_f(r['cpu_seconds'], '.1f')} | {_f(r['gb_seconds'], '.1f')} "
                         f"| {int(r['cold_starts'])} | {r['errors']} |")
    lines += ["", "Plots: memory.png, cpu.png (over time), tenants.png (per tenant), granularity.png.", ""]
    return "\n".join(lines)
