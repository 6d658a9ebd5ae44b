"""The same functions in host processes that are Ray actors: exact answers, scale to zero at both levels (a function
unloaded, then its host gone), cold starts again, and on a simulated cluster of several nodes: hosts placed on
different nodes, and a node's death costs no request."""

from __future__ import annotations

import time

import psutil
import pytest
import torch

import faasmoe
from faasmoe.platforms import PlatformConfig

pytest.importorskip("ray")

PROMPT = [785, 6722, 315, 9625, 374, 12095, 13]


@pytest.fixture(scope="module")
def ray_engine(tiny):
    """One local Ray (127.0.0.1, no dashboard) for the module; shut down after."""
    with faasmoe.load(tiny, experts_per_function=4, platform="ray",
                      platform_config=PlatformConfig(keep_alive_s=3.0, invoke_timeout_s=120)) as engine:
        yield engine
    import ray

    assert not ray.is_initialized()


def expected_tokens(reference, tiny, ids, n):
    with torch.no_grad():
        out = reference(tiny).generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_exact_logits_and_tokens_on_ray(tiny, reference, ray_engine):
    logits = ray_engine.logits(PROMPT)
    with torch.no_grad():
        expected = reference(tiny)(torch.tensor([PROMPT])).logits[0]
    assert (logits - expected).abs().max().item() < 1e-4
    assert ray_engine.generate(PROMPT, max_tokens=8).token_ids == expected_tokens(reference, tiny, PROMPT, 8)


def test_both_levels_scale_to_zero_and_functions_cold_start_into_running_hosts(ray_engine):
    platform = ray_engine.platform
    ray_engine.generate("wake up", max_tokens=2)
    pids = platform.hosts()
    assert pids and platform.instances()
    deadline = time.time() + 30  # keep-alive 3 s: functions unloaded, then their emptied hosts killed
    while (platform.instances() or platform.hosts()) and time.time() < deadline:
        time.sleep(0.2)
    assert not platform.instances() and not platform.hosts()
    assert sum(s.evictions for s in platform.log.stats.values()) > 0
    _, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=30)
    assert not alive  # the actors' processes are gone, not just forgotten
    before = len(platform.log.recent)
    ray_engine.generate("wake up", max_tokens=2)
    colds = [e for e in list(platform.log.recent)[before:] if e.kind == "cold_start"]
    # from zero again: a function's cold start is a load into a host, so many functions start in fewer hosts
    assert colds and len({e.instance for e in colds}) < len(colds)
    assert all(e.load_s is not None for e in colds)


def test_a_cluster_spreads_hosts_over_nodes_and_survives_a_node_death(tiny, reference):
    """Three Ray nodes on this machine (ray.cluster_utils); a prefill's calls are split over three hosts, which
    Ray spreads over the nodes. Then every node but the head dies: its hosts' calls are retried elsewhere."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    long_prompt = PROMPT * 4  # 28 rows: split over the cluster's 3 cores (hosts)
    try:
        config = PlatformConfig(keep_alive_s=60.0, invoke_timeout_s=60, max_instances=3, max_retries=3)
        with faasmoe.load(tiny, experts_per_function=2, platform="ray", platform_config=config,
                          platform_options={"address": cluster.address}) as engine:
            platform = engine.platform
            want = expected_tokens(reference, tiny, long_prompt, 4)
            assert engine.generate(long_prompt, max_tokens=4).token_ids == want
            assert len(platform.hosts()) >= 2 and len(set(platform.nodes.values())) >= 2
            head = cluster.head_node.node_id
            doomed = [pid for pid, node in platform.nodes.items() if node != head]
            assert doomed
            for node in workers:
                cluster.remove_node(node)
            _, alive = psutil.wait_procs([psutil.Process(p) for p in doomed if psutil.pid_exists(p)], timeout=60)
            assert not alive
            assert engine.generate(long_prompt, max_tokens=4).token_ids == want
            stats = platform.log.stats.values()
            assert sum(s.crashes for s in stats) > 0 and sum(s.retries for s in stats) > 0
            assert set(platform.nodes.values()) == {head}
    finally:
        ray.shutdown()
        cluster.shutdown()
