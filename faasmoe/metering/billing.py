"""Tenants' bills: their own processes, plus their part of the shared ones, split interval by interval.

The shared processes (control plane, zygote, function instances) serve every tenant at
once. Their cost is split per metering interval: each interval's CPU-seconds and
GB-seconds go to the tenants in proportion to the tokens each had processed in it, and
an interval in which nobody was served (warm but idle) is split equally. A bill is an
amount: it shows no ratio and no total from which another tenant's traffic could be read,
and it does not move with another tenant's traffic over a period the tenant was idle in.
"""

from __future__ import annotations

from faasmoe.metering.meter import Meter

COSTS = ("cpu_seconds", "gb_seconds")


def split_interval(cost: dict[str, float], tokens: dict[str, int],
                   keys: tuple[str, ...] = COSTS) -> dict[str, dict[str, float]]:
    """One interval's shared `cost`, split by each tenant's `tokens` in it (equally when none had any)."""
    total = sum(tokens.values())
    n = len(tokens)
    return {t: {k: cost[k] * (tokens[t] / total if total else 1 / n) for k in keys} for t in tokens}


class SharedCostLedger:
    def __init__(self, tenants: list[str]):
        self.charged = {t: dict.fromkeys(COSTS, 0.0) for t in tenants}
        self._cost_seen = dict.fromkeys(COSTS, 0.0)
        self._tokens_seen = dict.fromkeys(tenants, 0)

    def update(self, meter: Meter, tokens: dict[str, int]) -> None:
        """Charge the shared cost accrued since the last update, by the tokens processed since then."""
        shared = shared_cost(meter)
        delta_cost = {k: max(0.0, shared[k] - self._cost_seen[k]) for k in COSTS}
        delta_tokens = {t: max(0, tokens.get(t, 0) - self._tokens_seen[t]) for t in self.charged}
        for t, part in split_interval(delta_cost, delta_tokens).items():
            for k in COSTS:
                self.charged[t][k] += part[k]
        self._cost_seen = {k: max(shared[k], self._cost_seen[k]) for k in COSTS}
        self._tokens_seen = {t: tokens.get(t, self._tokens_seen[t]) for t in self.charged}

    def bill(self, meter: Meter, tenant: str) -> dict[str, float]:
        """The tenant's CPU-seconds and GB-seconds: its own processes plus its charged part of the shared ones."""
        own = meter.by(lambda lb: lb.tenant or "").get(tenant, {})
        mine = {k: float(own.get(k, 0.0)) for k in COSTS}
        part = self.charged[tenant]
        return {**{k: mine[k] + part[k] for k in COSTS},
                "own_cpu_seconds": mine["cpu_seconds"], "own_gb_seconds": mine["gb_seconds"],
                "shared_cpu_seconds": part["cpu_seconds"], "shared_gb_seconds": part["gb_seconds"]}


def shared_cost(meter: Meter) -> dict[str, float]:
    """CPU-seconds and GB-seconds of the processes that belong to no tenant."""
    shared = meter.by(lambda lb: lb.tenant or "").get("", {})
    return {k: float(shared.get(k, 0.0)) for k in COSTS}
