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
