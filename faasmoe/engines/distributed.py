"""The distributed model as one object: control plane here, experts as functions on a platform.

    engine = faasmoe.load("models/tiny", experts_per_function=2)
    result = engine.generate("Hello", max_tokens=16)
    engine.close()

`step` advances any set of sequences by one token together; `generate` is a loop
of steps over one sequence, and the server's scheduler calls `step` with all of
its running requests.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from faasmoe.control.deployment import Deployment
from faasmoe.control.dispatch import ExpertDispatcher
from faasmoe.engines.base import DEFAULT_THREADS, BaseEngine, Generation
from faasmoe.platforms import PlatformConfig, create_platform
from faasmoe.platforms.base import Platform, totals


def control_plane_threads(platform: Platform) -> int:
    """The control plane's default torch threads: half of torch's default when its functions run on this
    machine's cores too, else torch's default.

    The control plane waits on its functions at every MoE layer, and its idle OpenMP threads spin (libgomp's
    default) on the cores those functions need: on 2 cores (quarter preset, k = 4), one thread instead of two
    made a single request's step 1.3x faster at 0.4x the control plane's CPU. OMP_WAIT_POLICY, which would
    stop the spinning, is read once when torch loads, and set for every process it slows the monolithic model.
    The lm_head, after the last layer's calls, takes every core (`Engine`)."""
    return max(1, DEFAULT_THREADS // 2) if platform.shares_host_cores() else DEFAULT_THREADS


class Engine(BaseEngine):
    """The distributed model: this process runs the control plane, a FaaS platform runs the experts.

    `platform` is a platform's name (created with `platform_config` and `platform_options`) or a platform
    object not yet started; the engine starts it and closes it."""

    def __init__(self, model: str | Path, *, experts_per_function: int = 1, platform: str | Platform = "local",
                 platform_config: PlatformConfig | None = None, dtype: str | None = None, prewarm: bool = False,
                 threads: int | None = None, platform_options: dict[str, Any] | None = None,
                 prefetch_layers: int = 0):
        t0 = time.perf_counter()
        self.platform = (platform if isinstance(platform, Platform)
                         else create_platform(platform, platform_config, **(platform_options or {})))
        try:
            own = threads or control_plane_threads(self.platform)
            super().__init__(model, dtype, own)
            self.deployment = Deployment.plan(self.checkpoint, experts_per_function, self.dtype)
            self.platform.start()
            self.deployment.deploy(self.platform)
            self.dispatcher = ExpertDispatcher(self.platform, self.checkpoint.digest, self.deployment.blocks,
                                               self.checkpoint.num_experts, self.dtype)
            control_plane = self.checkpoint.family.control_plane_class()
            # the lm_head comes after the last layer's calls, with the functions idle: it takes every core (on 2
            # cores, interleaved A/B on the quarter preset: a single request's step 9-15 % faster, k = 60 and 1)
            head = DEFAULT_THREADS if threads is None and own < DEFAULT_THREADS else None
            self.control_plane = control_plane(self.checkpoint, self.dtype, self.dispatcher,
                                               prefetch_layers=prefetch_layers, head_threads=head)
            if prewarm:
                self.prewarm()
        except BaseException:
            self.platform.close()
            raise
        self.load_s = time.perf_counter() - t0

    @property
    def experts_per_function(self) -> int:
        return self.deployment.experts_per_function

    @property
    def specs(self):
        return self.deployment.specs

    # -- lifecycle -----------------------------------------------------------------------------
    def close(self) -> None:
        self.platform.close()

    def prewarm(self) -> None:
        """Cold-start one instance of every function now, so the first request finds them warm."""
        self.deployment.prewarm(self.platform)

    def describe(self) -> dict[str, Any]:
        return {"experts_per_function": self.experts_per_function, "functions": len(self.deployment.specs),
                "platform": self.platform.name}

    def cold_starts(self) -> int:
        return self.platform.log.cold_starts + self.platform.log.prefetches

    def counters(self) -> dict[str, float]:
        """Cumulative invocation, cold start, warm hit, prefetch and dispatch counters of this engine."""
        t = totals(self.platform.log.stats)
        d = self.dispatcher.stats
        cp = self.control_plane
        return {"invocations": int(t.get("invocations", 0)), "cold_starts": int(t.get("cold_starts", 0)),
                "prefetches": int(t.get("prefetches", 0)),
                "warm_hits": int(t.get("warm_hits", 0)), "evictions": int(t.get("evictions", 0)),
                "budget_evictions": int(t.get("budget_evictions", 0)),
                "retries": int(t.get("retries", 0)), "crashes": int(t.get("crashes", 0)),
                "prefetch_predicted_pairs": int(cp.predicted.sum()), "prefetch_hit_pairs": int(cp.predicted_hits.sum()),
                "dispatches": d.dispatches, "dispatch_wait_s": d.wait_s, "tokens_sent": d.tokens_sent,
                "bytes_sent": d.bytes_sent, "bytes_received": d.bytes_received}


def load(model: str | Path, **options) -> Engine:
    """Open a checkpoint directory and deploy its experts as functions. Options: see `Engine`."""
    return Engine(model, **options)


__all__ = ["Engine", "Generation", "load"]
