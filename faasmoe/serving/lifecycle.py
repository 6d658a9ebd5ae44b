"""A request's life on the server side: admitted, counted as its tokens are made, settled once.

The accounting follows the backend's events, not the client: a token is counted in the
tenant's usage and in the metrics the moment the backend reports it, and a request is
settled (its slot freed, its unused token reservation given back, its outcome recorded)
when the backend's final event arrives, whether the client is still reading or not.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from faasmoe.serving.messages import Event, TextEvent
from faasmoe.serving.metrics import Metrics
from faasmoe.serving.scheduler import Request as GenRequest
from faasmoe.serving.tenants import RateLimited, SlotTimeout, Tenant, Tenants

# how a request ended -> HTTP status, when the HTTP side has not already decided (499 gone, 504 too slow)
FINISH_STATUS = {"stop": 200, "length": 200, "cancelled": 503, "error": 502}


@dataclass(eq=False)
class Ticket:
    """One admitted request's accounting."""

    tenant: Tenant
    endpoint: str
    prompt_tokens: int
    max_tokens: int
    started: float = field(default_factory=time.perf_counter)
    request: GenRequest | None = None
    status: int = 200  # set to 499 / 504 by the HTTP side before it cancels
    completion_tokens: int = 0
    first_token_at: float | None = None
    ended_at: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    cold_prefill: bool | None = None  # a function cold-started while its first token was made (None: unknown)
    settled: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # what the HTTP side relays

    @property
    def ok(self) -> bool:
        return self.settled and self.status == 200


class Lifecycle:
    """Admission, per-event accounting and settlement of every request, and the running requests by id."""

    def __init__(self, tenants: Tenants, metrics: Callable[[], Metrics]):
        self.tenants, self._metrics = tenants, metrics
        self.running: dict[str, Ticket] = {}  # request id -> ticket, until settled

    async def admit(self, tenant: Tenant, endpoint: str, prompt_tokens: int, max_tokens: int,
                    timeout: float) -> Ticket:
        """Reserve the tenant's slot and tokens (RateLimited / SlotTimeout if not)."""
        try:
            await self.tenants.admit(tenant, prompt_tokens, max_tokens, timeout)
        except (RateLimited, SlotTimeout) as e:
            status = "429" if isinstance(e, RateLimited) else "504"
            self._metrics().requests.labels(tenant.name, endpoint, status).inc()
            raise
        return Ticket(tenant, endpoint, prompt_tokens, max_tokens)

    def emitter(self, ticket: Ticket) -> Callable[[Event], None]:
        """The `emit` callback for the backend: thread-safe, accounting first, then the relay queue."""
        loop = asyncio.get_running_loop()

        def deliver(event: Event) -> None:
            self.on_event(ticket, event)
            ticket.events.put_nowait(event)

        return lambda event: loop.call_soon_threadsafe(deliver, event)

    def started(self, ticket: Ticket, request: GenRequest) -> None:
        """The backend accepted the request: it runs until its final event."""
        ticket.request = request
        self.running[request.id] = ticket
        self._metrics().tokens.labels(ticket.tenant.name, "prompt").inc(ticket.prompt_tokens)

    def on_event(self, ticket: Ticket, event: Event) -> None:
        now = time.perf_counter()
        if isinstance(event, TextEvent):
            if event.tokens:
                ticket.first_token_at = ticket.first_token_at or now
                self._count(ticket, event.tokens)
            return
        reported = event.usage.completion_tokens
        if reported > ticket.completion_tokens:  # tokens reported only at the end (a backend that batches them)
            ticket.first_token_at = ticket.first_token_at or now
            self._count(ticket, reported - ticket.completion_tokens)
        ticket.ended_at, ticket.finish_reason = now, event.finish_reason
        ticket.cold_prefill = event.cold_prefill
        if event.finish_reason not in ("stop", "length"):
            ticket.error = event.error or event.finish_reason
        if ticket.status == 200:
            ticket.status = FINISH_STATUS.get(event.finish_reason, 502)
        self.settle(ticket)

    def _count(self, ticket: Ticket, tokens: int) -> None:
        ticket.completion_tokens += tokens
        self.tenants.on_tokens(ticket.tenant, tokens)
        self._metrics().tokens.labels(ticket.tenant.name, "completion").inc(tokens)

    def refuse(self, ticket: Ticket, status: int) -> None:
        """The backend refused the request before running it: undo the admission."""
        ticket.settled, ticket.status = True, status
        self.tenants.refuse(ticket.tenant, ticket.prompt_tokens, ticket.max_tokens, status)
        self._metrics().requests.labels(ticket.tenant.name, ticket.endpoint, str(status)).inc()

    def settle(self, ticket: Ticket) -> None:
        """Record the request once: free its slot, give back unused tokens, observe its latencies."""
        if ticket.settled:
            return
        ticket.settled = True
        if ticket.request is not None:
            self.running.pop(ticket.request.id, None)
        ok = ticket.status == 200
        name = ticket.tenant.name
        self.tenants.release(ticket.tenant, ticket.max_tokens, ticket.completion_tokens, ok)
        m = self._metrics()
        m.requests.labels(name, ticket.endpoint, str(ticket.status)).inc()
        if ok and ticket.first_token_at is not None:
            m.ttft.labels(name).observe(ticket.first_token_at - ticket.started)
            if ticket.completion_tokens > 1 and ticket.ended_at:
                m.tpot.labels(name).observe((ticket.ended_at - ticket.first_token_at) / (ticket.completion_tokens - 1))
