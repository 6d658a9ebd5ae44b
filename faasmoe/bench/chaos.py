"""`faasmoe bench --chaos`: a multi-tenant load while function instances are killed at random.

The same load (same seed, greedy decoding) runs twice against a fresh server: once
without faults, once while a killer SIGKILLs a random function instance every
`interval` seconds. The figures to reach: every request completed, and every output's
token ids identical to the fault-free run's.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil

from faasmoe.bench import cleanup
from faasmoe.bench.load import run_load, schedule
from faasmoe.bench.machine import machine_info
from faasmoe.bench.multitenant import (BenchConfig, Target, _key, _scrape, _start_server, _stop, _wait_healthy,
                                       label_tree, tenant_rates)
from faasmoe.metering.meter import Label
from faasmoe.proctitle import set_title


def _run(cfg: BenchConfig, mode: str, arrivals, kill_every: float | None, seed: int) -> tuple[list, int, int]:
    """The load through one server; its results, the instances killed, and the calls those kills cut short."""
    tenants = [f"t{i}" for i in range(cfg.workload.tenants)]
    set_title("bench", "chaos", mode, "killing" if kill_every else "fault-free")
    workdir = cleanup.make_workdir()
    servers = []
    kills = 0
    stop = threading.Event()

    def killer() -> None:
        nonlocal kills
        rng = random.Random(seed)
        root = psutil.Process(servers[0].proc.pid)
        while not stop.wait(kill_every):
            victims = [pid for pid, lb in label_tree(root, Label("server")).items() if lb.role == "function"]
            if victims:
                try:
                    psutil.Process(rng.choice(sorted(victims))).send_signal(signal.SIGKILL)
                    kills += 1
                except psutil.Error:
                    pass

    try:
        servers.append(_start_server(cfg, mode, tenants, cfg.experts_per_function, workdir))
        server = servers[0]
        _wait_healthy(servers, cfg.startup_timeout_s)
        targets = {i: Target(server.base_url, _key(t), cfg.model.name) for i, t in enumerate(tenants)}
        thread = threading.Thread(target=killer, daemon=True) if kill_every else None
        if thread:
            thread.start()
        results = asyncio.run(run_load(arrivals, targets))
        stop.set()
        if thread:
            thread.join()
        cut = int(_scrape([server])["crashes"])
    finally:
        stop.set()
        _stop(servers)
        cleanup.remove_workdir(workdir)
    return results, kills, cut


def run_chaos(cfg: BenchConfig, out: Path, interval: float = 0.5, mode: str = "shared") -> dict:
    from transformers import AutoTokenizer

    workload = replace(cfg.workload, rates=tenant_rates(cfg.rates[0], cfg.workload.tenants))
    arrivals = schedule(workload, AutoTokenizer.from_pretrained(str(cfg.model), local_files_only=True))
    t0 = time.perf_counter()
    clean, _, _ = _run(cfg, mode, arrivals, None, cfg.workload.seed)
    faulty, kills, cut = _run(cfg, mode, arrivals, interval, cfg.workload.seed)
    clean_by = {(r.tenant, r.at): r for r in clean}
    mismatches = [r for r in faulty if r.ok and clean_by[(r.tenant, r.at)].ok
                  and r.token_ids != clean_by[(r.tenant, r.at)].token_ids]
    completed = sum(r.ok for r in faulty)
    report = {
        "machine": machine_info(), "model": str(cfg.model), "mode": mode, "kill_interval_s": interval,
        "experts_per_function": cfg.experts_per_function, "tenants": cfg.workload.tenants,
        "rate_per_tenant": cfg.rates[0], "compared_by": "token ids",
        "requests_sent": len(faulty), "completed": completed, "failed": len(faulty) - completed,
        "completed_percent": 100.0 * completed / max(1, len(faulty)), "instances_killed": kills,
        "calls_cut_by_kills": cut,
        "compared": sum(1 for r in faulty if r.ok and clean_by[(r.tenant, r.at)].ok),
        "mismatches": len(mismatches), "fault_free_failed": sum(not r.ok for r in clean),
        "errors": [r.error for r in faulty if not r.ok][:5], "wall_s": time.perf_counter() - t0,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(report, indent=2))
    return report
