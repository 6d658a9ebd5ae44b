"""bench-engine's cold start, with the function's weights in the page cache and evicted first (tiny checkpoint)."""

from __future__ import annotations

import shutil

from faasmoe.bench.engine import cold_start_cost
from faasmoe.control.deployment import Deployment
from faasmoe.models.checkpoint import Checkpoint


def test_cold_start_is_measured_with_a_warm_and_with_an_evicted_page_cache(tiny, tmp_path):
    private = shutil.copytree(tiny, tmp_path / "tiny")  # pages another test's process maps cannot be evicted
    spec, neighbour = Deployment.plan(Checkpoint(private), 2, "float32").specs[:2]
    c = cold_start_cost(spec, "local", reps=2, neighbour=neighbour)
    assert c["bytes"] == spec.nbytes
    for state in ("warm", "cold"):
        run = c[state]
        assert run["samples"] == 2 and run["cold_start_ms"] > 0 and run["read_ms"] > 0
        assert run["ratio"] == run["cold_start_ms"] / run["read_ms"]
        assert run["page_cache_as_intended"], run  # checked with mincore before every read and start
    assert c["warm"]["resident_before_min_bytes"] == c["warm"]["start_resident_before_min_bytes"] == spec.nbytes
    assert c["cold"]["resident_before_bytes"] == c["cold"]["start_resident_before_bytes"] == 0
    assert c["cold_start_ms"] == c["warm"]["cold_start_ms"] and c["read_ms"] == c["warm"]["read_ms"]
    h = c["on_running_host"]  # loaded into the host the neighbour kept running: one host throughout
    assert h["samples"] == 2 and h["same_host"] and h["load_in_instance_ms"] > 0 and h["warm_call_ms"] > 0
    assert h["cold_start_ms"] > h["load_in_instance_ms"]  # the caller's wait: the load and the round trip


def test_a_peer_is_measured_before_and_after_the_engines_and_ratios_use_the_mean(tiny, tmp_path, monkeypatch):
    """The machine's speed drifts within a run: a peer measured once would charge or credit the drift to faasmoe.
    Both measurements run with the same threads (the engines change the process's count in between)."""
    import torch

    from faasmoe.bench import engine

    figures = iter([10.0, 30.0])
    threads = []

    def peer(*args):
        threads.append(torch.get_num_threads())
        return {"ms_per_token": next(figures), "outtype": "bf16", "threads": torch.get_num_threads(), "depth": 3,
                "repeats": 1, "repack": True}

    monkeypatch.setattr(engine, "peer_decode", peer)
    monkeypatch.setattr(engine, "cold_start_cost", lambda *a, **kw: None)
    monkeypatch.setattr(engine, "_print_cold_start", lambda run: None)
    monkeypatch.setattr(engine, "set_title", lambda *a: None)  # this process's title is not the bench's
    monkeypatch.setattr(engine, "DEFAULT_THREADS", 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        report = engine.run_engine_bench(shutil.copytree(tiny, tmp_path / "tiny"), tokens=3, repeats=1, ks=[2],
                                         peers=["llama.cpp"])
    finally:
        torch.set_num_threads(before)
    assert threads == [2, 2]
    p = report["peers"]["llama.cpp"]
    assert (p["ms_per_token"], p["ms_per_token_last"], p["ms_per_token_mean"]) == (10.0, 30.0, 20.0)
    run = report["runs"]["local/k2"]
    assert run["vs_llama.cpp"] == run["faasmoe_ms_per_token"] / 20.0
    assert report["faasmoe_monolithic"]["vs_llama.cpp"] == report["faasmoe_monolithic"]["ms_per_token"] / 20.0
