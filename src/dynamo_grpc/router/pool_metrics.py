"""The global router's Prometheus metrics (`dynamo_global_router_*`), labelled by pool, read when scraped."""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dynamo_grpc.router.global_router import GlobalRouter


class PoolMetrics:
    """Per pool: decisions, spill-overs out and in, refusals, holds; workers, active requests, KV load, draining."""

    def __init__(self, router: GlobalRouter) -> None:
        self.router = router

    def registry(self) -> CollectorRegistry:
        r = CollectorRegistry()
        r.register(self)  # type: ignore[arg-type]
        return r

    def collect(self) -> Iterator[Metric]:
        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"dynamo_global_router_{name}", doc, labels=["pool"])

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"dynamo_global_router_{name}", doc, labels=["pool"])

        decisions = counter("decisions", "Requests routed to a worker of the pool")
        spilled_out = counter("spill_overs_out", "Requests that preferred the pool and spilled over to another")
        spilled_in = counter("spill_overs_in", "Requests another pool spilled over to this one")
        refusals = counter("refusals", "Times the pool could not take a request (busy, empty, not ready)")
        held = counter("held", "Requests that preferred the pool and waited in the global router (hold_spill_s)")
        hold_timeouts = counter("hold_timeouts", "Held requests queued in the pool when hold_spill_s ran out")
        holding = gauge("held_now", "Requests that prefer the pool waiting in the global router now")
        workers = gauge("workers", "Workers in the pool")
        active = gauge("active_requests", "Requests routed to the pool and not yet freed")
        load = gauge("kv_load", "Mean estimated KV use of the pool's workers (0-1)")
        busy = gauge("busy_threshold", "KV use above which a worker of the pool is busy")
        draining = gauge("draining", "1 while a pool removed from the config finishes its requests")
        for name, ps in sorted(self.router.pools.items()):
            c, lbl = ps.counters, [name]
            decisions.add_metric(lbl, c.decisions)
            spilled_out.add_metric(lbl, c.spilled_out)
            spilled_in.add_metric(lbl, c.spilled_in)
            refusals.add_metric(lbl, c.refusals)
            held.add_metric(lbl, c.held)
            hold_timeouts.add_metric(lbl, c.hold_timeouts)
            holding.add_metric(lbl, sum(1 for h in self.router.held.values() if h.pool == name))
            workers.add_metric(lbl, len(ps.router.workers))
            active.add_metric(lbl, len(ps.router.active))
            use = ps.load()
            load.add_metric(lbl, 0.0 if math.isnan(use) else use)
            busy.add_metric(lbl, ps.spec.busy_threshold)
            draining.add_metric(lbl, 1.0 if ps.draining else 0.0)
        yield from (
            decisions,
            spilled_out,
            spilled_in,
            refusals,
            held,
            hold_timeouts,
            holding,
            workers,
            active,
            load,
            busy,
            draining,
        )
