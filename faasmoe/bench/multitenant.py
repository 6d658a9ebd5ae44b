"""`faasmoe bench`: five deployment strategies, one after the other, on the same machine and load.

* baseline: one full-model server per tenant (`faasmoe serve --mode monolithic`: its own process and
  its own copy of every weight, continuous batching of its own requests), what a tenant deploys alone;
* shared-monolithic: one such server for every tenant: what a vLLM or llama.cpp user deploys when
  isolation does not matter, the strongest resource baseline;
* faasmoe-private: `faasmoe serve --mode private`, a control plane per tenant, experts as shared
  scale-to-zero functions on the embedded FaaS platform;
* faasmoe-shared: `faasmoe serve --mode shared`, one control plane batching every tenant;
* local-distribution: the experts spread over always-on local worker processes (the reference's
  "Local Distribution": expert blocks off the tenant's process, but provisioned, not serverless):
  private mode with every function loaded up front (in the platform's host processes), never scaled to zero.
* llama-cpp (opt-in, `--strategy llama-cpp`): one llama.cpp `llama-server` for every tenant, one slot
  per tenant with continuous batching, on the same checkpoint converted to GGUF in the same dtype:
  the CPU engine users deploy (built by scripts/build-llama-cpp.sh, see faasmoe.bench.llamacpp).

Each runs as real processes, metered from outside (CPU from the kernel's counters from
each process's start to its exit; memory both physical, PSS summed, and billed, RSS
summed; the page cache of the checkpoint's files on its own line), under the same
multi-tenant load from the same seed, at each request rate of the sweep. The figures
are per run and per generated token, over the run's drain time (first arrival to last
completion); the headline compares at the highest rate the Baseline sustains.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import psutil
import torch
from tqdm import tqdm

from faasmoe.bench import cleanup
from faasmoe.bench.cgroup import MemoryCgroup
from faasmoe.metering.pagecache import evict
from faasmoe.bench.corpus import expert_top_share
from faasmoe.bench.defaults import DEFAULTS
from faasmoe.bench.load import (Arrival, Result, Target, Workload, percentile, run_load, schedule, summarize,
                                workload_json)
from faasmoe.bench.machine import machine_info
from faasmoe.metering.billing import split_interval
from faasmoe.metering.meter import Label, Meter
from faasmoe.models.checkpoint import Checkpoint
from faasmoe.proctitle import role_of, set_title

STRATEGIES = ("baseline", "shared-monolithic", "faasmoe-private", "faasmoe-shared", "local-distribution")
PEERS = ("llama-cpp",)  # other engines, run only when asked for
# shared-monolithic with its weights mapped, paged in and out by the kernel: the way to try a model larger than
# memory (run when asked for, with --memory-limit)
PAGED = ("monolithic-mmap",)
KNOWN = STRATEGIES + PAGED + PEERS
MONOLITHIC = ("baseline", "shared-monolithic") + PAGED
WITHOUT_FUNCTIONS = MONOLITHIC + PEERS
FAASMOE = ("faasmoe-private", "faasmoe-shared")
TENANT_WEIGHTS = (1.5, 1.0, 0.5)  # each tenant's rate relative to the mean, cycled: tenants differ
SUSTAINED = 1.2  # a rate is sustained when the drain time stays within this many arrival windows


@dataclass
class BenchConfig:
    model: Path
    workload: Workload  # its `rates` are set from each rate of the sweep and TENANT_WEIGHTS
    rates: list[float] = field(default_factory=lambda: [0.1])  # mean requests/s per tenant, one pass each
    experts_per_function: int = 4
    keep_alive_s: float = 10.0
    keep_alive_sweep: list[float] = field(default_factory=list)  # faasmoe-shared at these keep-alives ...
    keep_alive_ks: tuple[int, ...] = (1, 4)  # ... for each of these k, at the sweep's middle rate
    sweep: list[int] = field(default_factory=list)  # k values for the granularity sweep
    sweep_strategies: tuple[str, ...] = FAASMOE
    strategies: tuple[str, ...] = STRATEGIES
    platform: str = "local"
    max_batch: int = 16
    meter_interval_s: float = 1.0  # reading a 2 GB process's smaps costs ~17 ms: sample sparingly
    startup_timeout_s: float = 600.0
    memory_budget: int | None = None  # bytes: faasmoe's servers' expert memory budget
    memory_limit: int | None = None  # bytes: every run's processes in a memory cgroup with this hard limit
    prefetch_layers: int = 0  # faasmoe's servers: warm the functions predicted this many layers ahead
    compile_experts: bool = False  # faasmoe's servers: serve --compile-experts


def make_config(quick: bool, *, model: Path | None = None, tenants: int = 6, rates: list[float] | None = None,
                arrival: str = "bursty", burst_on_s: float | None = None, burst_off_s: float | None = None,
                duration_s: float | None = None, max_requests: int | None = None,
                prompt_tokens: tuple[int, int] | None = None, output_tokens: tuple[int, int] | None = None,
                seed: int = 0, experts_per_function: int | None = None, keep_alive_s: float | None = None,
                keep_alive_sweep: list[float] | None = None, keep_alive_ks: tuple[int, ...] = (1, 4),
                sweeps: bool = True, sweep: list[int] | None = None, sweep_strategies: tuple[str, ...] = (),
                strategies: tuple[str, ...] = (), platform: str = "local", memory_budget: int | None = None,
                memory_limit: int | None = None, prefetch_layers: int = 0, compile_experts: bool = False
                ) -> BenchConfig:
    """A bench from what the user gave (None or empty: the default of a full or a --quick bench)."""
    d = DEFAULTS[quick]

    def pick(value, name):
        return d[name] if value is None or value == [] else value

    workload = Workload(tenants=tenants, arrival=arrival, burst_on_s=pick(burst_on_s, "burst_on_s"),  # type: ignore[arg-type]
                        burst_off_s=pick(burst_off_s, "burst_off_s"), duration_s=pick(duration_s, "duration_s"),
                        max_requests=max_requests, prompt_tokens=pick(prompt_tokens, "prompt_tokens"),
                        output_tokens=pick(output_tokens, "output_tokens"), seed=seed)
    closed = arrival == "concurrent"  # one load however many rates: every tenant at once, back to back
    return BenchConfig(model=Path(pick(model, "model")).resolve(), workload=workload,
                       rates=[0.0] if closed else pick(rates, "rates"),
                       experts_per_function=pick(experts_per_function, "experts_per_function"),
                       keep_alive_s=pick(keep_alive_s, "keep_alive_s"),
                       keep_alive_sweep=pick(keep_alive_sweep, "keep_alive_sweep") if sweeps else [],
                       keep_alive_ks=keep_alive_ks, sweep=(sweep or []) if sweeps else [],
                       sweep_strategies=sweep_strategies or FAASMOE, strategies=strategies or STRATEGIES,
                       platform=platform, memory_budget=memory_budget, memory_limit=memory_limit,
                       prefetch_layers=prefetch_layers, compile_experts=compile_experts)


@dataclass(frozen=True)
class RunSpec:
    """One strategy under one load: the unit of the report."""

    strategy: str
    rate: float  # mean requests/s per tenant
    k: int | None  # experts per function (None: no functions)
    keep_alive_s: float | None
    purpose: str = "main"  # main | keep-alive | granularity


def tenant_rates(rate: float, tenants: int) -> list[float]:
    """Per-tenant rates with mean `rate`: tenants differ (TENANT_WEIGHTS), the load is the same for all strategies."""
    weights = [TENANT_WEIGHTS[i % len(TENANT_WEIGHTS)] for i in range(tenants)]
    mean = sum(weights) / len(weights)
    return [rate * w / mean for w in weights]


def plan(cfg: BenchConfig) -> list[RunSpec]:
    """Every run of a bench: each strategy at each rate, then the keep-alive and granularity sweeps."""
    def spec(strategy: str, rate: float, k: int, keep_alive: float, purpose: str = "main") -> RunSpec:
        mono = strategy in WITHOUT_FUNCTIONS
        return RunSpec(strategy, rate, None if mono else k, None if mono else keep_alive, purpose)

    runs = [spec(s, r, cfg.experts_per_function, cfg.keep_alive_s) for r in cfg.rates for s in cfg.strategies]
    middle = sorted(cfg.rates)[len(cfg.rates) // 2]
    for k in cfg.keep_alive_ks if cfg.keep_alive_sweep else ():
        for ka in cfg.keep_alive_sweep:
            runs.append(spec("faasmoe-shared", middle, k, ka, "keep-alive"))
    for k in cfg.sweep:
        runs += [spec(s, middle, k, cfg.keep_alive_s, "granularity") for s in cfg.sweep_strategies
                 if s in cfg.strategies]
    seen, out = set(), []
    for r in runs:  # a sweep point that is also a main run is run once
        key = (r.strategy, r.rate, r.k, r.keep_alive_s)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


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


ADMIN_KEY = "sk-bench-admin-0000"


def _key(tenant: str) -> str:
    return f"sk-bench-{tenant}-0000"


def _start_server(cfg: BenchConfig, mode: str, tenants: list[str], k: int, workdir: Path,
                  always_on: bool = False, keep_alive_s: float | None = None, threads: int | None = None,
                  extra: tuple[str, ...] = ()) -> Server:
    port = _free_port()
    max_out = cfg.workload.output_tokens[1]
    lines = [f'model = "{cfg.model}"', f'mode = "{mode}"', f'platform = "{cfg.platform}"', f"port = {port}",
             f"experts_per_function = {k}", f"max_batch = {cfg.max_batch}", "max_queue = 4096",
             f"max_tokens_limit = {max(max_out, 16)}", f'admin_key = "{ADMIN_KEY}"',
             f"keep_alive_s = {1e9 if always_on else (keep_alive_s or cfg.keep_alive_s)}",
             "meter_interval_s = 10.0"]  # the bench meters from outside; the server's own meter stays quiet
    if always_on:
        lines += ["prewarm = true", "max_instances = 1"]
    if threads:
        lines.append(f"threads = {threads}")
    if mode != "monolithic":
        if cfg.memory_budget:
            lines.append(f"memory_budget = {cfg.memory_budget}")
        if cfg.prefetch_layers:
            lines.append(f"prefetch_layers = {cfg.prefetch_layers}")
        if cfg.compile_experts:
            lines.append("compile_experts = true")
    lines += extra
    for t in tenants:
        lines += ["[[tenants]]", f'name = "{t}"', f'key = "{_key(t)}"', "max_concurrency = 1024",
                  "tokens_per_minute = 1000000000", "max_queued = 4096"]
    conf = workdir / f"{mode}-{port}.toml"
    conf.write_text("\n".join(lines) + "\n")
    log = workdir / f"{mode}-{port}.log"
    # Every engine with its own defaults, OpenMP's spin-then-sleep included (its spinning is counted as the CPU it
    # is). OMP_WAIT_POLICY=PASSIVE, used before, made every parallel region wake sleeping threads: at batch 8 on
    # 2 cores a monolithic step took 2.4x as long, a faasmoe step (k=4) 1.1x.
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
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


def _scrape(servers: list[Server]) -> dict:
    """Function counters summed over the servers' /metrics, and the routing pairs per [layer][expert]."""
    import re

    sums = {"invocations": 0.0, "cold_starts": 0.0, "prefetches": 0.0, "warm_hits": 0.0, "evictions": 0.0,
            "budget_evictions": 0.0, "crashes": 0.0, "busy_seconds": 0.0, "cold_start_seconds": 0.0, "load_seconds": 0.0, "loaded_bytes": 0.0}
    routed: dict[int, dict[int, float]] = {}
    predicted: dict[int, float] = {}  # layer -> routing pairs prefetch predicted
    hits: dict[int, float] = {}  # layer -> of those, the pairs routed
    for s in servers:
        try:
            text = httpx.get(f"{s.base_url}/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                             timeout=30).text
        except httpx.HTTPError:
            continue
        for key in sums:
            for m in re.finditer(rf"^faasmoe_function_{key}_total{{[^}}]*}} (\S+)$", text, re.M):
                sums[key] += float(m.group(1))
        for m in re.finditer(r'^faasmoe_routed_pairs_total{expert="(\d+)",layer="(\d+)"} (\S+)$', text, re.M):
            row = routed.setdefault(int(m.group(2)), {})
            row[int(m.group(1))] = row.get(int(m.group(1)), 0.0) + float(m.group(3))
        for kind, into in (("predicted", predicted), ("hit", hits)):
            for m in re.finditer(rf'^faasmoe_prefetch_{kind}_pairs_total{{layer="(\d+)"}} (\S+)$', text, re.M):
                into[int(m.group(1))] = into.get(int(m.group(1)), 0.0) + float(m.group(2))
    return {**sums, "routed": routed, "prefetch_predicted": predicted, "prefetch_hits": hits}


def _start_llama_server(cfg: BenchConfig, tenants: list[str], workdir: Path) -> Server:
    from faasmoe.bench import llamacpp

    port = _free_port()
    context = cfg.workload.prompt_tokens[1] + cfg.workload.output_tokens[1] + 16
    cmd = llamacpp.server_command(llamacpp.gguf_for(cfg.model), port, parallel=len(tenants),
                                  threads=torch.get_num_threads(), context=context)
    log = workdir / f"llama-server-{port}.log"
    with log.open("w") as out:
        proc = cleanup.spawn(cmd, stdout=out, stderr=subprocess.STDOUT, env=llamacpp.server_env())
    return Server(proc, f"http://127.0.0.1:{port}", tenants, log)


def _servers_for(cfg: BenchConfig, run: RunSpec, tenants: list[str], workdir: Path) -> list[Server]:
    k = run.k or cfg.experts_per_function
    if run.strategy == "llama-cpp":
        return [_start_llama_server(cfg, tenants, workdir)]
    # One control plane (or model) per tenant shares the cores with the others: each gets its part of them,
    # as an operator would configure it; torch's default, a thread per core in each, makes N pools spin
    # against each other (measured here: 6 Baseline servers at 0.02 req/s, 0.57 CPU-s per token against
    # 0.11 for one shared server, and a drain 2.6x the arrival window).
    per_tenant = max(1, len(os.sched_getaffinity(0)) // len(tenants))
    if run.strategy == "baseline":
        return [_start_server(cfg, "monolithic", [t], k, workdir, threads=per_tenant) for t in tenants]
    if run.strategy == "shared-monolithic":
        return [_start_server(cfg, "monolithic", tenants, k, workdir)]
    if run.strategy == "monolithic-mmap":
        return [_start_server(cfg, "monolithic", tenants, k, workdir, extra=('monolithic_weights = "mapped"',))]
    mode = "shared" if run.strategy == "faasmoe-shared" else "private"
    return [_start_server(cfg, mode, tenants, k, workdir, always_on=run.strategy == "local-distribution",
                          keep_alive_s=run.keep_alive_s, threads=per_tenant if mode == "private" else None)]


def run_strategy(cfg: BenchConfig, run: RunSpec, arrivals: list[Arrival], bar: tqdm | None = None) -> dict:
    tenants = [f"t{i}" for i in range(cfg.workload.tenants)]
    name = run.strategy if run.k is None else f"{run.strategy} k={run.k} keep-alive={run.keep_alive_s:g}s"
    set_title("bench", name.replace(" ", "-"))
    workdir = cleanup.make_workdir()
    servers: list[Server] = []
    group = None
    try:
        if cfg.memory_limit:
            # Page cache is charged to the cgroup that reads it first: pages the checkpoint left in it (writing
            # it, earlier runs) would be free to this run and outside its limit. Every run starts without them.
            for shard in cfg.model.glob("*.safetensors"):
                evict(shard)
            group = MemoryCgroup(cfg.memory_limit)
        servers = _servers_for(cfg, run, tenants, workdir)
        if group is not None:  # before they load anything: every page they touch is charged to the group
            for s in servers:
                group.add(s.proc.pid)
        try:
            _wait_healthy(servers, cfg.startup_timeout_s)
        except RuntimeError as e:  # under a memory limit a server may not even load: that is a result
            if group is None:
                raise
            return _failed_run(run, str(e), group)
        roots = [(psutil.Process(s.proc.pid), s) for s in servers]

        def processes() -> dict[int, Label]:
            out: dict[int, Label] = {}
            for root, s in roots:
                if run.strategy == "baseline":
                    label = Label("baseline", s.tenants[0])
                elif run.strategy in ("shared-monolithic", "llama-cpp"):
                    label = Label(run.strategy)
                else:
                    label = Label("control-plane" if run.strategy == "faasmoe-shared" else "server")
                out.update(label_tree(root, label))
            return out

        targets = {int(t[1:]): Target(s.base_url, _key(t), cfg.model.name) for s in servers for t in s.tenants}
        if bar is not None:
            bar.set_description(f"{name} @ {run.rate:g}/s")
        meter = Meter(processes, interval=cfg.meter_interval_s,
                      page_cache_files=sorted(cfg.model.glob("*.safetensors"))).start()
        results = asyncio.run(run_load(arrivals, targets, progress=(lambda r: bar.update(1)) if bar else None))
        meter.stop()
        metered_s = time.monotonic() - meter.started_at  # the window the integrals cover (Meter's clock)
        counters = _scrape(servers)
        limited = _limit_figures(group)
    finally:
        _stop(servers)
        cleanup.remove_workdir(workdir)
        if group is not None:
            group.remove()
    experts = Checkpoint(cfg.model).num_experts
    return {**report_run(run, cfg.workload.tenants, experts, meter, metered_s, arrivals, results, counters),
            **limited}


def _limit_figures(group: MemoryCgroup | None) -> dict:
    """What the memory cgroup saw: its limit, its peak (page cache included) and the processes it killed."""
    if group is None:
        return {}
    return {"memory_limit_bytes": group.limit, "cgroup_peak_bytes": group.peak_bytes(),
            "oom_kills": group.oom_kills()}


def _failed_run(run: RunSpec, why: str, group: MemoryCgroup) -> dict:
    """A run whose servers did not start under the memory limit (killed, or out of time)."""
    lines = [line for line in why.splitlines() if line.strip()]
    return {"strategy": run.strategy, "rate_per_tenant": run.rate, "purpose": run.purpose,
            "experts_per_function": run.k, "keep_alive_s": run.keep_alive_s,
            "failed": lines[0] + (f" (last line of its log: {lines[-1].strip()})" if len(lines) > 1 else ""),
            "log_tail": why[-2000:], **_limit_figures(group)}


def report_run(run: RunSpec, tenants: int, experts: int, meter: Meter, metered_s: float, arrivals: list[Arrival],
               results: list[Result], counters: dict) -> dict:
    """One run's figures: integrals over the metered window (the load's start to its last completion, which
    is the drain time plus the wait for the first arrival), averages over that window, and per token."""
    load = summarize(results, 1.0)
    first = min(a.at for a in arrivals)
    window = max(a.at for a in arrivals) - first
    drain = max((r.end_s for r in results), default=first) - first
    span = max(metered_s, 1e-9)
    total = meter.totals()
    tokens = max(1, load["completion_tokens"])
    samples = meter.samples
    records = [r for r in [*meter.records.values(), *meter.finished] if r.label.role == "function"]
    instance_s = sum((r.ended or r.last_seen) - (r.started or r.first_seen) for r in records)  # instance lifetimes
    routed = counters["routed"]
    predicted, hits = counters.get("prefetch_predicted", {}), counters.get("prefetch_hits", {})
    shares = [expert_top_share(torch.tensor([row.get(e, 0.0) for e in range(experts)]))
              for _, row in sorted(routed.items()) if sum(row.values())]
    cold = [r.ttft_s for r in results if r.ok and r.cold_prefill and r.ttft_s is not None]
    warm = [r.ttft_s for r in results if r.ok and r.cold_prefill is False and r.ttft_s is not None]
    by_tenant = meter.by(lambda lb: lb.tenant or "")
    shared = by_tenant.get("", {})
    served = {f"t{i}": sum(r.prompt_tokens + r.completion_tokens for r in results if r.ok and r.tenant == i)
              for i in range(tenants)}
    costs = ("cpu_seconds", "gb_seconds", "gb_seconds_billed")
    parts = split_interval({k: shared.get(k, 0.0) for k in costs}, served, costs)  # the run as one interval
    per_tenant = {t: {k: by_tenant.get(t, {}).get(k, 0.0) + parts[t][k] for k in costs} for t in served}
    return {
        "strategy": run.strategy, "rate_per_tenant": run.rate, "experts_per_function": run.k,
        "keep_alive_s": run.keep_alive_s, "purpose": run.purpose,
        "requests": load["requests"], "errors": load["errors"], "error_examples": load["error_examples"],
        "arrival_window_s": window, "drain_s": drain,
        "sustained": drain <= SUSTAINED * window if window > 0 else None,  # None: no window (a closed loop)
        "generated_tokens": load["completion_tokens"], "prompt_tokens": sum(r.prompt_tokens for r in results if r.ok),
        "metered_s": metered_s, "throughput_tokens_per_s": load["completion_tokens"] / max(drain, 1e-9),
        "cpu_seconds": total["cpu_seconds"], "cpu_seconds_per_token": total["cpu_seconds"] / tokens,
        "gb_seconds_physical": total["gb_seconds"], "gb_seconds_billed": total["gb_seconds_billed"],
        "gb_seconds_per_token_physical": total["gb_seconds"] / tokens,
        "gb_seconds_per_token_billed": total["gb_seconds_billed"] / tokens,
        "avg_mem_gb_physical": total["gb_seconds"] / span, "avg_mem_gb_billed": total["gb_seconds_billed"] / span,
        "peak_mem_gb_physical": max((s.pss for s in samples), default=0) / 1e9,
        "peak_mem_gb_billed": max((s.rss for s in samples), default=0) / 1e9,
        "avg_cpu_percent": 100 * total["cpu_seconds"] / span,
        "page_cache_gb_avg": meter.page_cache_gb_avg(),
        "cold_starts": counters["cold_starts"], "prefetches": counters["prefetches"],
        "evictions": counters["evictions"], "budget_evictions": counters.get("budget_evictions", 0.0),
        "cold_start_s_per_cold_start": (counters.get("cold_start_seconds", 0.0) / counters["cold_starts"]
                                        if counters["cold_starts"] else None),
        "load_read_gb_per_s": (counters.get("loaded_bytes", 0.0) / counters["load_seconds"] / 1e9
                               if counters.get("load_seconds") else None),
        "invocations": counters["invocations"], "invocations_per_token": counters["invocations"] / tokens,
        "prefetch_accuracy": (sum(hits.values()) / sum(predicted.values())) if predicted else None,
        "prefetch_accuracy_per_layer": {layer: hits.get(layer, 0.0) / n for layer, n in sorted(predicted.items())},
        "ttft_p50_s": load["ttft_p50_s"], "ttft_p99_s": load["ttft_p99_s"],
        "tpot_p50_ms": load["tpot_p50_ms"], "tpot_p99_ms": load["tpot_p99_ms"],
        "ttft_cold_prefill_p50_s": percentile(cold, 0.5), "ttft_warm_prefill_p50_s": percentile(warm, 0.5),
        "cold_prefill_requests": len(cold),
        "function_instance_s": instance_s,
        "idle_warm_fraction": (1 - counters["busy_seconds"] / instance_s) if instance_s else None,
        "expert_top10pct_share": (sum(s for s in shares if s is not None) / len(shares)) if shares else None,
        "expert_top10pct_share_per_layer": shares,
        "by_role": {role: {"cpu_seconds": d["cpu_seconds"], "gb_seconds": d["gb_seconds"],
                           "gb_seconds_billed": d["gb_seconds_billed"], "processes": d["processes"]}
                    for role, d in meter.by(lambda lb: lb.role).items()},
        "per_tenant": per_tenant,
        "timeline": [{"t": s.t, "cpu_percent": s.cpu_percent, "pss_gb": s.pss / 1e9, "rss_gb": s.rss / 1e9,
                      "page_cache_gb": s.page_cache_bytes / 1e9, "processes": s.processes} for s in samples],
    }


def run_bench(cfg: BenchConfig, out: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(cfg.model), local_files_only=True)
    runs = plan(cfg)
    arrivals_at = {}
    for rate in sorted({r.rate for r in runs}):
        w = replace(cfg.workload, rates=tenant_rates(rate, cfg.workload.tenants))
        arrivals_at[rate] = schedule(w, tokenizer)
    report = {"machine": machine_info(), "model": str(cfg.model), "workload": workload_json(cfg.workload),
              "tenant_weights": TENANT_WEIGHTS, "rates": cfg.rates, "experts_per_function": cfg.experts_per_function,
              "keep_alive_s": cfg.keep_alive_s, "platform": cfg.platform, "compile_experts": cfg.compile_experts,
              "runs": [], "failed_runs": []}
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=sum(len(arrivals_at[r.rate]) for r in runs), unit="req") as bar:
        for run in runs:
            result = run_strategy(cfg, run, arrivals_at[run.rate], bar)
            report["failed_runs" if "failed" in result else "runs"].append(result)
            report["headline"] = headline(report["runs"])
            write_report(report, out)  # after every run: a bench stopped midway keeps what it measured
    from faasmoe.bench.plots import plot_all

    plot_all(report, out)
    return report


def write_report(report: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown(report))


def headline(runs: list[dict]) -> dict:
    """faasmoe-shared against both baselines at the highest rate the Baseline sustains (drain time within
    SUSTAINED arrival windows), as footprint ratios and as resources per token; with the goals' verdicts."""
    main = [r for r in runs if r["purpose"] == "main"]
    base = {r["rate_per_tenant"]: r for r in main if r["strategy"] == "baseline"}
    sustained = sorted(rate for rate, r in base.items() if r["sustained"])
    rates = sorted({r["rate_per_tenant"] for r in main})
    rate = sustained[-1] if sustained else (min(base) if base else (rates[-1] if rates else None))
    at = {r["strategy"]: r for r in main if r["rate_per_tenant"] == rate}
    out: dict = {"rate_per_tenant": rate, "baseline_sustained": bool(sustained), "baseline_run": bool(base),
                 "versus": {}}
    keys = ("avg_mem_gb_physical", "avg_mem_gb_billed", "avg_cpu_percent", "cpu_seconds_per_token",
            "gb_seconds_per_token_physical", "ttft_p50_s", "tpot_p50_ms", "throughput_tokens_per_s")
    for name, r in at.items():
        for ref in WITHOUT_FUNCTIONS:  # the baselines and the peer engines
            if name == ref or ref not in at:
                continue
            b = at[ref]
            out["versus"].setdefault(name, {})[ref] = {
                k: (r[k] / b[k]) if r.get(k) is not None and b.get(k) else None for k in keys}
    shared = out["versus"].get("faasmoe-shared", {})
    vb, vm = shared.get("baseline"), shared.get("shared-monolithic")
    out["goals"] = {
        "memory_at_most_a_third_of_baseline": vb and vb["avg_mem_gb_physical"] is not None
        and vb["avg_mem_gb_physical"] <= 1 / 3,
        "cpu_per_token_at_most_baseline": vb and vb["cpu_seconds_per_token"] is not None
        and vb["cpu_seconds_per_token"] <= 1.0,
        "memory_below_shared_monolithic": vm and vm["avg_mem_gb_physical"] is not None
        and vm["avg_mem_gb_physical"] < 1.0,
        "cpu_per_token_within_1_3x_shared_monolithic": vm and vm["cpu_seconds_per_token"] is not None
        and vm["cpu_seconds_per_token"] <= 1.3,
    }
    return out


def _headline_rate(h: dict) -> str:
    if h["baseline_sustained"]:
        return "the highest rate the Baseline sustains"
    if h.get("baseline_run", True):
        return "the Baseline sustains no rate of the sweep: lowest rate"
    return "no Baseline in this run: highest rate"


def _f(v, fmt: str = ".2f") -> str:
    return "n/a" if v is None else format(v, fmt)


def markdown(report: dict) -> str:
    w, m = report["workload"], report["machine"]
    closed = w["arrival"] == "concurrent"
    load = (f"{w['tenants']} tenants at once, each sending {w['max_requests'] or 1} request(s) one after another "
            "(a closed loop)" if closed else
            f"{w['tenants']} tenants, {w['arrival']} arrivals (on periods {w['burst_on_s']:g} s at 3x the rate, off "
            f"periods {w['burst_off_s'] or w['burst_on_s']:g} s) for {w['duration_s']:g} s; per-tenant rates "
            f"weighted {report['tenant_weights']} around each mean rate of {report['rates']} req/s")
    lines = [f"# faasmoe bench: {report['model']}", "",
             f"{load}; prompts "
             f"{w['prompt_tokens']} tokens of English text, outputs {w['output_tokens']} tokens, seed {w['seed']}; "
             f"faasmoe at k = {report['experts_per_function']} on the {report.get('platform', 'local')} platform, "
             f"keep-alive {report['keep_alive_s']:g} s. Machine: "
             f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['date']}.", "",
             "Integrals and averages cover each run's metered window (the load's start to its last completion: the "
             "drain time, first arrival to last completion, plus the wait for the first arrival). Physical memory: PSS "
             "summed (a page shared by n processes counts 1/n); billed: RSS summed (what a provider charges each "
             "instance). Page cache: the checkpoint's pages resident in the page cache, mapped or not.", ""]
    h = report.get("headline") or {}
    if h.get("rate_per_tenant") is not None:
        title = ("the closed loop (one load)" if closed
                 else f"{h['rate_per_tenant']:g} req/s per tenant ({_headline_rate(h)})")
        lines += [f"## Headline: {title}",
                  "", "| strategy | vs | avg mem physical | avg mem billed | avg CPU % | CPU-s/token | GB-s/token "
                  "| TTFT p50 | TPOT p50 | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, refs in h["versus"].items():
            for ref, v in refs.items():
                lines.append(f"| {name} | {ref} | " + " | ".join(
                    _f(v.get(k), ".3f") for k in ("avg_mem_gb_physical", "avg_mem_gb_billed", "avg_cpu_percent",
                                                  "cpu_seconds_per_token", "gb_seconds_per_token_physical",
                                                  "ttft_p50_s", "tpot_p50_ms", "throughput_tokens_per_s")) + " |")
        lines += ["", "Goals: " + ", ".join(f"{k.replace('_', ' ')}: {'met' if v else 'MISSED'}"
                                             for k, v in h["goals"].items()), ""]
    cols = ("requests", "errors", "arrival_window_s", "drain_s", "generated_tokens", "throughput_tokens_per_s",
            "avg_mem_gb_physical",
            "peak_mem_gb_physical", "avg_mem_gb_billed", "page_cache_gb_avg", "avg_cpu_percent",
            "cpu_seconds_per_token", "gb_seconds_per_token_physical", "ttft_p50_s", "ttft_p99_s", "tpot_p50_ms",
            "tpot_p99_ms", "cold_starts", "load_read_gb_per_s", "evictions", "ttft_cold_prefill_p50_s", "ttft_warm_prefill_p50_s",
            "idle_warm_fraction", "expert_top10pct_share")
    if any("cgroup_peak_bytes" in r for r in report["runs"]):  # a bench under --memory-limit
        cols += ("budget_evictions", "cgroup_peak_bytes", "oom_kills")
    if any(r.get("prefetch_accuracy") is not None for r in report["runs"]):  # a bench with --prefetch-layers
        cols += ("prefetches", "prefetch_accuracy")
    for purpose, title in (("main", "All runs"), ("keep-alive", "Keep-alive sweep (faasmoe-shared)"),
                           ("granularity", "Granularity sweep")):
        rows = [r for r in report["runs"] if r["purpose"] == purpose]
        if not rows:
            continue
        if purpose != "main":  # a sweep point that is also a main run was run once, as the main run
            rate = rows[0]["rate_per_tenant"]
            rows += [r for r in report["runs"] if r["purpose"] == "main" and r["rate_per_tenant"] == rate
                     and r["strategy"] in {x["strategy"] for x in rows}]
            rows.sort(key=lambda r: (r["strategy"], r["experts_per_function"] or 0, r["keep_alive_s"] or 0))
        lines += [f"## {title}", "", "| strategy | rate | k | keep-alive | " + " | ".join(cols) + " |",
                  "|---|---|---|---|" + "---|" * len(cols)]
        for r in rows:
            cells = [_f(r.get(c), ".3f") if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols]
            lines.append(f"| {r['strategy']} | {'-' if closed else format(r['rate_per_tenant'], 'g')} "
                         f"| {r['experts_per_function'] or '-'} "
                         f"| {_f(r['keep_alive_s'], 'g')} | " + " | ".join(cells) + " |")
        lines.append("")
    if report.get("failed_runs"):
        lines += ["## Runs that did not start", ""]
        def where(r: dict) -> str:
            return "in the closed loop" if closed else f"at {r['rate_per_tenant']:g} req/s"

        lines += [f"* {r['strategy']} {where(r)}: {r['failed'].splitlines()[0]} (memory limit "
                  f"{r.get('memory_limit_bytes', 0) / 2**30:.1f} GiB, peak {r.get('cgroup_peak_bytes', 0) / 2**30:.1f} "
                  f"GiB, {r.get('oom_kills', 0)} processes killed)" for r in report["failed_runs"]]
        lines.append("")
    lines += ["Plots: memory.png, cpu.png (over time, the closed loop)." if closed else
              "Plots: memory.png, cpu.png (over time, headline rate), rates.png (memory and CPU per token by "
              "rate).", ""]
    return "\n".join(lines)
