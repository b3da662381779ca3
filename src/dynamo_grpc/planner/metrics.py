"""The planner's own Prometheus metrics: every decision's inputs and outcome, per pool."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class PlannerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        p = "dynamo_planner_"
        self.replicas = Gauge(
            p + "replicas", "Replicas the connector reported before the decision", ["pool"], registry=r
        )
        self.target = Gauge(p + "target_replicas", "Replicas the decision set", ["pool"], registry=r)
        self.need = Gauge(
            p + "needed_replicas", "Fractional replicas the profile asks for the predicted load", ["pool"], registry=r
        )
        self.observed = Gauge(
            p + "observed", "Last interval: rate (req/s), isl, osl (tokens), ttft, itl (s)", ["quantity"], registry=r
        )
        self.predicted = Gauge(
            p + "predicted", "Next interval's forecast: rate (req/s), isl, osl (tokens)", ["quantity"], registry=r
        )
        self.correction = Gauge(
            p + "correction", "Observed/expected latency ratio applied (prefill, decode)", ["phase"], registry=r
        )
        self.decisions = Counter(
            p + "decisions",
            "Decisions by pool and direction (up, down, hold; surge: an emergency scale-up between intervals)",
            ["pool", "direction"],
            registry=r,
        )
        self.errors = Counter(p + "errors", "Failed observations or scaling actions", ["stage"], registry=r)
