"""Relaying a running request's events to its client: one JSON body, or server-sent events.

While it waits for the next event, a response checks whether its client went away (499) or the request
ran out of time (504); either cancels the request in the backend, whose final event still settles it
with every token it made counted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import suppress

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from faasmoe.serving import schemas as S
from faasmoe.serving.errors import error_response
from faasmoe.serving.lifecycle import Ticket
from faasmoe.serving.messages import Event, TextEvent
from faasmoe.serving.state import ServerState

EVENT_POLL_S = 0.5  # how often a waiting response checks for a gone client or a deadline


async def next_event(server: ServerState, request: Request, ticket: Ticket) -> Event | None:
    """The next event; None if the client went away or the request ran out of time (then it is cancelled)."""
    timeout_s = server.config.request_timeout_s
    while True:
        try:
            return await asyncio.wait_for(ticket.events.get(), timeout=EVENT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                ticket.status = 499
            elif time.perf_counter() - ticket.started > timeout_s:
                ticket.status, ticket.error = 504, f"request exceeded {timeout_s:g} s"
            else:
                continue
            server.backend.cancel(ticket.request)
            return None


async def collect(server: ServerState, request: Request, ticket: Ticket) -> tuple[str, list[int]] | None:
    """The whole text and token ids, or None if the request failed."""
    text, ids = [], []
    while (ev := await next_event(server, request, ticket)) is not None:
        if isinstance(ev, TextEvent):
            text.append(ev.text)
            ids += ev.ids
        else:
            return ("".join(text), ids) if ticket.status == 200 else None
    return None


def whole(server: ServerState, endpoint: str, ticket: Ticket, created: int, text: str, ids: list[int] | None,
          headers: dict[str, str]) -> JSONResponse:
    """A finished request's one JSON body (token ids only where they were asked for)."""
    config, rid, usage = server.config, ticket.request.id, _usage(ticket)
    if endpoint == "chat":
        out = S.ChatResponse(id=rid, created=created, model=config.served_model_name, usage=usage,
                             choices=[S.ChatChoice(message=S.AssistantMessage(content=text),
                                                   finish_reason=ticket.finish_reason, token_ids=ids)])
    else:
        out = S.CompletionResponse(id=rid, created=created, model=config.served_model_name, usage=usage,
                                   choices=[S.CompletionChoice(text=text, finish_reason=ticket.finish_reason,
                                                               token_ids=ids)])
    return JSONResponse(out.model_dump(exclude={"choices": {0: {"token_ids"}}} if ids is None else None),
                        headers=headers)


async def stream(server: ServerState, request: Request, endpoint: str, ticket: Ticket, created: int,
                 include_usage: bool, with_ids: bool) -> AsyncIterator[str]:
    """The request's events as server-sent events, ending with `data: [DONE]` (after an error event if it
    failed or ran out of time)."""
    chat = endpoint == "chat"
    head = {"id": ticket.request.id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": server.config.served_model_name}

    def chunk(text: str | None, finish: str | None, role: bool = False, ids: list[int] | None = None) -> str:
        extra = {"token_ids": ids} if ids else {}
        if chat:
            delta = (S.ChatDelta(role="assistant", content="") if role
                     else S.ChatDelta(content=text) if text else S.ChatDelta())
            choice = S.ChatChunkChoice(index=0, delta=delta, logprobs=None, finish_reason=finish, **extra)
        else:
            choice = S.CompletionChunkChoice(index=0, text=text or "", logprobs=None, finish_reason=finish, **extra)
        return S.StreamChunk(**head, choices=[choice]).sse()

    def error(detail: S.ErrorDetail) -> str:
        return f"data: {json.dumps({'error': detail.model_dump()})}\n\n"

    ended = False
    try:
        if chat:
            yield chunk(None, None, role=True)
        while (ev := await next_event(server, request, ticket)) is not None:
            if isinstance(ev, TextEvent):
                ids = ev.ids if with_ids else None
                if ev.text or ids:
                    yield chunk(ev.text, None, ids=ids)
                continue
            ended = True
            if ticket.status == 200:
                yield chunk(None, ticket.finish_reason)
                if include_usage:
                    yield S.StreamChunk(**head, choices=[], usage=_usage(ticket), faasmoe=S.FaasmoeUsageExtension(
                        cold_start_in_prefill=ticket.cold_prefill)).sse()
            else:
                yield error(S.ErrorDetail(message=ticket.error or "generation failed", type="server_error",
                                          code="generation_failed"))
            yield "data: [DONE]\n\n"
            return
        if ticket.status == 504:  # still connected, out of time: say so, then end the stream properly
            yield error(S.ErrorDetail(message=ticket.error or "timeout", type="server_error", code="timeout"))
            yield "data: [DONE]\n\n"
    finally:
        if not ended and not ticket.settled:  # the client went away mid-stream: free its slot
            if ticket.status == 200:
                ticket.status = 499
            with suppress(Exception):
                server.backend.cancel(ticket.request)


def _usage(ticket: Ticket) -> S.Usage:
    return S.Usage(prompt_tokens=ticket.prompt_tokens, completion_tokens=ticket.completion_tokens,
                   total_tokens=ticket.prompt_tokens + ticket.completion_tokens)


def failure(ticket: Ticket, headers: dict[str, str]) -> Response:
    """A request that failed while it ran, as its status (499: nobody is listening, no body)."""
    if ticket.status == 499:
        return Response(status_code=499, headers=headers)
    code = {502: "function_failed", 503: "unavailable", 504: "timeout"}.get(ticket.status)
    return error_response(ticket.status, ticket.error or "generation failed", "server_error", code, headers=headers)
