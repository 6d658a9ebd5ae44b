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
                      platform_config=PlatformConfig(keep_alive_s=10.0, invoke_timeout_s=120)) as engine:
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
    # keep-alive 10 s (shorter makes a layer's functions go to zero while the next layer's start).
    # Before the policy got its keep-alive (Serve passes policy_kwargs only to a class) it used its
    # 30 s default; 25 s after the last call tells the two apart.
    deadline = time.time() + 25
    while sum(platform.running_replicas().values()) > 0 and time.time() < deadline:
        time.sleep(0.5)
    assert sum(platform.running_replicas().values()) == 0  # min_replicas 0: every replica went away
    assert sum(s.evictions for s in platform.log.stats.values()) > 0
    cold = sum(s.cold_starts for s in platform.log.stats.values())
    ray_engine.generate("wake up", max_tokens=2)
    assert sum(s.cold_starts for s in platform.log.stats.values()) > cold
    events = [e for e in platform.log.recent if e.kind == "cold_start"]
    assert events and all(e.load_s is not None for e in events)


class _Ctx:
    """The fields of Serve's AutoscalingContext that keep_alive_policy reads."""

    def __init__(self, now, state=None, calls=0.0, requests=0.0, current=0, target=0, scaled_up_at=None):
        self.current_time, self.policy_state = now, state or {}
        self.aggregated_metrics = {"calls": {"r1": calls}} if calls else {}
        self.total_num_requests, self.last_scale_up_time = requests, scaled_up_at
        self.current_num_replicas, self.target_num_replicas, self.config = current, target, None


def test_keep_alive_policy_holds_a_starting_replica_and_scales_to_zero_only_when_idle():
    from faasmoe.platforms.ray import keep_alive_policy

    n, s = keep_alive_policy(_Ctx(100.0), keep_alive_s=10)
    assert n == 0  # never used: stays at zero
    # Serve's cold-start fast path scaled up at t=100 without asking the policy; the replica is
    # starting and the handles' request count reads 0: it must not go back to zero.
    n, s = keep_alive_policy(_Ctx(101.0, s, current=0, target=1, scaled_up_at=100.0), keep_alive_s=10)
    assert n == 1
    n, s = keep_alive_policy(_Ctx(108.0, s, calls=5, current=1, target=1, scaled_up_at=100.0), keep_alive_s=10)
    assert n == 1
    n, s = keep_alive_policy(_Ctx(117.0, s, calls=5, current=1, target=1, scaled_up_at=100.0), keep_alive_s=10)
    assert n == 1  # 9 s since the last call
    n, s = keep_alive_policy(_Ctx(119.0, s, calls=5, current=1, target=1, scaled_up_at=100.0), keep_alive_s=10)
    assert n == 0  # 11 s idle
    n, s = keep_alive_policy(_Ctx(120.0, s, requests=3, current=1, target=1, scaled_up_at=100.0), keep_alive_s=10)
    assert n == 3  # traffic again: one replica per ongoing request
