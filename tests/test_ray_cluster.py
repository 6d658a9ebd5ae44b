"""The ray platform on a simulated cluster of three Ray nodes on this machine: hosts are placed on different
nodes, and a node's death costs no request. (Its own module: the local Ray of test_ray_platform.py's module
fixture must be shut down first, or the platform would find Ray initialised and use that one.)"""

from __future__ import annotations

import pytest

import faasmoe
from faasmoe.platforms import PlatformConfig
from helpers import greedy_reference, wait_gone

pytest.importorskip("ray")

PROMPT = [785, 6722, 315, 9625, 374, 12095, 13]


def _events(platform) -> list:
    return [(e.kind, e.function, e.instance) for e in platform.log.recent if e.kind not in ("warm_hit", "cold_start")]


def test_a_cluster_spreads_hosts_over_nodes_and_survives_a_node_death(tiny, reference):
    """Three Ray nodes on this machine (ray.cluster_utils); a prefill's calls are split over several hosts, which
    the platform places on different nodes. Then every node but the head dies: its hosts' calls are retried on
    hosts started on the head."""
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "a Ray of another test is still up: the platform would use it"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    long_prompt = PROMPT * 4  # 28 rows: split over the cluster's 3 cores (hosts)
    try:
        config = PlatformConfig(keep_alive_s=60.0, invoke_timeout_s=60, max_instances=3, max_retries=3)
        with faasmoe.load(tiny, experts_per_function=2, platform="ray", platform_config=config,
                          platform_options={"address": cluster.address}) as engine:
            platform = engine.platform
            want = greedy_reference(reference(tiny), long_prompt, 4)
            assert engine.generate(long_prompt, max_tokens=4).token_ids == want
            placed = platform.placement()
            assert len(placed) >= 2 and len({node for _, node in placed.values()}) >= 2, (placed, _events(platform))
            head = cluster.head_node.node_id
            doomed = [pid for pid, node in placed.values() if node != head]
            assert doomed
            for node in workers:
                cluster.remove_node(node)
            wait_gone(doomed, 60)
            assert engine.generate(long_prompt, max_tokens=4).token_ids == want
            stats = platform.log.stats.values()
            assert sum(s.crashes for s in stats) > 0 and sum(s.retries for s in stats) > 0
            assert {node for _, node in platform.placement().values()} == {head}
    finally:
        ray.shutdown()
        cluster.shutdown()
