"""Tenants: who a key belongs to, what each may spend, and what each has used.

Admission is decided here, before a request reaches the scheduler. A tenant may run
`max_concurrency` requests at once; up to `max_queued` more wait here, in order, for one
of its own slots (never another tenant's); beyond that, or over its token rate, it gets
RateLimited with the seconds to wait. The token rate covers prompt and completion: a
request reserves `prompt + max_tokens` when admitted and gets back what it did not
generate when it ends. Every method runs on the server's event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from faasmoe.serving.config import TenantConfig


class RateLimited(RuntimeError):
    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = max(1, int(retry_after + 0.999))


class SlotTimeout(RuntimeError):
    """A request waited for one of its tenant's slots past its deadline."""


@dataclass
class Usage:
    requests: int = 0  # admitted (handed to the model)
    completed: int = 0
    errors: int = 0  # admitted, then failed, timed out, cancelled or abandoned by the client
    rejected: int = 0  # refused with 429: over a limit, or no room to wait
    invalid: int = 0  # refused with 4xx after authentication: malformed, too long, unknown model
    prompt_tokens: int = 0
    completion_tokens: int = 0  # counted as generated, however the request ends

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> dict:
        return {**asdict(self), "total_tokens": self.total_tokens}


@dataclass(eq=False)
class Tenant:
    config: TenantConfig
    in_flight: int = 0
    bucket: float = 0.0  # tokens that may still be spent; refills at tokens_per_minute / 60 per second
    refilled_at: float = field(default_factory=time.monotonic)
    usage: Usage = field(default_factory=Usage)
    waiters: deque[asyncio.Future] = field(default_factory=deque)  # requests waiting for one of its slots

    def __post_init__(self) -> None:
        self.bucket = float(self.config.tokens_per_minute)

    @property
    def name(self) -> str:
        return self.config.name

    def refill(self) -> None:
        now = time.monotonic()
        rate = self.config.tokens_per_minute / 60.0
        self.bucket = min(float(self.config.tokens_per_minute), self.bucket + (now - self.refilled_at) * rate)
        self.refilled_at = now

    def seconds_until(self, tokens: float) -> float:
        return max(0.0, tokens - self.bucket) / (self.config.tokens_per_minute / 60.0)


class Tenants:
    def __init__(self, configs: list[TenantConfig]):
        self._tenants = [Tenant(c) for c in configs]

    def __iter__(self):
        return iter(self._tenants)

    def authenticate(self, key: str | bytes | None) -> Tenant | None:
        """The tenant holding `key`, compared in constant time against every key."""
        found = None
        raw = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else key
        for t in self._tenants:
            if raw is not None and hmac.compare_digest(t.config.key.encode(), raw):
                found = t
        return found

    def precheck(self, tenant: Tenant) -> None:
        """Refuse, before its body is read, a request that could not be admitted whatever it holds."""
        c = tenant.config
        tenant.refill()
        if tenant.in_flight + len(tenant.waiters) >= c.max_concurrency + c.max_queued:
            raise self._no_room(tenant)
        if tenant.bucket <= 0:
            tenant.usage.rejected += 1
            raise RateLimited(f"tenant {tenant.name} is over its rate of {c.tokens_per_minute} tokens per minute",
                              tenant.seconds_until(1))

    async def admit(self, tenant: Tenant, prompt_tokens: int, max_tokens: int, timeout: float) -> None:
        """Reserve the request's tokens and one of the tenant's slots, waiting in line for a slot if the
        tenant's queue allowance permits; RateLimited if not, SlotTimeout past `timeout`."""
        c = tenant.config
        tenant.refill()
        need = prompt_tokens + max_tokens
        if need > c.tokens_per_minute:
            tenant.usage.rejected += 1
            raise RateLimited(f"this request reserves {prompt_tokens} prompt + {max_tokens} max_tokens tokens, more "
                              f"than tenant {tenant.name}'s rate of {c.tokens_per_minute} tokens per minute allows "
                              "at once; ask for fewer max_tokens", 60)
        if tenant.bucket < need:
            tenant.usage.rejected += 1
            raise RateLimited(f"tenant {tenant.name} is over its rate of {c.tokens_per_minute} tokens per minute "
                              f"(this request reserves {prompt_tokens} prompt + {max_tokens} max_tokens)",
                              tenant.seconds_until(need))
        if tenant.in_flight < c.max_concurrency and not tenant.waiters:
            tenant.in_flight += 1
        elif len(tenant.waiters) >= c.max_queued:
            raise self._no_room(tenant)
        else:
            await self._wait_for_slot(tenant, timeout)
        tenant.bucket -= prompt_tokens + max_tokens
        tenant.usage.requests += 1
        tenant.usage.prompt_tokens += prompt_tokens

    @staticmethod
    def _no_room(tenant: Tenant) -> RateLimited:
        """Count and describe a refusal for lack of both a slot and a queue place."""
        c = tenant.config
        tenant.usage.rejected += 1
        return RateLimited(f"tenant {tenant.name} has {tenant.in_flight} requests in flight and "
                           f"{len(tenant.waiters)} waiting (limits {c.max_concurrency} and {c.max_queued})", 1)

    async def _wait_for_slot(self, tenant: Tenant, timeout: float) -> None:
        slot = asyncio.get_running_loop().create_future()
        tenant.waiters.append(slot)
        try:
            await asyncio.wait_for(asyncio.shield(slot), timeout)
        except (asyncio.TimeoutError, asyncio.CancelledError) as e:
            if slot.done() and not slot.cancelled():  # handed a slot just as it gave up: pass it on
                self._free_slot(tenant)
            else:
                slot.cancel()
                tenant.waiters.remove(slot)
            if isinstance(e, asyncio.TimeoutError):
                tenant.usage.errors += 1
                raise SlotTimeout(f"waited {timeout:g} s for one of tenant {tenant.name}'s "
                                  f"{tenant.config.max_concurrency} slots") from None
            raise

    def _free_slot(self, tenant: Tenant) -> None:
        """Hand the slot to the tenant's next waiting request, or give it back."""
        while tenant.waiters:
            slot = tenant.waiters.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        tenant.in_flight -= 1

    def on_tokens(self, tenant: Tenant, completion_tokens: int) -> None:
        """Tokens generated for the tenant, counted the moment they are made."""
        tenant.usage.completion_tokens += completion_tokens

    def release(self, tenant: Tenant, max_tokens: int, completion_tokens: int, ok: bool) -> None:
        """An admitted request ended: free its slot, give back the tokens it reserved and did not use."""
        self._free_slot(tenant)
        tenant.refill()
        tenant.bucket = min(float(tenant.config.tokens_per_minute),
                            tenant.bucket + max(0, max_tokens - completion_tokens))
        if ok:
            tenant.usage.completed += 1
        else:
            tenant.usage.errors += 1

    def refuse(self, tenant: Tenant, prompt_tokens: int, max_tokens: int, status: int) -> None:
        """Undo `admit` for a request the backend refused (400: invalid, 429: no room): nothing was served."""
        self._free_slot(tenant)
        tenant.bucket += prompt_tokens + max_tokens
        tenant.usage.requests -= 1
        tenant.usage.prompt_tokens -= prompt_tokens
        self.invalid(tenant) if status == 400 else self.rejected(tenant)

    @staticmethod
    def invalid(tenant: Tenant) -> None:
        tenant.usage.invalid += 1

    @staticmethod
    def rejected(tenant: Tenant) -> None:
        tenant.usage.rejected += 1
