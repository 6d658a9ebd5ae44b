"""The same functions in host processes that are Ray actors: exact answers, scale to zero at both levels (a function
unloaded, then its host gone), cold starts again. (A cluster of several nodes: test_ray_cluster.py.)"""

from __future__ import annotations

import time

import pytest
import torch

import faasmoe
from faasmoe.platforms import PlatformConfig
from helpers import greedy_reference, wait_gone

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


def _events(platform) -> list:
    return [(e.kind, e.function, e.instance) for e in platform.log.recent if e.kind not in ("warm_hit", "cold_start")]


def test_exact_logits_and_tokens_on_ray(tiny, reference, ray_engine):
    logits = ray_engine.logits(PROMPT)
    with torch.no_grad():
        expected = reference(tiny)(torch.tensor([PROMPT])).logits[0]
    assert (logits - expected).abs().max().item() < 1e-4
    assert ray_engine.generate(PROMPT, max_tokens=8).token_ids == greedy_reference(reference(tiny), PROMPT, 8)


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
    wait_gone(pids, 30)  # the actors' processes are gone, not just forgotten
    before = len(platform.log.recent)
    ray_engine.generate("wake up", max_tokens=2)
    colds = [e for e in list(platform.log.recent)[before:] if e.kind == "cold_start"]
    # from zero again: a function's cold start is a load into a host, so many functions start in fewer hosts
    assert colds and len({e.instance for e in colds}) < len(colds)
    assert all(e.load_s is not None for e in colds)
