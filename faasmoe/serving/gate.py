"""What is checked before a request body is read, and what bounds a connection.

`Gate` checks the key from the headers and the tenant's room, then reads the body within a
size and a time limit; `header_timeout_protocol` closes connections whose headers do not
arrive in time; uvicorn's `limit_concurrency` bounds their number.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from faasmoe.serving.config import ServerConfig
from faasmoe.serving.errors import error_response
from faasmoe.serving.tenants import RateLimited, Tenant, Tenants

GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")


def bearer_key(scope) -> bytes | None:
    """The key of an `Authorization: Bearer <key>` header, as raw bytes (any bytes: compared, never decoded)."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, key = value.partition(b" ")
            return key.strip() if scheme.lower() == b"bearer" and key.strip() else None
    return None


class Gate:
    """ASGI middleware: what is checked before a request body is read.

    On /v1/ routes the key is checked from the headers (401 at once, nothing buffered) and
    the tenant is put in the request's state; a generation request of a tenant with no room
    even to wait is refused (429) unread. Bodies are read within `limit` bytes (413) and
    `timeout` seconds (408). (FastAPI's own limit answers plain text, and reads before auth.)"""

    def __init__(self, app, tenants: Tenants, limit: int, timeout: float,
                 on_refused: Callable[[Tenant, str, int], None]):
        self.app, self.tenants, self.limit, self.timeout, self.on_refused = app, tenants, limit, timeout, on_refused

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        tenant = None
        if scope["path"].startswith("/v1/"):
            tenant = self.tenants.authenticate(bearer_key(scope))
            if tenant is None:
                return await error_response(401, "missing or invalid API key (Authorization: Bearer <key>)",
                                            "invalid_request_error", "invalid_api_key")(scope, receive, send)
            scope.setdefault("state", {})["tenant"] = tenant
            if scope["method"] == "POST" and scope["path"] in GENERATE_PATHS:
                try:
                    self.tenants.precheck(tenant)
                except RateLimited as e:
                    self.on_refused(tenant, scope["path"], 429)
                    return await error_response(429, str(e), "rate_limit_exceeded", "rate_limit_exceeded",
                                                headers={"Retry-After": str(e.retry_after)})(scope, receive, send)
        if scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        body, refusal = await self._read_body(scope, receive)
        if refusal is not None:
            if tenant is not None:
                Tenants.invalid(tenant)
                self.on_refused(tenant, scope["path"], refusal.status_code)
            return await refusal(scope, receive, send)
        if body is None:  # the client went away
            return
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, scope, receive) -> tuple[bytes | None, JSONResponse | None]:
        too_big = error_response(413, f"request body exceeds {self.limit} bytes", "invalid_request_error",
                                 "body_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return None, too_big
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        chunks, size, more = [], 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return None, error_response(408, f"the request body did not arrive within {self.timeout:g} s",
                                            "invalid_request_error", "body_timeout")
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return None, too_big
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks), None


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's HTTP/1.1 protocol, closing a connection whose request headers are not complete within
    `seconds` of its opening or of its previous response (uvicorn itself waits for headers forever)."""

    class HeaderTimeoutH11(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            cycle = self.cycle
            self.loop.call_later(seconds, self._expire, cycle)

        def _expire(self, armed_cycle) -> None:
            if self.cycle is armed_cycle and not self.transport.is_closing():
                self.transport.close()  # no new request began: headers too slow, or an idle connection

    return HeaderTimeoutH11


def uvicorn_options(config: ServerConfig) -> dict:
    """The uvicorn settings that bound connections: their number, and how long headers may take."""
    return {"http": header_timeout_protocol(config.header_timeout_s), "limit_concurrency": config.max_connections,
            "timeout_graceful_shutdown": 5}
