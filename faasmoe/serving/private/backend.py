"""The server's side of private mode: it starts one orchestrator process per tenant and relays its requests.

Each orchestrator (serving/private/orchestrator.py) runs its tenant's own control plane; their expert
calls come back through the gateway (serving/private/gateway.py) to this process's one platform, so
every tenant shares the same pool of functions. Messages on the way are `serving.messages` types.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from transformers import AutoTokenizer

from faasmoe.control.deployment import Deployment
from faasmoe.engines.base import InvalidRequest
from faasmoe.metering.meter import Label
from faasmoe.models.checkpoint import Checkpoint
from faasmoe.platforms import create_platform
from faasmoe.serving.backend import Backend
from faasmoe.serving.config import ServerConfig
from faasmoe.serving.messages import Cancel, DoneEvent, FromOrchestrator, Rejected, Submit, TextEvent, Usage
from faasmoe.serving.private.gateway import GatewayServer
from faasmoe.serving.scheduler import QueueFull, Request

log = logging.getLogger("faasmoe.private")

READY_TIMEOUT_S = 300.0  # an orchestrator loads its control plane before its socket appears
READY_POLL_S = 0.05


class PrivateBackend(Backend):
    """One orchestrator process per tenant, each with its own control plane, all calling this process's
    platform through the gateway. A dead orchestrator is restarted; its in-flight requests end in an error."""

    mode = "private"

    def __init__(self, config: ServerConfig):
        self.config = config
        ckpt = Checkpoint(config.model)
        self.tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path), local_files_only=True)
        self.max_context = int(ckpt.config.max_position_embeddings)
        self.platform = create_platform(config.platform, config.scaling, **config.platform_options())
        self.platform.start()
        self.deployment = Deployment.plan(ckpt, config.experts_per_function, config.dtype)
        self.deployment.deploy(self.platform)
        self._dir = tempfile.mkdtemp(prefix="faasmoe-private-")
        os.mkdir(os.path.join(self._dir, "tenants"))
        self.gateway = GatewayServer(self.platform, os.path.join(self._dir, "gateway.sock"))
        self.gateway.start()
        self._procs: dict[str, subprocess.Popen] = {}
        self._in_flight: dict[str, int] = {t.name: 0 for t in config.tenants}
        self._writers: dict[str, asyncio.StreamWriter] = {}  # request id -> its connection, while it runs
        self._closing = False
        for t in config.tenants:
            self._start(t.name)
        for t in config.tenants:
            self._wait_ready(t.name)
        if config.prewarm:
            self.deployment.prewarm(self.platform)

    # -- orchestrator processes ----------------------------------------------------------------
    def _socket(self, tenant: str) -> str:
        return os.path.join(self._dir, "tenants", f"{tenant}.sock")  # apart from the gateway's, whatever the name

    def _start(self, tenant: str) -> None:
        c = self.config
        path = self._socket(tenant)
        if os.path.exists(path):
            os.unlink(path)
        args = [sys.executable, "-m", "faasmoe.serving.private.orchestrator", "--socket", path,
                "--gateway", self.gateway.path, "--model", str(c.model), "--tenant", tenant,
                "--experts-per-function", str(c.experts_per_function), "--max-batch", str(c.max_batch),
                "--max-queue", str(c.max_queue), "--prefetch-layers", str(c.prefetch_layers), "--platform-config", c.scaling.model_dump_json()]
        if c.dtype:
            args += ["--dtype", c.dtype]
        if c.threads:
            args += ["--threads", str(c.threads)]
        self._procs[tenant] = subprocess.Popen(args, stdin=subprocess.DEVNULL)

    def _wait_ready(self, tenant: str, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        proc, path = self._procs[tenant], self._socket(tenant)
        while not os.path.exists(path):
            if proc.poll() is not None:
                raise RuntimeError(f"the orchestrator of tenant {tenant} exited with code {proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the orchestrator of tenant {tenant} did not start in {timeout:g} s")
            time.sleep(READY_POLL_S)

    async def _ensure_running(self, tenant: str) -> None:
        proc = self._procs[tenant]
        if proc.poll() is None or self._closing:
            return
        log.warning("orchestrator of tenant %s exited (code %s); restarting", tenant, proc.returncode)
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
        writer.write(Submit(id=req.id, tenant=req.tenant, prompt_ids=req.prompt_ids, params=req.params).line())
        await writer.drain()
        first = await reader.readline()
        answer = (FromOrchestrator.validate_json(first) if first
                  else Rejected(status=503, message="the orchestrator closed the connection"))
        if isinstance(answer, Rejected):
            writer.close()
            if answer.status == 400:
                raise InvalidRequest(answer.message, answer.code, answer.param)
            raise QueueFull(answer.message)
        self._writers[req.id] = writer
        self._in_flight[req.tenant] += 1
        asyncio.get_running_loop().create_task(self._pump(req, reader, writer))

    async def _pump(self, req: Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward the orchestrator's events to the request until its final one; if the orchestrator dies
        first, end the request with an error (its tokens so far were counted as they came)."""
        done = False
        try:
            while line := await reader.readline():
                event = FromOrchestrator.validate_json(line)
                if not isinstance(event, (TextEvent, DoneEvent)):
                    raise ValueError(f"unexpected {event.type} message mid-request")
                req.emit(event)
                if isinstance(event, DoneEvent):
                    done = True
                    break
        except (OSError, ValueError) as e:
            log.warning("request %s: lost its orchestrator: %s", req.id, e)
        finally:
            self._in_flight[req.tenant] -= 1
            self._writers.pop(req.id, None)
            writer.close()
            if not done:
                req.emit(DoneEvent(finish_reason="cancelled" if req.cancelled else "error",
                                   usage=Usage(prompt_tokens=len(req.prompt_ids), completion_tokens=0),
                                   error=f"the orchestrator of tenant {req.tenant} failed"))

    def cancel(self, req: Request) -> None:
        """Ask the orchestrator to cancel; its final event (with the tokens it made) still comes back."""
        req.cancelled = True
        writer = self._writers.get(req.id)
        if writer is not None and not writer.is_closing():
            writer.write(Cancel().line())

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
