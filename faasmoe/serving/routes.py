"""The HTTP routes: OpenAI's completions, chat completions and models, and faasmoe's usage, requests,
health and metrics.

A generation route turns the body into prompt token ids (off the event loop) and sampling settings,
admits the request (`Lifecycle`: the tenant's slot and token reservation), submits it to the backend,
which checks it against the model, and relays its events (`responses`).
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid

import jinja2
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from faasmoe.control.sequence import SamplingParams
from faasmoe.serving import responses
from faasmoe.serving import schemas as S
from faasmoe.serving.errors import APIError
from faasmoe.serving.lifecycle import Ticket
from faasmoe.serving.scheduler import QueueFull
from faasmoe.serving.scheduler import Request as GenRequest
from faasmoe.serving.state import ServerState, server_state
from faasmoe.serving.tenants import RateLimited, SlotTimeout, Tenant

QUEUE_RETRY_AFTER_S = 1  # Retry-After when the server-wide queue is full
STARTED = time.time()  # `created` of the model card

router = APIRouter()
bearer = HTTPBearer(auto_error=False, description="A tenant's API key")
ERRORS = {s: {"model": S.ErrorResponse} for s in (400, 401, 404, 408, 413, 429, 502, 503, 504)}


# -- dependencies ----------------------------------------------------------------------------------------
async def tenant_of(request: Request, _: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Tenant:
    """The tenant the Gate authenticated (the bearer dependency only documents the scheme)."""
    tenant = getattr(request.state, "tenant", None)
    if tenant is None:
        raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_request_error",
                       "invalid_api_key")
    return tenant


async def operator(creds: HTTPAuthorizationCredentials | None = Depends(bearer),
                   server: ServerState = Depends(server_state)) -> None:
    if creds is None:
        raise APIError(401, "the admin key is required (Authorization: Bearer <admin key>)",
                       "invalid_request_error", "invalid_api_key")
    key = creds.credentials.encode("utf-8", "surrogatepass")
    if not hmac.compare_digest(key, server.config.admin_key.encode()):
        raise APIError(403, "this endpoint needs the admin key", "invalid_request_error", "forbidden")


# -- routes ----------------------------------------------------------------------------------------------
@router.get("/health")
async def health(server: ServerState = Depends(server_state)) -> dict:
    b = server.backend
    return {"status": "ok", "mode": b.mode, "model": server.config.served_model_name,
            "platform": b.platform.name if b.platform else None,
            "warm_instances": len(b.platform.instances()) if b.platform else 0, "queue_depth": b.queue_depth()}


def _model_card(server: ServerState) -> S.ModelCard:
    return S.ModelCard(id=server.config.served_model_name, created=int(STARTED))


@router.get("/v1/models", response_model=S.ModelList)
async def models(_: Tenant = Depends(tenant_of), server: ServerState = Depends(server_state)) -> S.ModelList:
    return S.ModelList(data=[_model_card(server)])


@router.get("/v1/models/{model_id:path}", response_model=S.ModelCard)
async def model(model_id: str, _: Tenant = Depends(tenant_of),
                server: ServerState = Depends(server_state)) -> S.ModelCard:
    _check_model(server, model_id)
    return _model_card(server)


@router.get("/v1/usage")
async def usage(tenant: Tenant = Depends(tenant_of), server: ServerState = Depends(server_state)) -> dict:
    """The calling tenant's own usage, limits and bill; nothing of any other tenant, not even as a ratio."""
    c = tenant.config
    return {"tenant": tenant.name, "usage": tenant.usage.to_json(), "in_flight": tenant.in_flight,
            "waiting": len(tenant.waiters),
            "limits": {"max_concurrency": c.max_concurrency, "tokens_per_minute": c.tokens_per_minute,
                       "max_queued": c.max_queued},
            "bill": await asyncio.to_thread(server.bill, tenant)}  # it reads every process: not on the loop


def _own_request(server: ServerState, tenant: Tenant, request_id: str) -> Ticket:
    ticket = server.lifecycle.running.get(request_id)
    if ticket is None or ticket.tenant is not tenant:  # another tenant's id looks exactly like an unknown one
        raise APIError(404, f"no running request {request_id!r}", code="not_found", param="request_id")
    return ticket


@router.get("/v1/requests/{request_id}")
async def request_status(request_id: str, tenant: Tenant = Depends(tenant_of),
                         server: ServerState = Depends(server_state)) -> dict:
    """A running request of the caller's own (its id is in every streamed chunk and in X-Request-Id)."""
    ticket = _own_request(server, tenant, request_id)
    req = ticket.request
    return {"id": req.id, "status": "cancelling" if req.cancelled else "running",
            "prompt_tokens": ticket.prompt_tokens, "max_tokens": ticket.max_tokens,
            "completion_tokens": ticket.completion_tokens}


@router.delete("/v1/requests/{request_id}")
async def cancel_request(request_id: str, tenant: Tenant = Depends(tenant_of),
                         server: ServerState = Depends(server_state)) -> dict:
    """Cancel a running request of the caller's own; its slot is freed at the next step."""
    server.backend.cancel(_own_request(server, tenant, request_id).request)
    return {"id": request_id, "cancelled": True}


@router.get("/metrics", response_class=Response)
async def metrics(_: None = Depends(operator), server: ServerState = Depends(server_state)) -> Response:
    return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")


@router.post("/v1/completions", response_model=S.CompletionResponse, responses=ERRORS)
async def completions(body: S.CompletionRequest, request: Request, tenant: Tenant = Depends(tenant_of),
                      server: ServerState = Depends(server_state)):
    _check_model(server, body.model)
    ids = await _prompt_ids(server, body.prompt)
    return await _generate(server, request, tenant, "completions", body, ids, body.max_tokens or 16)


@router.post("/v1/chat/completions", response_model=S.ChatResponse, responses=ERRORS)
async def chat(body: S.ChatRequest, request: Request, tenant: Tenant = Depends(tenant_of),
               server: ServerState = Depends(server_state)):
    _check_model(server, body.model)
    try:
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                    for m in body.messages]
    except ValueError as e:
        raise APIError(400, str(e), param="messages") from e
    _check_chars(server, sum(len(m["content"]) for m in messages), "messages")
    tok = server.backend.tokenizer
    if not tok.chat_template:
        raise APIError(400, f"model {body.model!r} has no chat template (its tokenizer_config.json defines none): "
                            "send the prompt to /v1/completions", param="messages")
    try:
        text = await asyncio.to_thread(tok.apply_chat_template, messages, tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as e:  # the model's own template refuses the conversation (say, roles out of order)
        raise APIError(400, f"the model's chat template refused these messages: {e}", param="messages") from e
    ids = await _encode(server, text)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is None:  # as OpenAI: up to what the context leaves, within the server's and tenant's limits
        room = min(server.backend.max_context, tenant.config.tokens_per_minute) - len(ids)
        max_tokens = max(1, min(server.config.max_tokens_limit, room))
    return await _generate(server, request, tenant, "chat", body, ids, max_tokens)


# -- the work --------------------------------------------------------------------------------------------
def _check_model(server: ServerState, name: str) -> None:
    served = server.config.served_model_name
    if name != served:
        raise APIError(404, f"model {name!r} does not exist; this server serves {served!r}",
                       code="model_not_found", param="model")


def _check_chars(server: ServerState, n: int, param: str) -> None:
    limit = server.config.max_prompt_chars
    if n > limit:
        raise APIError(400, f"the prompt has {n} characters; this server accepts at most {limit}",
                       code="context_length_exceeded", param=param)


async def _encode(server: ServerState, text: str) -> list[int]:
    """Token ids of `text`, tokenized off the event loop (a long prompt must not stall other requests)."""
    if not text:
        raise APIError(400, "the prompt is empty", param="prompt")
    _check_chars(server, len(text), "prompt")
    return await asyncio.to_thread(server.backend.tokenizer.encode, text, add_special_tokens=False)


async def _prompt_ids(server: ServerState, prompt: str | list[int] | list[str]) -> list[int]:
    if isinstance(prompt, str):
        return await _encode(server, prompt)
    if prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise APIError(400, "only one prompt per request is supported", param="prompt")
        return await _encode(server, prompt[0])
    return list(prompt)  # token ids (the schema made sure): the engine checks them against its vocabulary


async def _generate(server: ServerState, request: Request, tenant: Tenant, endpoint: str, body, ids: list[int],
                    max_tokens: int):
    config, lifecycle = server.config, server.lifecycle
    if max_tokens > config.max_tokens_limit:
        raise APIError(400, f"max_tokens {max_tokens} exceeds this server's limit of {config.max_tokens_limit}",
                       param="max_tokens")
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
        await server.backend.submit(req)
    except (ValueError, QueueFull) as e:  # the model cannot serve it (InvalidRequest), or no room
        status = 400 if isinstance(e, ValueError) else 429
        lifecycle.refuse(ticket, status)
        if status == 429:
            headers["Retry-After"] = str(QUEUE_RETRY_AFTER_S)
        raise APIError(status, str(e), "invalid_request_error" if status == 400 else "rate_limit_exceeded",
                       getattr(e, "code", None) if status == 400 else "queue_full", getattr(e, "param", None),
                       headers=headers, counted=True) from e
    lifecycle.started(ticket, req)  # before any event is delivered: they run on this loop, after an await
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(responses.stream(server, request, endpoint, ticket, created, include_usage,
                                                  body.return_token_ids),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})
    collected = await responses.collect(server, request, ticket)
    if collected is None:
        return responses.failure(ticket, headers)
    text, out_ids = collected
    return responses.whole(server, endpoint, ticket, created, text, out_ids if body.return_token_ids else None,
                           headers)
