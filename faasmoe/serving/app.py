"""The OpenAI-compatible HTTP server: thin routes over tenants, a backend and metrics.

Routes authenticate the tenant (a FastAPI dependency), turn the body into prompt
token ids and sampling settings, admit the request against the tenant's limits,
hand it to the backend and relay its events, as one JSON body or as server-sent
events. Every error is an OpenAI-style JSON body with a 4xx/5xx status.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from faasmoe.control.sequence import SamplingParams
from faasmoe.metering.meter import Meter, tenant_bill
from faasmoe.serving import schemas as S
from faasmoe.serving.backend import Backend, create_backend
from faasmoe.serving.config import ServerConfig
from faasmoe.serving.metrics import Metrics
from faasmoe.serving.scheduler import QueueFull
from faasmoe.serving.scheduler import Request as GenRequest
from faasmoe.serving.tenants import RateLimited, Tenant, Tenants

log = logging.getLogger("faasmoe.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}


def error_response(status: int, message: str, type: str, code: str | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = S.ErrorResponse(error=S.ErrorDetail(message=message, type=type, code=code, param=param))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


@dataclass
class Outcome:
    """How a request ended, for the tenant's usage and the metrics."""

    status: int = 200
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    ended_at: float | None = None
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    settled: bool = False
    request_id: str = ""


class BodyLimit:
    """Refuse request bodies over `limit` bytes with a JSON 413 before any route parses them.

    (FastAPI's own `max_body_size` answers plain text when Content-Length is over the limit.)"""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks, size, more = [], 0, True
        while more and not too_big:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            too_big = size > self.limit
            chunks.append(chunk)
            more = message.get("more_body", False)
        if too_big:
            resp = error_response(413, f"request body exceeds {self.limit} bytes", "invalid_request_error",
                                  "body_too_large")
            return await resp(scope, receive, send)
        body = b"".join(chunks)
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(config: ServerConfig, backend: Backend | None = None) -> FastAPI:
    tenants = Tenants(config.tenants)
    bearer = HTTPBearer(auto_error=False, description="A tenant's API key")
    state: dict = {}
    in_flight: dict[str, tuple[str, GenRequest]] = {}  # request id -> (tenant, request), while it runs

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        b = backend or await asyncio.to_thread(create_backend, config, lambda n, s: state["metrics"].on_step(n, s))
        state["backend"] = b
        state["meter"] = meter = Meter(b.processes, interval=config.meter_interval_s).start()
        state["metrics"] = Metrics(b.platform, b.queue_depth, b.running, meter)
        try:
            yield
        finally:
            meter.stop()
            await asyncio.to_thread(b.close)

    app = FastAPI(title="faasmoe", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible MoE serving with experts as scale-to-zero functions.")
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.state.tenants = tenants
    app.state.server = state

    # -- errors --------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return error_response(e.status, e.message, e.type, e.code, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None  # the request field at fault (a union's branch names are noise)
        message = first["msg"] if len(e.errors()) == 1 else f"{first['msg']} (or {len(e.errors()) - 1} other problems)"
        return error_response(400, f"{param}: {message}" if param else message, "invalid_request_error",
                              "invalid_value", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error", "not_found"
                              if e.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        log.exception("unexpected error")
        return error_response(500, "internal server error", "server_error")

    # -- dependencies --------------------------------------------------------------------------
    async def tenant_of(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Tenant:
        tenant = tenants.authenticate(creds.credentials if creds else None)
        if tenant is None:
            raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)",
                           "invalid_request_error", "invalid_api_key")
        return tenant

    async def operator(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        import hmac

        if creds is None:
            raise APIError(401, "the admin key is required (Authorization: Bearer <admin key>)",
                           "invalid_request_error", "invalid_api_key")
        if not hmac.compare_digest(creds.credentials.encode(), config.admin_key.encode()):
            raise APIError(403, "this endpoint needs the admin key", "invalid_request_error", "forbidden")

    def backend_() -> Backend:
        return state["backend"]

    # -- routes --------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict:
        b = backend_()
        return {"status": "ok", "mode": b.mode, "model": config.served_model_name, "platform": b.platform.name,
                "warm_instances": len(b.platform.instances()), "queue_depth": b.queue_depth()}

    @app.get("/v1/models", response_model=S.ModelList)
    async def models(_: Tenant = Depends(tenant_of)) -> S.ModelList:
        return S.ModelList(data=[S.ModelCard(id=config.served_model_name, created=int(STARTED))])

    @app.get("/v1/usage")
    async def usage(tenant: Tenant = Depends(tenant_of)) -> dict:
        """The calling tenant's own usage and limits; nothing of any other tenant."""
        c = tenant.config
        everyone = sum(t.usage.total_tokens for t in tenants)
        share = tenant.usage.total_tokens / everyone if everyone else 0.0
        return {"tenant": tenant.name, "usage": tenant.usage.to_json(), "in_flight": tenant.in_flight,
                "limits": {"max_concurrency": c.max_concurrency, "tokens_per_minute": c.tokens_per_minute,
                           "max_queued": c.max_queued},
                # what this tenant cost: its own processes, plus its token share of the shared ones
                "bill": tenant_bill(state["meter"], tenant.name, share)}

    def _own_request(tenant: Tenant, request_id: str) -> GenRequest:
        entry = in_flight.get(request_id)
        if entry is None or entry[0] != tenant.name:  # another tenant's id looks exactly like an unknown one
            raise APIError(404, f"no running request {request_id!r}", code="not_found", param="request_id")
        return entry[1]

    @app.get("/v1/requests/{request_id}")
    async def request_status(request_id: str, tenant: Tenant = Depends(tenant_of)) -> dict:
        """A running request of the caller's own (its id is in every streamed chunk and in X-Request-Id)."""
        req = _own_request(tenant, request_id)
        return {"id": req.id, "status": "cancelling" if req.cancelled else "running",
                "prompt_tokens": len(req.prompt_ids), "max_tokens": req.params.max_tokens,
                "completion_tokens": len(req.seq.output_ids) if req.seq else 0}

    @app.delete("/v1/requests/{request_id}")
    async def cancel_request(request_id: str, tenant: Tenant = Depends(tenant_of)) -> dict:
        """Cancel a running request of the caller's own; its slot is freed at the next step."""
        backend_().cancel(_own_request(tenant, request_id))
        return {"id": request_id, "cancelled": True}

    @app.get("/metrics", response_class=Response)
    async def metrics(_: None = Depends(operator)) -> Response:
        return Response(state["metrics"].render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions", response_model=S.CompletionResponse,
              responses={400: {"model": S.ErrorResponse}, 401: {"model": S.ErrorResponse},
                         429: {"model": S.ErrorResponse}, 502: {"model": S.ErrorResponse}})
    async def completions(body: S.CompletionRequest, request: Request, tenant: Tenant = Depends(tenant_of)):
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        ids = _prompt_ids(body.prompt)
        return await _generate(request, tenant, "completions", body, ids, body.max_tokens or 16)

    @app.post("/v1/chat/completions", response_model=S.ChatResponse,
              responses={400: {"model": S.ErrorResponse}, 401: {"model": S.ErrorResponse},
                         429: {"model": S.ErrorResponse}, 502: {"model": S.ErrorResponse}})
    async def chat(body: S.ChatRequest, request: Request, tenant: Tenant = Depends(tenant_of)):
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        try:
            messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                        for m in body.messages]
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        text = backend_().tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = _encode(text)
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:  # as OpenAI: up to what the context leaves, within the server's limit
            max_tokens = max(1, min(config.max_tokens_limit, backend_().max_context - len(ids)))
        return await _generate(request, tenant, "chat", body, ids, max_tokens)

    # -- the work ------------------------------------------------------------------------------
    def _encode(text: str) -> list[int]:
        if not text:
            raise APIError(400, "the prompt is empty", param="prompt")
        return backend_().tokenizer.encode(text, add_special_tokens=False)

    def _prompt_ids(prompt: str | list[int] | list[str]) -> list[int]:
        if isinstance(prompt, str):
            return _encode(prompt)
        if prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            return _encode(prompt[0])
        vocab = backend_().vocab_size
        if not prompt or any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt token ids must be a non-empty list of integers in 0..{vocab - 1}",
                           param="prompt")
        return list(prompt)

    async def _generate(request: Request, tenant: Tenant, endpoint: str, body, ids: list[int], max_tokens: int):
        b = backend_()
        if body.model != config.served_model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves "
                                f"{config.served_model_name!r}", code="model_not_found", param="model")
        if max_tokens > config.max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} exceeds this server's limit of {config.max_tokens_limit}",
                           param="max_tokens")
        if len(ids) + max_tokens > b.max_context:
            raise APIError(400, f"this model's context is {b.max_context} tokens; the prompt has {len(ids)} and "
                                f"max_tokens asks for {max_tokens}", code="context_length_exceeded")
        try:
            tenants.admit(tenant, len(ids))
        except RateLimited as e:
            state["metrics"].requests.labels(tenant.name, endpoint, "429").inc()
            raise APIError(429, str(e), "rate_limit_exceeded", "rate_limit_exceeded",
                           headers={"Retry-After": str(e.retry_after)}) from e
        tenants.spend(tenant, len(ids))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        prefix = "chatcmpl-" if endpoint == "chat" else "cmpl-"
        req = GenRequest(prefix + uuid.uuid4().hex, tenant.name, ids,
                         SamplingParams(max_tokens, body.temperature, body.top_p, body.seed, tuple(body.stop),
                                        body.ignore_eos),
                         emit=lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
        outcome = Outcome(prompt_tokens=len(ids))
        started = time.perf_counter()
        in_flight[req.id] = (tenant.name, req)
        outcome.request_id = req.id
        try:
            await b.submit(req)
        except (ValueError, QueueFull) as e:
            status = 400 if isinstance(e, ValueError) else 429
            outcome.status = status
            _settle(tenant, endpoint, outcome, started)
            raise APIError(status, str(e), "invalid_request_error" if status == 400 else "rate_limit_exceeded",
                           None if status == 400 else "queue_full",
                           headers={} if status == 400 else {"Retry-After": "1"}) from e
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(request, tenant, endpoint, req, queue, outcome, started, created,
                                             include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": req.id})
        try:
            ok = await _collect(request, req, queue, outcome, started)
        finally:
            _settle(tenant, endpoint, outcome, started)
        if not ok:
            return _failure(outcome)
        usage = S.Usage(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens,
                        total_tokens=outcome.prompt_tokens + outcome.completion_tokens)
        text = "".join(outcome.text)
        if endpoint == "chat":
            return S.ChatResponse(id=req.id, created=created, model=config.served_model_name, usage=usage,
                                  choices=[S.ChatChoice(message=S.AssistantMessage(content=text),
                                                        finish_reason=outcome.finish_reason)])
        return S.CompletionResponse(id=req.id, created=created, model=config.served_model_name, usage=usage,
                                    choices=[S.CompletionChoice(text=text, finish_reason=outcome.finish_reason)])

    def _on_event(ev: dict, outcome: Outcome) -> bool:
        """Fold one event into the outcome; True when the request has ended."""
        now = time.perf_counter()
        if ev["type"] == "text":
            outcome.first_token_at = outcome.first_token_at or now
            outcome.text.append(ev["text"])
            return False
        outcome.ended_at = now
        outcome.finish_reason = ev["finish_reason"]
        outcome.completion_tokens = ev["usage"]["completion_tokens"]
        if outcome.completion_tokens and outcome.first_token_at is None:
            outcome.first_token_at = now
        if ev["finish_reason"] not in ("stop", "length"):
            outcome.error = ev.get("error") or ev["finish_reason"]
            outcome.status = 503 if ev["finish_reason"] == "cancelled" else 502
        return True

    async def _next_event(request: Request, req: GenRequest, queue: asyncio.Queue, outcome: Outcome,
                          started: float) -> dict | None:
        """The next event; None if the client went away or the request ran out of time (then it is cancelled)."""
        while True:
            try:
                return await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    outcome.status = 499
                elif time.perf_counter() - started > config.request_timeout_s:
                    outcome.status, outcome.error = 504, f"request exceeded {config.request_timeout_s:g} s"
                else:
                    continue
                backend_().cancel(req)
                return None

    async def _collect(request: Request, req: GenRequest, queue: asyncio.Queue, outcome: Outcome,
                       started: float) -> bool:
        while (ev := await _next_event(request, req, queue, outcome, started)) is not None:
            if _on_event(ev, outcome):
                return outcome.error is None
        return False

    async def _stream(request: Request, tenant: Tenant, endpoint: str, req: GenRequest, queue: asyncio.Queue,
                      outcome: Outcome, started: float, created: int, include_usage: bool) -> AsyncIterator[str]:
        chat_ = endpoint == "chat"
        base = {"id": req.id, "object": "chat.completion.chunk" if chat_ else "text_completion", "created": created,
                "model": config.served_model_name}

        def chunk(text: str | None, finish: str | None, role: bool = False) -> str:
            if chat_:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n"

        ended = False
        try:
            if chat_:
                yield chunk(None, None, role=True)
            while (ev := await _next_event(request, req, queue, outcome, started)) is not None:
                if not _on_event(ev, outcome):
                    yield chunk(ev["text"], None)
                    continue
                ended = True
                if outcome.error is None:
                    yield chunk(None, outcome.finish_reason)
                    if include_usage:
                        u = {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
                             "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}
                        yield f"data: {json.dumps({**base, 'choices': [], 'usage': u})}\n\n"
                else:
                    err = S.ErrorDetail(message=outcome.error, type="server_error", code="generation_failed")
                    yield f"data: {json.dumps({'error': err.model_dump()})}\n\n"
                yield "data: [DONE]\n\n"
                return
        finally:
            if not ended:  # the client went away mid-stream: free its slot
                backend_().cancel(req)
                if outcome.status == 200:
                    outcome.status = 499
            _settle(tenant, endpoint, outcome, started)

    def _failure(outcome: Outcome) -> JSONResponse:
        if outcome.status == 499:
            return Response(status_code=499)
        code = {502: "function_failed", 503: "unavailable", 504: "timeout"}.get(outcome.status)
        return error_response(outcome.status, outcome.error or "generation failed", "server_error", code)

    def _settle(tenant: Tenant, endpoint: str, outcome: Outcome, started: float) -> None:
        """Record the request once: the tenant's usage and the metrics."""
        if outcome.settled:
            return
        outcome.settled = True
        in_flight.pop(outcome.request_id, None)
        ok = outcome.status == 200
        if outcome.status in (400, 429):  # refused by the backend: nothing was served
            tenants.refund(tenant, outcome.prompt_tokens)
        else:
            tenants.release(tenant, outcome.prompt_tokens, outcome.completion_tokens, ok)
            tenants.spend(tenant, outcome.completion_tokens)
        m = state["metrics"]
        m.requests.labels(tenant.name, endpoint, str(outcome.status)).inc()
        if outcome.status not in (400, 429):
            m.tokens.labels(tenant.name, "prompt").inc(outcome.prompt_tokens)
            m.tokens.labels(tenant.name, "completion").inc(outcome.completion_tokens)
        if ok and outcome.first_token_at is not None:
            m.ttft.labels(tenant.name).observe(outcome.first_token_at - started)
            if outcome.completion_tokens > 1 and outcome.ended_at:
                m.tpot.labels(tenant.name).observe((outcome.ended_at - outcome.first_token_at)
                                                   / (outcome.completion_tokens - 1))

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
                                   timeout_graceful_shutdown=5))
    server.on_ready = on_ready
    server.run()
