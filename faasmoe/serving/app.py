"""The OpenAI-compatible HTTP server: thin routes over tenants, a backend and metrics.

Before a body is read, the `Gate` middleware checks the key from the headers and the
tenant's room, and bounds the body in size and time. Routes then turn the body into
prompt token ids (off the event loop) and sampling settings, admit the request
(`Lifecycle`: the tenant's slot and token reservation), hand it to the backend and relay
its events as one JSON body or as server-sent events. Every error is an OpenAI-style JSON
body with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from faasmoe.control.sequence import SamplingParams
from faasmoe.metering.billing import SharedCostLedger
from faasmoe.metering.meter import Meter
from faasmoe.serving import schemas as S
from faasmoe.serving.backend import Backend, create_backend
from faasmoe.serving.config import ServerConfig
from faasmoe.serving.lifecycle import Lifecycle, Ticket
from faasmoe.serving.metrics import Metrics
from faasmoe.serving.scheduler import QueueFull
from faasmoe.serving.scheduler import Request as GenRequest
from faasmoe.serving.tenants import RateLimited, SlotTimeout, Tenant, Tenants

log = logging.getLogger("faasmoe.server")

GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
EVENT_POLL_S = 0.5  # how often a waiting response checks for a gone client or a deadline
QUEUE_RETRY_AFTER_S = 1  # Retry-After when the server-wide queue is full


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None, counted: bool = False):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}
        self.counted = counted  # already recorded in the tenant's usage


def error_response(status: int, message: str, type: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = S.ErrorResponse(error=S.ErrorDetail(message=message, type=type, code=code, param=param))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


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


def create_app(config: ServerConfig, backend: Backend | None = None) -> FastAPI:
    tenants = Tenants(config.tenants)
    bearer = HTTPBearer(auto_error=False, description="A tenant's API key")
    state: dict = {}
    lifecycle = Lifecycle(tenants, lambda: state["metrics"])
    ledger = SharedCostLedger([t.name for t in tenants])

    def close_billing_interval() -> None:
        ledger.update(state["meter"], {t.name: t.usage.total_tokens for t in tenants})

    async def bill_shared_costs() -> None:
        """Close a billing interval at every metering interval (and when a tenant reads its bill)."""
        while True:
            close_billing_interval()
            await asyncio.sleep(config.meter_interval_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        b = backend or await asyncio.to_thread(create_backend, config, lambda n, s: state["metrics"].on_step(n, s))
        state["backend"] = b
        state["meter"] = meter = Meter(b.processes, interval=config.meter_interval_s).start()
        state["metrics"] = Metrics(b.platform, b.queue_depth, b.running, meter, b.routed)
        billing = asyncio.create_task(bill_shared_costs())
        try:
            yield
        finally:
            billing.cancel()
            meter.stop()
            await asyncio.to_thread(b.close)

    def refused(tenant: Tenant, path: str, status: int) -> None:
        endpoint = "chat" if path.endswith("chat/completions") else path.rsplit("/", 1)[-1]
        state["metrics"].requests.labels(tenant.name, endpoint, str(status)).inc()

    app = FastAPI(title="faasmoe", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible MoE serving with experts as scale-to-zero functions.")
    app.add_middleware(Gate, tenants=tenants, limit=config.max_body_bytes, timeout=config.body_timeout_s,
                       on_refused=refused)
    app.state.tenants = tenants
    app.state.server = state

    # -- errors --------------------------------------------------------------------------------
    def count_invalid(request: Request, status: int) -> None:
        """A request refused after authentication counts in its tenant's usage."""
        tenant = getattr(request.state, "tenant", None)
        if tenant is not None and 400 <= status < 500 and status != 429:
            Tenants.invalid(tenant)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        if not e.counted:
            count_invalid(request, e.status)
        return error_response(e.status, e.message, e.type, e.code, e.param, e.headers)

    @app.exception_handler(S.UnsupportedParameter)
    async def _unsupported(request: Request, e: S.UnsupportedParameter):
        count_invalid(request, 400)
        return error_response(400, str(e), "invalid_request_error", "unsupported_parameter", e.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        count_invalid(request, 400)
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None  # the request field at fault (a union's branch names are noise)
        msg = str(first["msg"]).removeprefix("Value error, ")
        message = msg if len(e.errors()) == 1 else f"{msg} (or {len(e.errors()) - 1} other problems)"
        return error_response(400, f"{param}: {message}" if param else message, "invalid_request_error",
                              "invalid_value", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        count_invalid(request, e.status_code)
        return error_response(e.status_code, str(e.detail), "invalid_request_error", "not_found"
                              if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        log.exception("unexpected error")
        return error_response(500, "internal server error", "server_error")

    # -- dependencies --------------------------------------------------------------------------
    async def tenant_of(request: Request, _: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Tenant:
        """The tenant the Gate authenticated (the bearer dependency only documents the scheme)."""
        tenant = getattr(request.state, "tenant", None)
        if tenant is None:
            raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                           "invalid_request_error", "invalid_api_key")
        return tenant

    async def operator(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if creds is None:
            raise APIError(401, "the admin key is required (Authorization: Bearer <admin key>)",
                           "invalid_request_error", "invalid_api_key")
        key = creds.credentials.encode("utf-8", "surrogatepass")
        if not hmac.compare_digest(key, config.admin_key.encode()):
            raise APIError(403, "this endpoint needs the admin key", "invalid_request_error", "forbidden")

    def backend_() -> Backend:
        return state["backend"]

    # -- routes --------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict:
        b = backend_()
        return {"status": "ok", "mode": b.mode, "model": config.served_model_name, "platform": b.platform.name,
                "warm_instances": len(b.platform.instances()), "queue_depth": b.queue_depth()}

    def model_card() -> S.ModelCard:
        return S.ModelCard(id=config.served_model_name, created=int(STARTED))

    @app.get("/v1/models", response_model=S.ModelList)
    async def models(_: Tenant = Depends(tenant_of)) -> S.ModelList:
        return S.ModelList(data=[model_card()])

    @app.get("/v1/models/{model_id:path}", response_model=S.ModelCard)
    async def model(model_id: str, _: Tenant = Depends(tenant_of)) -> S.ModelCard:
        check_model(model_id)
        return model_card()

    @app.get("/v1/usage")
    async def usage(tenant: Tenant = Depends(tenant_of)) -> dict:
        """The calling tenant's own usage, limits and bill; nothing of any other tenant, not even as a ratio."""
        c = tenant.config
        return {"tenant": tenant.name, "usage": tenant.usage.to_json(), "in_flight": tenant.in_flight,
                "waiting": len(tenant.waiters),
                "limits": {"max_concurrency": c.max_concurrency, "tokens_per_minute": c.tokens_per_minute,
                           "max_queued": c.max_queued},
                "bill": bill(tenant)}

    def bill(tenant: Tenant) -> dict[str, float]:
        close_billing_interval()
        return ledger.bill(state["meter"], tenant.name)

    def _own_request(tenant: Tenant, request_id: str) -> Ticket:
        ticket = lifecycle.running.get(request_id)
        if ticket is None or ticket.tenant is not tenant:  # another tenant's id looks exactly like an unknown one
            raise APIError(404, f"no running request {request_id!r}", code="not_found", param="request_id")
        return ticket

    @app.get("/v1/requests/{request_id}")
    async def request_status(request_id: str, tenant: Tenant = Depends(tenant_of)) -> dict:
        """A running request of the caller's own (its id is in every streamed chunk and in X-Request-Id)."""
        ticket = _own_request(tenant, request_id)
        req = ticket.request
        return {"id": req.id, "status": "cancelling" if req.cancelled else "running",
                "prompt_tokens": ticket.prompt_tokens, "max_tokens": ticket.max_tokens,
                "completion_tokens": ticket.completion_tokens}

    @app.delete("/v1/requests/{request_id}")
    async def cancel_request(request_id: str, tenant: Tenant = Depends(tenant_of)) -> dict:
        """Cancel a running request of the caller's own; its slot is freed at the next step."""
        backend_().cancel(_own_request(tenant, request_id).request)
        return {"id": request_id, "cancelled": True}

    @app.get("/metrics", response_class=Response)
    async def metrics(_: None = Depends(operator)) -> Response:
        return Response(state["metrics"].render(), media_type="text/plain; version=0.0.4")

    errors = {s: {"model": S.ErrorResponse} for s in (400, 401, 404, 408, 413, 429, 502, 503, 504)}

    @app.post("/v1/completions", response_model=S.CompletionResponse, responses=errors)
    async def completions(body: S.CompletionRequest, request: Request, tenant: Tenant = Depends(tenant_of)):
        check_model(body.model)
        ids = await _prompt_ids(body.prompt)
        return await _generate(request, tenant, "completions", body, ids, body.max_tokens or 16)

    @app.post("/v1/chat/completions", response_model=S.ChatResponse, responses=errors)
    async def chat(body: S.ChatRequest, request: Request, tenant: Tenant = Depends(tenant_of)):
        check_model(body.model)
        try:
            messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                        for m in body.messages]
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        check_chars(sum(len(m["content"]) for m in messages), "messages")
        tok = backend_().tokenizer
        text = await asyncio.to_thread(tok.apply_chat_template, messages, tokenize=False, add_generation_prompt=True)
        ids = await _encode(text)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:  # as OpenAI: up to what the context leaves, within the server's and tenant's limits
            room = min(backend_().max_context, tenant.config.tokens_per_minute) - len(ids)
            max_tokens = max(1, min(config.max_tokens_limit, room))
        return await _generate(request, tenant, "chat", body, ids, max_tokens)

    # -- the work ------------------------------------------------------------------------------
    def check_model(name: str) -> None:
        if name != config.served_model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {config.served_model_name!r}",
                           code="model_not_found", param="model")

    def check_chars(n: int, param: str) -> None:
        if n > config.max_prompt_chars:
            raise APIError(400, f"the prompt has {n} characters; this server accepts at most "
                                f"{config.max_prompt_chars}", code="context_length_exceeded", param=param)

    async def _encode(text: str) -> list[int]:
        """Token ids of `text`, tokenized off the event loop (a long prompt must not stall other requests)."""
        if not text:
            raise APIError(400, "the prompt is empty", param="prompt")
        check_chars(len(text), "prompt")
        return await asyncio.to_thread(backend_().tokenizer.encode, text, add_special_tokens=False)

    async def _prompt_ids(prompt: str | list[int] | list[str]) -> list[int]:
        if isinstance(prompt, str):
            return await _encode(prompt)
        if prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            return await _encode(prompt[0])
        vocab = backend_().vocab_size
        if not prompt or any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt token ids must be a non-empty list of integers in 0..{vocab - 1}",
                           param="prompt")
        return list(prompt)

    async def _generate(request: Request, tenant: Tenant, endpoint: str, body, ids: list[int], max_tokens: int):
        b = backend_()
        if max_tokens > config.max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} exceeds this server's limit of {config.max_tokens_limit}",
                           param="max_tokens")
        if len(ids) + max_tokens > b.max_context:
            raise APIError(400, f"this model's context is {b.max_context} tokens; the prompt has {len(ids)} and "
                                f"max_tokens asks for {max_tokens}", code="context_length_exceeded")
        try:
            ticket = await lifecycle.admit(tenant, endpoint, len(ids), max_tokens, config.request_timeout_s)
        except RateLimited as e:
            raise APIError(429, str(e), "rate_limit_exceeded", "rate_limit_exceeded", counted=True,
                           headers={"Retry-After": str(e.retry_after)}) from e
        except SlotTimeout as e:
            raise APIError(504, str(e), "server_error", "timeout", counted=True) from e
        prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"
        req = GenRequest(prefix + uuid.uuid4().hex, tenant.name, ids,
                         SamplingParams(max_tokens, body.temperature, body.top_p, body.seed, tuple(body.stop),
                                        body.ignore_eos), emit=lifecycle.emitter(ticket))
        headers = {"X-Request-Id": req.id}
        try:
            await b.submit(req)
        except (ValueError, QueueFull) as e:
            status = 400 if isinstance(e, ValueError) else 429
            lifecycle.refuse(ticket, status)
            if status == 429:
                headers["Retry-After"] = str(QUEUE_RETRY_AFTER_S)
            raise APIError(status, str(e), "invalid_request_error" if status == 400 else "rate_limit_exceeded",
                           None if status == 400 else "queue_full", headers=headers, counted=True) from e
        lifecycle.started(ticket, req)  # before any event is delivered: they run on this loop, after an await
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(request, endpoint, ticket, created, include_usage,
                                             body.return_token_ids),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
        collected = await _collect(request, ticket)
        if collected is None:
            return _failure(ticket, headers)
        text, ids = collected
        ids_ = ids if body.return_token_ids else None
        usage = S.Usage(prompt_tokens=ticket.prompt_tokens, completion_tokens=ticket.completion_tokens,
                        total_tokens=ticket.prompt_tokens + ticket.completion_tokens)
        if endpoint == "chat":
            out = S.ChatResponse(id=req.id, created=created, model=config.served_model_name, usage=usage,
                                 choices=[S.ChatChoice(message=S.AssistantMessage(content=text),
                                                       finish_reason=ticket.finish_reason, token_ids=ids_)])
        else:
            out = S.CompletionResponse(id=req.id, created=created, model=config.served_model_name, usage=usage,
                                       choices=[S.CompletionChoice(text=text, finish_reason=ticket.finish_reason,
                                                                   token_ids=ids_)])
        return JSONResponse(out.model_dump(exclude={"choices": {0: {"token_ids"}}} if ids_ is None else None),
                            headers=headers)

    async def _next_event(request: Request, ticket: Ticket) -> dict | None:
        """The next event; None if the client went away or the request ran out of time (then it is cancelled:
        the backend's final event still settles it, with every token it made counted)."""
        while True:
            try:
                return await asyncio.wait_for(ticket.events.get(), timeout=EVENT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    ticket.status = 499
                elif time.perf_counter() - ticket.started > config.request_timeout_s:
                    ticket.status, ticket.error = 504, f"request exceeded {config.request_timeout_s:g} s"
                else:
                    continue
                backend_().cancel(ticket.request)
                return None

    async def _collect(request: Request, ticket: Ticket) -> tuple[str, list[int]] | None:
        """The whole text and token ids, or None if the request failed."""
        text, ids = [], []
        while (ev := await _next_event(request, ticket)) is not None:
            if ev["type"] == "text":
                text.append(ev["text"])
                ids += ev.get("ids", [])
            else:
                return ("".join(text), ids) if ticket.status == 200 else None
        return None

    async def _stream(request: Request, endpoint: str, ticket: Ticket, created: int, include_usage: bool,
                      with_ids: bool) -> AsyncIterator[str]:
        chat_ = endpoint == "chat"
        base = {"id": ticket.request.id, "object": "chat.completion.chunk" if chat_ else "text_completion",
                "created": created, "model": config.served_model_name}

        def chunk(text: str | None, finish: str | None, role: bool = False, ids: list[int] | None = None) -> str:
            if chat_:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            if ids:
                choice["token_ids"] = ids
            return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"

        ended = False
        try:
            if chat_:
                yield chunk(None, None, role=True)
            while (ev := await _next_event(request, ticket)) is not None:
                if ev["type"] == "text":
                    ids = ev.get("ids") if with_ids else None
                    if ev["text"] or ids:
                        yield chunk(ev["text"], None, ids=ids)
                    continue
                ended = True
                if ticket.status == 200:
                    yield chunk(None, ticket.finish_reason)
                    if include_usage:
                        u = {"prompt_tokens": ticket.prompt_tokens, "completion_tokens": ticket.completion_tokens,
                             "total_tokens": ticket.prompt_tokens + ticket.completion_tokens}
                        extension = {"faasmoe": {"cold_start_in_prefill": ticket.cold_prefill}}  # for benchmarks
                        yield f"data: {json.dumps({**base, 'choices': [], 'usage': u, **extension})}\n\n"
                else:
                    err = S.ErrorDetail(message=ticket.error or "generation failed", type="server_error",
                                        code="generation_failed")
                    yield f"data: {json.dumps({'error': err.model_dump()})}\n\n"
                yield "data: [DONE]\n\n"
                return
            if ticket.status == 504:  # still connected, out of time: say so, then end the stream properly
                err = S.ErrorDetail(message=ticket.error or "timeout", type="server_error", code="timeout")
                yield f"data: {json.dumps({'error': err.model_dump()})}\n\n"
                yield "data: [DONE]\n\n"
        finally:
            if not ended and not ticket.settled:  # the client went away mid-stream: free its slot
                if ticket.status == 200:
                    ticket.status = 499
                with suppress(Exception):
                    backend_().cancel(ticket.request)

    def _failure(ticket: Ticket, headers: dict[str, str]) -> Response:
        if ticket.status == 499:
            return Response(status_code=499, headers=headers)
        code = {502: "function_failed", 503: "unavailable", 504: "timeout"}.get(ticket.status)
        return error_response(ticket.status, ticket.error or "generation failed", "server_error", code,
                              headers=headers)

    return app


STARTED = time.time()


class Server(uvicorn.Server):
    """uvicorn, but Ctrl-C / SIGTERM first ends running requests cleanly (an error event and [DONE] for a
    stream, 503 otherwise), then shuts down: no client is left hanging on a cut connection."""

    on_ready: Callable[[int], None] | None = None  # called with the bound port once the server listens

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_ready is not None:
            self.on_ready(self.servers[0].sockets[0].getsockname()[1])

    def handle_exit(self, sig, frame) -> None:
        backend = getattr(self.config.app, "state", None) and self.config.app.state.server.get("backend")
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
