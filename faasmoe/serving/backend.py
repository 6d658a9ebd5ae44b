"""Where a request runs: one orchestrator for all tenants (shared) or one process per tenant (private).

Both modes share the one pool of expert functions on the server's platform. The HTTP
layer sees only this interface: `submit` a request whose `emit` receives its events,
`cancel` it, read queue depth and the platform's records.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod

import torch
from transformers import AutoTokenizer

from faasmoe.engine import Engine
from faasmoe.metering.meter import Label
from faasmoe.platforms import create_platform
from faasmoe.platforms.base import Platform
from faasmoe.serving.config import ServerConfig
from faasmoe.serving.scheduler import QueueFull, Request, StepScheduler, build_engine

log = logging.getLogger("faasmoe.backend")


class Backend(ABC):
    mode: str
    server_role: str = "server"  # what the server process itself is, for metering
    platform: Platform
    tokenizer: object
    max_context: int
    vocab_size: int

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
        return {os.getpid(): Label(self.server_role), **self.platform.processes()}

    def routed(self) -> torch.Tensor | None:
        """Routing pairs per [layer, expert] seen in this process (None where the control planes are elsewhere)."""
        return None


class SharedBackend(Backend):
    """One orchestrator for every tenant: cross-tenant continuous batching in this process.

    With `--mode monolithic` the same scheduler drives a full model with every expert resident in this
    process (`faasmoe.monolithic`): the Baseline, behind the same API."""

    def __init__(self, config: ServerConfig, on_step=None):
        if config.mode == "monolithic":
            from faasmoe.monolithic import MonolithicEngine

            self.mode, self.server_role = "monolithic", "baseline"
            self.engine = build_engine(lambda: MonolithicEngine(config.model, dtype=config.dtype))
        else:
            self.mode, self.server_role = "shared", "control-plane"
            # Not for Ray: the Ray it starts dies with the thread that started it (its processes get the
            # parent-death signal of that thread), so a Ray control plane is built here and keeps two pools.
            build = build_engine if config.platform != "ray" else (lambda factory: factory())
            self.engine = build(lambda: Engine(
                config.model, experts_per_function=config.experts_per_function, platform=config.platform,
                platform_config=config.platform_config(), platform_options=config.platform_options(),
                dtype=config.dtype, prewarm=config.prewarm, prefetch_layers=config.prefetch_layers))
        self.platform = self.engine.platform
        self.tokenizer = self.engine.tokenizer
        self.max_context = self.engine.max_context
        self.vocab_size = self.engine.config.vocab_size
        self.scheduler = StepScheduler(self.engine, config.max_batch, config.max_queue, on_step=on_step)
        self.scheduler.start()

    async def submit(self, req: Request) -> None:
        self.scheduler.submit(req)

    def routed(self) -> torch.Tensor | None:
        return self.engine.model.routed.clone()

    def cancel(self, req: Request) -> None:
        self.scheduler.cancel(req)

    def queue_depth(self) -> int:
        return self.scheduler.queue_depth()

    def running(self) -> int:
        return self.scheduler.running()

    def begin_shutdown(self) -> None:
        self.scheduler.stop()

    def close(self) -> None:
        self.scheduler.stop()
        self.engine.close()


class PrivateBackend(Backend):
    """One orchestrator process per tenant, each with its own control plane, all calling this process's
    platform through the gateway. A dead orchestrator is restarted; its in-flight requests end in an error."""

    mode = "private"

    def __init__(self, config: ServerConfig):
        from faasmoe.checkpoint import Checkpoint
        from faasmoe.functions.packing import contiguous_blocks
        from faasmoe.functions.spec import function_specs
        from faasmoe.platforms.gateway import GatewayServer

        self.config = config
        ckpt = Checkpoint(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path), local_files_only=True)
        self.max_context = int(ckpt.config.max_position_embeddings)
        self.vocab_size = int(ckpt.config.vocab_size)
        dtype = config.dtype or ckpt.dtype
        self.platform = create_platform(config.platform, config.platform_config(), **config.platform_options())
        self.platform.start()
        self.specs = function_specs(ckpt, contiguous_blocks(ckpt.config.num_experts, config.experts_per_function), dtype)
        for spec in self.specs:
            self.platform.deploy(spec)
        self.platform.finish_deploy()
        self._dir = tempfile.mkdtemp(prefix="faasmoe-private-")
        os.mkdir(os.path.join(self._dir, "tenants"))
        self.gateway = GatewayServer(self.platform, os.path.join(self._dir, "gateway.sock"))
        self.gateway.start()
        self._procs: dict[str, subprocess.Popen] = {}
        self._in_flight: dict[str, int] = {t.name: 0 for t in config.tenants}
        self._writers: dict[str, asyncio.StreamWriter] = {}  # request id -> its connection, while it runs
        self._restarts: dict[str, int] = {t.name: 0 for t in config.tenants}
        self._closing = False
        for t in config.tenants:
            self._start(t.name)
        for t in config.tenants:
            self._wait_ready(t.name)
        if config.prewarm:
            from faasmoe.engine import prewarm_calls

            self.platform.invoke_many(prewarm_calls(self.specs))

    # -- orchestrator processes ----------------------------------------------------------------
    def _socket(self, tenant: str) -> str:
        return os.path.join(self._dir, "tenants", f"{tenant}.sock")  # apart from the gateway's, whatever the name

    def _start(self, tenant: str) -> None:
        c = self.config
        path = self._socket(tenant)
        if os.path.exists(path):
            os.unlink(path)
        args = [sys.executable, "-m", "faasmoe.serving.orchestrator", "--socket", path,
                "--gateway", self.gateway.path, "--model", str(c.model), "--tenant", tenant,
                "--experts-per-function", str(c.experts_per_function), "--max-batch", str(c.max_batch),
                "--max-queue", str(c.max_queue), "--prefetch-layers", str(c.prefetch_layers), "--platform-config", c.platform_config().model_dump_json()]
        if c.dtype:
            args += ["--dtype", c.dtype]
        self._procs[tenant] = subprocess.Popen(args, stdin=subprocess.DEVNULL)

    def _wait_ready(self, tenant: str, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        proc, path = self._procs[tenant], self._socket(tenant)
        while not os.path.exists(path):
            if proc.poll() is not None:
                raise RuntimeError(f"the orchestrator of tenant {tenant} exited with code {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the orchestrator of tenant {tenant} did not start in {timeout:g} s")
            time.sleep(0.05)

    async def _ensure_running(self, tenant: str) -> None:
        proc = self._procs[tenant]
        if proc.poll() is None or self._closing:
            return
        log.warning("orchestrator of tenant %s exited (code %s); restarting", tenant, proc.returncode)
        self._restarts[tenant] += 1
        self._start(tenant)
        await asyncio.to_thread(self._wait_ready, tenant)

    # -- requests ------------------------------------------------------------------------------
    async def submit(self, req: Request) -> None:
        if self._closing:
            raise QueueFull("the server is shutting down")
        await self._ensure_running(req.tenant)
        try:
            reader, writer = await asyncio.open_unix_connection(self._socket(req.tenant))
        except OSError as e:
            raise QueueFull(f"the orchestrator of tenant {req.tenant} is not reachable: {e}") from e
        msg = {"id": req.id, "tenant": req.tenant, "prompt_ids": req.prompt_ids,
               "params": {"max_tokens": req.params.max_tokens, "temperature": req.params.temperature,
                          "top_p": req.params.top_p, "seed": req.params.seed, "stop": list(req.params.stop),
                          "ignore_eos": req.params.ignore_eos}}
        writer.write((json.dumps(msg) + "\n").encode())
        await writer.drain()
        first = await reader.readline()
        answer = json.loads(first) if first else {"type": "rejected", "status": 503,
                                                   "message": "the orchestrator closed the connection"}
        if answer["type"] == "rejected":
            writer.close()
            if answer["status"] == 400:
                raise ValueError(answer["message"])
            raise QueueFull(answer["message"])
        self._writers[req.id] = writer
        self._in_flight[req.tenant] += 1
        asyncio.get_running_loop().create_task(self._pump(req, reader, writer))

    async def _pump(self, req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward the orchestrator's events to the request until its final one; if the orchestrator dies
        first, end the request with an error (its tokens so far were counted as they came)."""
        done = False
        try:
            while line := await reader.readline():
                event = json.loads(line)
                req.emit(event)
                if event["type"] == "done":
                    done = True
                    break
        except (OSError, ValueError) as e:
            log.warning("request %s: lost its orchestrator: %s", req.id, e)
        finally:
            self._in_flight[req.tenant] -= 1
            self._writers.pop(req.id, None)
            writer.close()
            if not done:
                req.emit({"type": "done", "finish_reason": "cancelled" if req.cancelled else "error",
                          "usage": {"prompt_tokens": len(req.prompt_ids), "completion_tokens": 0},
                          "error": f"the orchestrator of tenant {req.tenant} failed"})

    def cancel(self, req: Request) -> None:
        """Ask the orchestrator to cancel; its final event (with the tokens it made) still comes back."""
        req.cancelled = True
        writer = self._writers.get(req.id)
        if writer is not None and not writer.is_closing():
            writer.write(b'{"type": "cancel"}\n')

    def queue_depth(self) -> int:
        return 0  # each orchestrator queues its own; in-flight counts are in `running`

    def running(self) -> int:
        return sum(self._in_flight.values())

    def processes(self) -> dict[int, Label]:
        out = super().processes()
        out.update({p.pid: Label("orchestrator", t) for t, p in self._procs.items() if p.poll() is None})
        return out

    def begin_shutdown(self) -> None:
        self._closing = True
        for proc in self._procs.values():  # each orchestrator cancels its requests and exits
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def close(self) -> None:
        self.begin_shutdown()
        for proc in self._procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.gateway.close()
        self.platform.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def create_backend(config: ServerConfig, on_step=None) -> Backend:
    return PrivateBackend(config) if config.mode == "private" else SharedBackend(config, on_step)
