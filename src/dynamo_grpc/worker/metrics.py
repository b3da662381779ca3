"""The worker's Prometheus metrics, in a registry of its own (several workers can share a test process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dynamo_grpc.events.kv import LoadMetrics

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class WorkerMetrics:
    def __init__(self, model: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.model = model
        self.requests = Counter(
            "dynamo_worker_requests", "Decode/Prefill requests by outcome", ["model", "rpc", "outcome"], registry=r
        )
        self.ttft = Histogram(
            "dynamo_worker_time_to_first_token_seconds",
            "Request arrival to first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "dynamo_worker_inter_token_latency_seconds",
            "Time between consecutive tokens",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("dynamo_worker_prompt_tokens", "Prompt tokens", ["model"], registry=r)
        self.cached_tokens = Counter(
            "dynamo_worker_cached_prompt_tokens", "Prompt tokens served from the prefix cache", ["model"], registry=r
        )
        self.generated_tokens = Counter("dynamo_worker_generated_tokens", "Generated tokens", ["model"], registry=r)
        self.inflight = Gauge("dynamo_worker_inflight_requests", "Streams being served", ["model"], registry=r)
        self.waiting = Gauge("dynamo_worker_queue_depth", "Requests waiting in the engine", ["model"], registry=r)
        self.running = Gauge("dynamo_worker_running_requests", "Requests running in the engine", ["model"], registry=r)
        self.kv_active = Gauge("dynamo_worker_kv_active_blocks", "KV blocks in use", ["model"], registry=r)
        self.kv_total = Gauge("dynamo_worker_kv_total_blocks", "KV blocks in the cache", ["model"], registry=r)
        self.kv_usage = Gauge("dynamo_worker_kv_usage_ratio", "Fraction of KV blocks in use", ["model"], registry=r)
        self.hit_rate = Gauge(
            "dynamo_worker_prefix_cache_hit_rate",
            "Prompt tokens found in the prefix cache / looked up",
            ["model"],
            registry=r,
        )
        self.draining = Gauge("dynamo_worker_draining", "1 while draining", ["model"], registry=r)
        self.kv_pulled_bytes = Counter(
            "dynamo_worker_kv_pulled_bytes", "KV bytes pulled from prefill workers", ["model"], registry=r
        )
        self.kv_pull_seconds = Histogram(
            "dynamo_worker_kv_pull_seconds", "Time to pull one request's KV", ["model"], buckets=_LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.kv_pull_fallbacks = Counter(
            "dynamo_worker_kv_pull_fallbacks",
            "Disaggregated decodes that prefilled locally because the KV pull failed",
            ["model"],
            registry=r,
        )

    def watch_leases(self, counts: Callable[[], dict[str, int]]) -> None:
        """Export the engine's KV leases (``CoreEngine.lease_counts``) on every scrape."""
        self.registry.register(_LeaseCollector(self.model, counts))

    def observe_load(self, load: LoadMetrics, hit_rate: float | None) -> None:
        m = self.model
        self.waiting.labels(m).set(load.waiting)
        self.running.labels(m).set(load.running)
        self.kv_active.labels(m).set(load.active_blocks)
        self.kv_total.labels(m).set(load.total_blocks)
        self.kv_usage.labels(m).set(load.active_blocks / load.total_blocks if load.total_blocks else 0.0)
        if hit_rate is not None:
            self.hit_rate.labels(m).set(hit_rate)


class _LeaseCollector:
    def __init__(self, model: str, counts: Callable[[], dict[str, int]]) -> None:
        self.model = model
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        c = self.counts()
        active = GaugeMetricFamily("dynamo_worker_kv_leases", "KV leases held now (prefill blocks awaiting a pull)",
                                   labels=["model"])  # fmt: skip
        active.add_metric([self.model], c["active"])
        pinned = GaugeMetricFamily("dynamo_worker_kv_leased_blocks", "KV blocks pinned by leases", labels=["model"])
        pinned.add_metric([self.model], c["pinned_blocks"])
        ended = CounterMetricFamily(
            "dynamo_worker_kv_leases_ended", "KV leases by how they ended", labels=["model", "outcome"]
        )
        for outcome in ("pulled", "released", "expired"):
            ended.add_metric([self.model, outcome], c[outcome])
        created = CounterMetricFamily("dynamo_worker_kv_leases_created", "KV leases created", labels=["model"])
        created.add_metric([self.model], c["created"])
        refused = CounterMetricFamily(
            "dynamo_worker_kv_pulls_refused", "Pulls refused (twice, unknown, expired)", labels=["model"]
        )
        refused.add_metric([self.model], c["refused"])
        yield from (active, pinned, ended, created, refused)
