"""The local platform's expert memory budget: never passed by more than one function, exact outputs, pages dropped."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch
from helpers import in_threads, metric_sum, running_server

import faasmoe
from faasmoe.control.deployment import Deployment, prewarm_calls
from faasmoe.metering.pagecache import resident_range
from faasmoe.models.checkpoint import Checkpoint
from faasmoe.models.presets import init_model
from faasmoe.platforms import PlatformConfig

# Functions of 1.5 MiB at k = 1 (fp32, 512 x 256 experts), many pages each: 24 functions, 36 MiB in all.
WIDE = {"hidden_size": 256, "moe_intermediate_size": 512, "intermediate_size": 256,
        "shared_expert_intermediate_size": 256}
KEY = "sk-budget-test-0001"
PAGE = 4096


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> str:
    return str(init_model("tiny", tmp_path_factory.mktemp("wide") / "m", seed=2, overrides=WIDE, progress=False))


def _expert_ranges(path: str) -> list[tuple[str, int, int]]:
    """Every function's bytes, adjacent ranges merged (a page shared by two tensors counts once)."""
    ranges = sorted((t.file, t.offset, t.nbytes) for s in Deployment.plan(Checkpoint(path), 1).specs
                    for t in s.tensors)
    merged: list[list] = []
    for f, off, n in ranges:
        if merged and merged[-1][0] == f and merged[-1][1] + merged[-1][2] >= off:
            merged[-1][2] = max(merged[-1][2], off + n - merged[-1][1])
        else:
            merged.append([f, off, n])
    return [tuple(r) for r in merged]


def _resident(ranges) -> int:
    return sum(resident_range(f, off, n) for f, off, n in ranges)


def _reference(path: str, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """transformers' greedy continuations, computed before the budgeted run (and freed: it maps the checkpoint)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = [model.generate(torch.tensor([p]), max_new_tokens=tokens, do_sample=False)[0, len(p):].tolist()
               for p in prompts]
    del model
    gc.collect()
    return out


def test_exact_with_a_budget_for_a_quarter_of_the_experts(wide):
    function = Checkpoint(wide).expert_tensors(0, [0])
    size = sum(t.nbytes for t in function)
    budget = 6 * size  # 6 of the 24 functions
    ids = [785, 6722, 315, 9625, 374, 12095, 13]
    expected = _reference(wide, [ids], 10)[0]
    with faasmoe.load(wide, experts_per_function=1, platform_config=PlatformConfig(memory_budget=budget)) as engine:
        assert engine.generate(ids, max_tokens=10).token_ids == expected
        with faasmoe.load(wide, experts_per_function=1, prefetch_layers=1,  # prefetch never changes outputs
                          platform_config=PlatformConfig(memory_budget=budget)) as prefetching:
            assert prefetching.generate(ids, max_tokens=10).token_ids == expected
        counters = engine.counters()
        assert counters["budget_evictions"] > 0 and counters["evictions"] == 0
        memory = engine.platform.memory()
        assert memory["budget_bytes"] == budget and memory["resident_bytes"] <= budget + size


def test_the_budget_holds_under_concurrent_tenants_and_outputs_stay_exact(wide):
    """Sampled page cache residency of every expert byte range never passes the budget by more than one
    function (plus a few boundary pages), while three tenants generate at once."""
    size = sum(t.nbytes for t in Checkpoint(wide).expert_tensors(0, [0]))
    budget = 5 * size
    prompts = [[785, 6722, 315, 9625], [40, 1079, 264, 1803, 315], [9707, 1052, 0]]
    expected = _reference(wide, prompts, 12)
    ranges = _expert_ranges(wide)
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _resident(ranges))
            time.sleep(0.002)

    tenants = [{"name": f"t{i}", "key": f"{KEY}{i}"} for i in range(3)]
    with running_server(model=wide, tenants=tenants, experts_per_function=1, keep_alive_s=30,
                        memory_budget=budget) as base:
        import httpx

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        def ask(i: int) -> list[int]:
            r = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {KEY}{i}"}, timeout=120,
                           json={"model": "m", "prompt": prompts[i], "max_tokens": 12, "temperature": 0,
                                 "ignore_eos": True, "return_token_ids": True})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]

        try:
            got = in_threads(ask, [(i,) for i in range(3)])
        finally:
            stop.set()
            sampler.join()
        assert metric_sum(base, "faasmoe_expert_memory_budget_bytes") == budget
        assert metric_sum(base, "faasmoe_function_budget_evictions_total") > 0
        assert metric_sum(base, "faasmoe_expert_resident_bytes") <= budget + size
    assert got == expected
    slack = 8 * 2 * PAGE  # the edge pages of the (at most 7) functions in memory, shared with their neighbours
    assert 0 < peak[0] <= budget + size + slack, (peak[0], budget)


def test_an_evicted_function_leaves_the_page_cache(wide):
    ckpt = Checkpoint(wide)
    deployment = Deployment.plan(ckpt, 1)
    first = deployment.specs[0]
    ranges = [(t.file, t.offset, t.nbytes) for t in first.tensors]
    with faasmoe.load(wide, experts_per_function=1,
                      platform_config=PlatformConfig(memory_budget=10 * first.nbytes)) as engine:
        # deploying with a budget starts from a page cache without the functions' bytes (but the pages they share
        # with the control plane's tensors at their edges)
        assert _resident(ranges) <= 2 * PAGE
        engine.platform.invoke_many(prewarm_calls([first]))  # one cold start of the first function
        assert _resident(ranges) >= first.nbytes - 2 * PAGE
        assert engine.platform.memory()["resident_bytes"] == first.nbytes
        assert engine.platform.scale_to_zero() == 1
        deadline = time.monotonic() + 10
        while engine.platform.memory()["resident_bytes"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.platform.memory()["resident_bytes"] == 0
        assert _resident(ranges) <= 2 * PAGE


def test_a_budget_is_refused_off_the_local_platform():
    from faasmoe.platforms import create_platform
    from faasmoe.serving.config import ServerConfig

    with pytest.raises(ValueError, match="local platform only"):
        create_platform("ray", PlatformConfig(memory_budget="1GiB"))
    with pytest.raises(ValueError, match="local platform only"):
        ServerConfig(model="m", platform="ray", memory_budget="1GiB")
    assert PlatformConfig(memory_budget="14GiB").memory_budget == 14 * 2**30


def test_a_cold_start_reads_its_own_bytes_and_no_more(wide):
    """Mapping a function from an evicted cache reads its byte ranges (announced with WILLNEED), not its
    neighbours' (page faults read around themselves), and a lazily mapped embedding row reads no further."""
    from faasmoe.metering.pagecache import evict_ranges
    from faasmoe.models.weights import map_tensors

    ckpt = Checkpoint(wide)
    spec = Deployment.plan(ckpt, 1).specs[9]
    ranges = _expert_ranges(wide)
    embed = ckpt.tensors["model.embed_tokens.weight"]
    evict_ranges([*ranges, (embed.file, embed.offset, embed.nbytes)])
    evicted = _resident(ranges)  # at most the pages at the layers' edges, which live mappings may share
    assert evicted <= 8 * PAGE
    weights = map_tensors(spec.tensors, torch.float32)
    assert spec.nbytes - 2 * PAGE <= _resident(ranges) - evicted <= spec.nbytes + 4 * PAGE
    del weights
    before = _resident(ranges)
    table = map_tensors([embed], torch.float32, lazy=frozenset({embed.name}))[embed.name]
    float(table[-1].sum())  # the last row: the bytes after it are the first layer's tensors
    assert _resident(ranges) <= before + 2 * PAGE


def test_the_paged_monolithic_model_maps_its_experts_and_answers_the_same(wide):
    """`--monolithic-weights mapped`: experts mapped, not read at load (the kernel pages them), same logits."""
    from faasmoe.engines.monolithic import MonolithicEngine
    from faasmoe.metering.pagecache import evict_ranges

    ids = [785, 6722, 315, 9625, 374]
    with MonolithicEngine(wide) as copied:
        expected = copied.logits(ids)
    ranges = _expert_ranges(wide)
    evict_ranges(ranges)
    with MonolithicEngine(wide, paged=True) as paged:
        assert _resident(ranges) <= 8 * PAGE  # nothing read at load
        assert torch.equal(paged.logits(ids), expected)
        assert _resident(ranges) > 0  # read on use


def test_a_memory_cgroup_limits_what_its_processes_hold():
    import subprocess
    import sys

    from faasmoe.bench.cgroup import MemoryCgroup

    try:
        group = MemoryCgroup(128 * 2**20)
    except OSError as e:
        pytest.skip(f"no writable memory cgroup here: {e}")
    try:
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5); x = bytearray(400 * 2**20)"])
        group.add(proc.pid)
        assert proc.wait(timeout=60) == -9  # killed at the limit
        assert group.oom_kills() == 1 and group.peak_bytes() <= 128 * 2**20
    finally:
        group.remove()


@pytest.mark.parametrize("policy", ["next-use", "lru"])
def test_eviction_order_follows_the_policy(wide, policy):
    """One function of each layer resident, called in layer order, and room needed for another function of
    layer 1: next-use stops layer 1's idle one (a decode step needs it again only a whole layer cycle later),
    lru the least recently used one (layer 0's, which the very next step needs first)."""
    specs = Deployment.plan(Checkpoint(wide), 1).specs  # layer-major: L0 B0..B7, L1 B0..B7, L2 B0..B7
    first = [specs[0], specs[8], specs[16]]  # one function of each layer, called in layer order
    budget = 3 * specs[0].nbytes
    with faasmoe.load(wide, experts_per_function=1,
                      platform_config=PlatformConfig(memory_budget=budget, eviction=policy)) as engine:
        platform = engine.platform
        for spec in first:
            platform.invoke_many(prewarm_calls([spec]))
        platform.invoke_many(prewarm_calls([specs[9]]))  # room for a layer-1 function
        resident = {i.function for i in platform.instances()}
        stopped = {s.id for s in first} - resident
        assert stopped == ({specs[8].id} if policy == "next-use" else {specs[0].id})


def test_making_room_never_stops_a_warm_function_the_same_batch_calls(wide):
    """A layer's batch with a warm function and a cold one, the budget full: the warm one is leased first, so
    making room for the cold one stops another layer's function, not it."""
    specs = Deployment.plan(Checkpoint(wide), 1).specs
    with faasmoe.load(wide, experts_per_function=1,
                      platform_config=PlatformConfig(memory_budget=3 * specs[0].nbytes)) as engine:
        platform = engine.platform
        for spec in (specs[0], specs[8], specs[16]):  # one function of each layer
            platform.invoke_many(prewarm_calls([spec]))
        platform.invoke_many(prewarm_calls([specs[9], specs[8]]))  # layer 1: B1 cold (asked first), B0 warm
        stats = platform.log.stats
        assert stats[specs[8].id].cold_starts == 1 and stats[specs[8].id].warm_hits == 1
        assert specs[8].id in {i.function for i in platform.instances()}
