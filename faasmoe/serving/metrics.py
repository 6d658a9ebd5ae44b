"""Prometheus metrics of a server: per-tenant traffic and latency, queue, and the function pool.

Request and token counters and the latency histograms are updated by the HTTP layer
as requests end; the function pool's figures are read from the platform's records at
each scrape, so they are never stale and cost nothing between scrapes.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from faasmoe.metering.meter import Meter
from faasmoe.models.control_plane import RoutingCounts
from faasmoe.platforms.base import Platform

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class _FunctionPool:
    """Custom collector: the platform's per-function counters at scrape time."""

    def __init__(self, platform: Platform):
        self.platform = platform

    def collect(self):
        stats = dict(self.platform.log.stats)
        fams = {
            "invocations": CounterMetricFamily("faasmoe_function_invocations", "Function invocations", labels=["function"]),
            "cold_starts": CounterMetricFamily("faasmoe_function_cold_starts", "Calls that waited for an instance "
                                               "to start", labels=["function"]),
            "prefetches": CounterMetricFamily("faasmoe_function_prefetches", "Instances started ahead of their "
                                              "calls, on a predicted routing", labels=["function"]),
            "warm_hits": CounterMetricFamily("faasmoe_function_warm_hits", "Invocations served warm", labels=["function"]),
            "evictions": CounterMetricFamily("faasmoe_function_evictions", "Instances scaled to zero", labels=["function"]),
            "budget_evictions": CounterMetricFamily("faasmoe_function_budget_evictions", "Instances stopped to make "
                                                    "room within the memory budget", labels=["function"]),
            "crashes": CounterMetricFamily("faasmoe_function_crashes", "Instances that died mid-call", labels=["function"]),
            "timeouts": CounterMetricFamily("faasmoe_function_timeouts", "Calls that timed out", labels=["function"]),
            "cold_start_s": CounterMetricFamily("faasmoe_function_cold_start_seconds", "Time spent cold-starting",
                                                labels=["function"]),
            "load_s": CounterMetricFamily("faasmoe_function_load_seconds", "Time instances spent loading weights "
                                          "(cold starts and prefetches)", labels=["function"]),
            "loaded_bytes": CounterMetricFamily("faasmoe_function_loaded_bytes", "Weight bytes those loads mapped, "
                                                "page-cache hits included (/ load seconds: their load rate)", labels=["function"]),
            "busy_s": CounterMetricFamily("faasmoe_function_busy_seconds", "Time instances spent in calls",
                                          labels=["function"]),
        }
        warm = GaugeMetricFamily("faasmoe_function_warm_instances", "Running instances", labels=["function"])
        for fid, s in stats.items():
            for attr, fam in fams.items():
                fam.add_metric([fid], getattr(s, attr))
            warm.add_metric([fid], s.instances)
        yield from fams.values()
        yield warm
        memory = self.platform.memory()
        if "resident_bytes" in memory:
            yield GaugeMetricFamily("faasmoe_expert_resident_bytes", "Expert weight bytes the function pool holds in "
                                    "memory (functions with an instance, and pages being dropped)",
                                    value=memory["resident_bytes"])
        if "budget_bytes" in memory:
            yield GaugeMetricFamily("faasmoe_expert_memory_budget_bytes", "The function pool's memory budget",
                                    value=memory["budget_bytes"])


class _Processes:
    """Custom collector: CPU and memory of every process serving, by role and tenant, from the meter."""

    def __init__(self, meter: Meter):
        self.meter = meter

    def collect(self):
        cpu = CounterMetricFamily("faasmoe_process_cpu_seconds", "CPU-seconds of faasmoe's processes",
                                  labels=["role", "tenant"])
        gbs = CounterMetricFamily("faasmoe_process_gb_seconds", "Memory (PSS) integrated over time, GB-seconds",
                                  labels=["role", "tenant"])
        mem = GaugeMetricFamily("faasmoe_process_memory_bytes", "Memory of faasmoe's processes now",
                                labels=["role", "tenant", "kind"])
        count = GaugeMetricFamily("faasmoe_processes", "Processes alive now", labels=["role", "tenant"])
        for (role, tenant), d in self.meter.by(lambda lb: (lb.role, lb.tenant or "")).items():
            cpu.add_metric([role, tenant], d["cpu_seconds"])
            gbs.add_metric([role, tenant], d["gb_seconds"])
            for kind in ("rss", "pss", "uss"):
                mem.add_metric([role, tenant, kind], d[f"{kind}_bytes"])
            count.add_metric([role, tenant], d["alive"])
        yield from (cpu, gbs, mem, count)


class _Routing:
    """Custom collector: routing pairs per (layer, expert) seen by this process's control plane, so a
    benchmark can say how skewed the routing of its workload really was, and how well prefetch predicted it."""

    def __init__(self, routing: Callable[[], RoutingCounts | None]):
        self.routing = routing

    def collect(self):
        fam = CounterMetricFamily("faasmoe_routed_pairs", "Routing pairs (token, expert) by MoE layer and expert",
                                  labels=["layer", "expert"])
        predicted = CounterMetricFamily("faasmoe_prefetch_predicted_pairs", "Routing pairs prefetch predicted, "
                                        "by the layer predicted", labels=["layer"])
        hits = CounterMetricFamily("faasmoe_prefetch_hit_pairs", "Predicted routing pairs the router then chose "
                                   "(a token gets as many predicted experts as routed ones: hits / predicted is "
                                   "both precision and recall)", labels=["layer"])
        counts = self.routing()
        if counts is not None:
            for layer, row in enumerate(counts.routed.tolist()):
                for expert, n in enumerate(row):
                    if n:
                        fam.add_metric([str(layer), str(expert)], n)
            for layer, (n, hit) in enumerate(zip(counts.predicted.tolist(), counts.predicted_hits.tolist())):
                if n:
                    predicted.add_metric([str(layer)], n)
                    hits.add_metric([str(layer)], hit)
        yield from (fam, predicted, hits)


class Metrics:
    def __init__(self, platform: Platform | None, queue_depth: Callable[[], int], running: Callable[[], int],
                 meter: Meter | None = None, routing: Callable[[], RoutingCounts | None] | None = None):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("faasmoe_requests", "HTTP requests by tenant, endpoint and status",
                                ["tenant", "endpoint", "status"], registry=r)
        self.tokens = Counter("faasmoe_tokens", "Tokens by tenant and kind (prompt, completion)",
                              ["tenant", "kind"], registry=r)
        self.ttft = Histogram("faasmoe_time_to_first_token_seconds", "Time to first token", ["tenant"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("faasmoe_time_per_output_token_seconds", "Time per output token after the first",
                              ["tenant"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("faasmoe_batch_size", "Sequences per scheduler step",
                               buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        Gauge("faasmoe_queue_depth", "Requests waiting for a batch slot", registry=r).set_function(queue_depth)
        Gauge("faasmoe_running_requests", "Requests being generated", registry=r).set_function(running)
        if platform is not None:  # a monolithic server has no functions
            r.register(_FunctionPool(platform))
        if meter is not None:
            r.register(_Processes(meter))
        if routing is not None:
            r.register(_Routing(routing))

    def on_step(self, batch_size: int) -> None:
        self.batch.observe(batch_size)

    def render(self) -> bytes:
        return generate_latest(self.registry)
