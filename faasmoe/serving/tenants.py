"""Tenants: who a key belongs to, what each may spend, and what each has used.

Admission is decided here, before a request reaches the scheduler: a tenant over
its concurrency limit or its token rate gets RateLimited with the seconds to wait.
Every method runs on the server's event loop; nothing here is shared with another
tenant's answers.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import asdict, dataclass, field

from faasmoe.serving.config import TenantConfig


class RateLimited(RuntimeError):
    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = max(1, int(retry_after + 0.999))


@dataclass
class Usage:
    requests: int = 0
    completed: int = 0
    errors: int = 0
    rejected: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

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

    def __post_init__(self) -> None:
        self.bucket = float(self.config.tokens_per_minute)

    @property
    def name(self) -> str:
        return self.config.name

    def _refill(self) -> None:
        now = time.monotonic()
        rate = self.config.tokens_per_minute / 60.0
        self.bucket = min(float(self.config.tokens_per_minute), self.bucket + (now - self.refilled_at) * rate)
        self.refilled_at = now


class Tenants:
    def __init__(self, configs: list[TenantConfig]):
        self._tenants = [Tenant(c) for c in configs]

    def __iter__(self):
        return iter(self._tenants)

    def authenticate(self, key: str | None) -> Tenant | None:
        """The tenant holding `key`, compared in constant time against every key."""
        found = None
        for t in self._tenants:
            if key is not None and hmac.compare_digest(t.config.key.encode(), key.encode()):
                found = t
        return found

    def admit(self, tenant: Tenant, prompt_tokens: int) -> None:
        """Reserve a concurrency slot, or raise RateLimited saying when to retry."""
        c = tenant.config
        tenant._refill()
        if tenant.in_flight >= c.max_concurrency:
            tenant.usage.rejected += 1
            raise RateLimited(f"tenant {tenant.name} has {tenant.in_flight} requests in flight "
                              f"(limit {c.max_concurrency})", 1)
        if tenant.bucket < min(prompt_tokens, c.tokens_per_minute):
            tenant.usage.rejected += 1
            deficit = min(prompt_tokens, c.tokens_per_minute) - tenant.bucket
            raise RateLimited(f"tenant {tenant.name} is over its rate of {c.tokens_per_minute} tokens per minute",
                              deficit / (c.tokens_per_minute / 60.0))
        tenant.in_flight += 1
        tenant.usage.requests += 1

    def spend(self, tenant: Tenant, tokens: int) -> None:
        tenant._refill()
        tenant.bucket -= tokens

    def release(self, tenant: Tenant, prompt_tokens: int, completion_tokens: int, ok: bool) -> None:
        tenant.in_flight -= 1
        tenant.usage.prompt_tokens += prompt_tokens
        tenant.usage.completion_tokens += completion_tokens
        if ok:
            tenant.usage.completed += 1
        else:
            tenant.usage.errors += 1

    def refund(self, tenant: Tenant, prompt_tokens: int) -> None:
        """Undo `admit` for a request the backend refused: counted as rejected, its tokens given back."""
        tenant.in_flight -= 1
        tenant.usage.requests -= 1
        tenant.usage.rejected += 1
        tenant.bucket += prompt_tokens
