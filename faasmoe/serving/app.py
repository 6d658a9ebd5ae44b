"""The OpenAI-compatible HTTP server: the app's assembly, its lifespan, and running it under uvicorn.

The pieces: `gate` (what is checked before a body is read), `routes` (the endpoints),
`lifecycle` (admission, accounting, settlement), `responses` (relaying events), `errors`
(OpenAI-style error bodies), `state` (what the routes share).
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from faasmoe.metering.meter import Meter
from faasmoe.serving.backend import Backend, create_backend
from faasmoe.serving.config import ServerConfig
from faasmoe.serving.errors import install_error_handlers
from faasmoe.serving.gate import Gate, uvicorn_options
from faasmoe.serving.metrics import Metrics
from faasmoe.serving.routes import router
from faasmoe.serving.state import ServerState
from faasmoe.serving.tenants import Tenants


def create_app(config: ServerConfig, backend: Backend | None = None) -> FastAPI:
    """The app; its lifespan loads the model (or takes `backend`), starts metering and billing, and at the end
    stops every process the backend started."""
    server = ServerState(config, Tenants(config.tenants))

    async def bill_shared_costs() -> None:
        """Close a billing interval at every metering interval (and when a tenant reads its bill)."""
        while True:
            server.close_billing_interval()
            await asyncio.sleep(config.meter_interval_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        b = backend or await asyncio.to_thread(create_backend, config, lambda n: server.metrics.on_step(n))
        server.backend = b
        server.meter = meter = Meter(b.processes, interval=config.meter_interval_s).start()
        server.metrics = Metrics(b.platform, b.queue_depth, b.running, meter, b.routing)
        billing = asyncio.create_task(bill_shared_costs())
        try:
            yield
        finally:
            billing.cancel()
            meter.stop()
            await asyncio.to_thread(b.close)

    app = FastAPI(title="faasmoe", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible MoE serving with experts as scale-to-zero functions.")
    app.add_middleware(Gate, tenants=server.tenants, limit=config.max_body_bytes, timeout=config.body_timeout_s,
                       on_refused=server.refused)
    app.state.server = server
    install_error_handlers(app)
    app.include_router(router)
    return app


class Server(uvicorn.Server):
    """uvicorn, but Ctrl-C / SIGTERM first ends running requests cleanly (an error event and [DONE] for a
    stream, 503 otherwise), then shuts down: no client is left hanging on a cut connection."""

    on_ready: Callable[[int], None] | None = None  # called with the bound port once the server listens

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_ready is not None:
            self.on_ready(self.servers[0].sockets[0].getsockname()[1])

    def handle_exit(self, sig, frame) -> None:
        state = getattr(self.config.app, "state", None)
        backend = state.server.backend if state is not None else None
        if backend is not None and not self.should_exit:
            backend.begin_shutdown()
        super().handle_exit(sig, frame)


class ListenError(OSError):
    """The server cannot listen where asked (port taken, no permission, unknown host): one line, no traceback."""


def check_listen(host: str, port: int) -> None:
    """Fail before loading the model (which can take minutes) if the port cannot be bound."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ListenError(f"cannot listen on {host}: {e.strerror}") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ListenError(f"port {port} on {host} is already in use; pick another with --port") from None
            raise ListenError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def serve(config: ServerConfig, log_level: str = "info", on_ready: Callable[[int], None] | None = None) -> None:
    """Run the server until Ctrl-C or SIGTERM; `on_ready(port)` runs once it listens (so what it prints comes
    after uvicorn's start-up lines). Raises ListenError, before loading anything, if it cannot listen."""
    check_listen(config.host, config.port)
    server = Server(uvicorn.Config(create_app(config), host=config.host, port=config.port, log_level=log_level,
                                   **uvicorn_options(config)))
    server.on_ready = on_ready
    server.run()
