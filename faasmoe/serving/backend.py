"""Where a request runs: one orchestrator for all tenants (shared) or one process per tenant (private).

Both modes share the one pool of expert functions on the server's platform. The HTTP
layer sees only this interface: `submit` a request whose `emit` receives its events,
`cancel` it, read queue depth and the platform's records.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable

from faasmoe.engines.base import BaseEngine
from faasmoe.metering.meter import Label
from faasmoe.models.control_plane import RoutingCounts
from faasmoe.platforms.base import Platform
from faasmoe.serving.config import ServerConfig
from faasmoe.serving.scheduler import Request, StepScheduler


class Backend(ABC):
    mode: str
    server_role: str = "server"  # what the server process itself is, for metering
    platform: Platform | None  # None: every expert is in the server's process (monolithic)
    tokenizer: object
    max_context: int

    @abstractmethod
    async def submit(self, req: Request) -> None:
        """Queue the request; ValueError (the model cannot serve it) or QueueFull (no room)."""

    @abstractmethod
    def cancel(self, req: Request) -> None:
        """The client went away: free the request's slot."""

    @abstractmethod
    def queue_depth(self) -> int: ...

    @abstractmethod
    def running(self) -> int: ...

    @abstractmethod
    def begin_shutdown(self) -> None:
        """Refuse new requests and end running ones now (they get a 'cancelled' end, not a cut connection)."""

    @abstractmethod
    def close(self) -> None:
        """Cancel what runs, stop every process and function instance this backend started."""

    def processes(self) -> dict[int, Label]:
        """Every process serving this backend, labelled by role and tenant (for metering)."""
        return {os.getpid(): Label(self.server_role), **(self.platform.processes() if self.platform else {})}

    def routing(self) -> RoutingCounts | None:
        """Routing pairs per [layer, expert] seen in this process, and prefetch's predictions (None where the
        control planes are elsewhere)."""
        return None


class SharedBackend(Backend):
    """One orchestrator for every tenant: cross-tenant continuous batching in this process.

    With `--mode monolithic` the same scheduler drives a full model with every expert resident in this
    process (`faasmoe.engines.monolithic`): the Baseline, behind the same API."""

    def __init__(self, config: ServerConfig, on_step: Callable[[int], None] | None = None):
        if config.mode == "monolithic":
            from faasmoe.engines.monolithic import MonolithicEngine

            self.mode, self.server_role = "monolithic", "baseline"
            factory: Callable[[], BaseEngine] = lambda: MonolithicEngine(
                config.model, dtype=config.dtype, threads=config.threads,
                paged=config.monolithic_weights == "mapped")
        else:
            from faasmoe.engines.distributed import Engine

            self.mode, self.server_role = "shared", "control-plane"
            factory = lambda: Engine(  # noqa: E731
                config.model, experts_per_function=config.experts_per_function, platform=config.platform,
                platform_config=config.scaling, platform_options=config.platform_options(),
                dtype=config.dtype, prewarm=config.prewarm, prefetch_layers=config.prefetch_layers,
                threads=config.threads)
        self.scheduler = StepScheduler(factory, config.max_batch, config.max_queue, on_step=on_step)
        self.engine = self.scheduler.start()
        self.platform = None if self.mode == "monolithic" else self.engine.platform
        self.tokenizer = self.engine.tokenizer
        self.max_context = self.engine.max_context

    async def submit(self, req: Request) -> None:
        self.scheduler.submit(req)

    def routing(self) -> RoutingCounts | None:
        return self.engine.control_plane.routing_counts()

    def cancel(self, req: Request) -> None:
        self.scheduler.cancel(req)

    def queue_depth(self) -> int:
        return self.scheduler.queue_depth()

    def running(self) -> int:
        return self.scheduler.running()

    def begin_shutdown(self) -> None:
        self.scheduler.stop()

    def close(self) -> None:
        self.scheduler.stop()  # and closes the engine, on its thread


def create_backend(config: ServerConfig, on_step: Callable[[int], None] | None = None) -> Backend:
    if config.mode == "private":
        from faasmoe.serving.private.backend import PrivateBackend

        return PrivateBackend(config)
    return SharedBackend(config, on_step)
