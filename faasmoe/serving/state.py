"""What the routes of one server share: its settings, tenants, request lifecycle, billing and backend."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from faasmoe.metering.billing import SharedCostLedger
from faasmoe.metering.meter import Meter
from faasmoe.serving.backend import Backend
from faasmoe.serving.config import ServerConfig
from faasmoe.serving.lifecycle import Lifecycle
from faasmoe.serving.metrics import Metrics
from faasmoe.serving.tenants import Tenant, Tenants


@dataclass(eq=False)
class ServerState:
    config: ServerConfig
    tenants: Tenants
    lifecycle: Lifecycle = field(init=False)
    ledger: SharedCostLedger = field(init=False)
    backend: Backend | None = None  # set once the model is loaded (the app's lifespan)
    meter: Meter | None = None
    metrics: Metrics | None = None

    def __post_init__(self) -> None:
        self.lifecycle = Lifecycle(self.tenants, lambda: self.metrics)
        self.ledger = SharedCostLedger([t.name for t in self.tenants])

    def close_billing_interval(self) -> None:
        self.ledger.update(self.meter, {t.name: t.usage.total_tokens for t in self.tenants})

    def bill(self, tenant: Tenant) -> dict[str, float]:
        """The tenant's bill up to now (shared costs split interval by interval). The processes are read first:
        tokens served since the last sample would otherwise close an interval whose cost is not yet seen, and
        that cost would go to whoever is served next."""
        self.meter.sample()
        self.close_billing_interval()
        return self.ledger.bill(self.meter, tenant.name)

    def refused(self, tenant: Tenant, path: str, status: int) -> None:
        """A request the gate refused before its route ran, in the metrics."""
        endpoint = "chat" if path.endswith("chat/completions") else path.rsplit("/", 1)[-1]
        self.metrics.requests.labels(tenant.name, endpoint, str(status)).inc()


def server_state(request: Request) -> ServerState:
    """FastAPI dependency: the state of the server the request came to."""
    return request.app.state.server
