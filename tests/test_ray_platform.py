"""The same functions as Ray Serve deployments: exact answers, and scale to zero then a cold start."""

from __future__ import annotations

import time

import pytest
import torch

import faasmoe
from faasmoe.platforms import PlatformConfig

pytest.importorskip("ray.serve")


@pytest.fixture(scope="module")
def ray_engine(tiny):
    """One local Ray (127.0.0.1, no dashboard) for the module; shut down after."""
    with faasmoe.load(tiny, experts_per_function=4, platform="ray",
                      platform_config=PlatformConfig(keep_alive_s=2.0, invoke_timeout_s=120)) as engine:
        yield engine
    import ray

    assert not ray.is_initialized()


def test_exact_logits_and_tokens_on_ray(tiny, reference, ray_engine):
    ids = [785, 6722, 315, 9625, 374, 12095, 13]
    logits = ray_engine.logits(ids)
    with torch.no_grad():
        expected = reference(tiny)(torch.tensor([ids])).logits[0]
    assert (logits - expected).abs().max().item() < 1e-4
    result = ray_engine.generate(ids, max_tokens=8)
    with torch.no_grad():
        out = reference(tiny).generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert result.token_ids == out[0, len(ids):].tolist()


def test_ray_deployment_scales_to_zero_and_cold_starts_again(ray_engine):
    platform = ray_engine.platform
    ray_engine.generate("wake up", max_tokens=2)
    assert sum(platform.running_replicas().values()) > 0
    deadline = time.time() + 120  # Serve applied scale-to-zero ~30 s after the last call here
    while sum(platform.running_replicas().values()) > 0 and time.time() < deadline:
        time.sleep(0.5)
    assert sum(platform.running_replicas().values()) == 0  # min_replicas 0: every replica went away
    assert sum(s.evictions for s in platform.log.stats.values()) > 0
    cold = sum(s.cold_starts for s in platform.log.stats.values())
    ray_engine.generate("wake up", max_tokens=2)
    assert sum(s.cold_starts for s in platform.log.stats.values()) > cold
    events = [e for e in platform.log.recent if e.kind == "cold_start"]
    assert events and all(e.load_s is not None for e in events)
