"""The router's Prometheus metrics, one set (`dynamo_router_*`) for `dynamo-grpc router` and the frontend's
embedded router, labelled by model; plus the router process's admin endpoint (/metrics, /dump-index)."""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dynamo_grpc.router.router import Router, RouteResult
from dynamo_grpc.transport.http import metrics_app, serve_app

if TYPE_CHECKING:
    from dynamo_grpc.router.node import RouterNode

OVERLAP_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
LAG_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5)


class RouterMetrics:
    """A Prometheus collector over the RouterNodes that `track` it (one per model).

    State (index size, workers, active sequences, event-plane totals) is read when scraped, so it is
    never stale; the two distributions (overlap per decision, event lag) are observed as they happen.
    """

    def __init__(self) -> None:
        self.overlap = Histogram(
            "dynamo_router_overlap_blocks",
            "Prompt blocks already cached on the chosen worker",
            ["model"],
            buckets=OVERLAP_BUCKETS,
            registry=None,
        )
        self.lag = Histogram(
            "dynamo_router_event_lag_seconds",
            "Publish-to-apply delay of KV event batches",
            ["model"],
            buckets=LAG_BUCKETS,
            registry=None,
        )
        self._nodes: dict[str, RouterNode] = {}

    def track(self, node: RouterNode) -> None:
        """Report this node from now on (until `untrack`), and observe its decisions and event lag."""
        self._nodes[node.router_id] = node
        node.router.on_decision = lambda res: self.on_decision(node.config.model, res)

    def untrack(self, node: RouterNode) -> None:
        self._nodes.pop(node.router_id, None)

    def on_decision(self, model: str, res: RouteResult) -> None:
        self.overlap.labels(model).observe(res.overlap_blocks)

    def on_lag(self, node: RouterNode) -> Callable[[float], None]:
        return lambda seconds: self.lag.labels(node.config.model).observe(seconds)

    def registry(self) -> CollectorRegistry:
        """A registry holding only these metrics (the router process serves it)."""
        r = CollectorRegistry()
        r.register(self)  # type: ignore[arg-type]
        return r

    def collect(self) -> Iterator[Metric]:
        def counter(name: str, doc: str, *extra: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"dynamo_router_{name}", doc, labels=["model", *extra])

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"dynamo_router_{name}", doc, labels=["model"])

        decisions = counter("decisions", "Routing decisions", "mode")
        ready = gauge("ready", "1 once the index is rebuilt from the workers' Replay")
        indexed = gauge("indexed_blocks", "Block hashes in the index")
        workers = gauge("workers", "Workers routed to")
        refused = gauge("refused_workers", "Workers refused (block size mismatch)")
        active = gauge("active_sequences", "Requests routed and not yet freed")
        pruned = counter("pruned_blocks", "Blocks pruned by the memory bound")
        events = counter("events_applied", "KV events applied")
        gaps = counter("event_gaps", "Event seq gaps detected (each answered by a Replay)")
        replays = counter("replays", "Replay calls made")
        full_dumps = counter("full_dumps", "Replays answered with a full dump")
        remote = gauge("remote_sequences", "Active sequences routed by other replicas (replica sync)")
        replicas = gauge("replicas", "Other replicas heard from within 3 snapshot intervals (replica sync)")
        expired = counter("replica_expired_sequences", "Sequences expired because their replica went silent")
        queued = gauge("queue_depth", "Requests waiting in the router queue for a worker under its busy threshold")
        queue_refused = counter("queue_refused", "Requests refused because the router queue was full")
        queue_dispatched = counter("queue_dispatched", "Requests placed after waiting in the router queue")
        queue_overtaken = counter(
            "queue_overtaken", "cache-aware queue: placements that went ahead of an older waiter (more KV cached)"
        )
        queue_aged = counter(
            "queue_aged", "cache-aware queue: placements the age cap forced ahead of better-cached ones"
        )
        for node in sorted(self._nodes.values(), key=lambda n: n.config.model):
            r, m = node.router, [node.config.model]
            for mode, n in sorted(r.counters.decisions.items()):
                decisions.add_metric([*m, mode], n)
            ready.add_metric(m, 1.0 if r.ready else 0.0)
            indexed.add_metric(m, r.indexed_blocks())
            workers.add_metric(m, len(r.workers))
            refused.add_metric(m, len(r.refused))
            active.add_metric(m, len(r.active))
            pruned.add_metric(m, r.indexer.stats.pruned_blocks)
            if r.queue is not None:
                queued.add_metric(m, len(r.queue))
                queue_refused.add_metric(m, r.queue.refused)
                queue_dispatched.add_metric(m, r.queue.dispatched)
                queue_overtaken.add_metric(m, r.queue.overtaken)
                queue_aged.add_metric(m, r.queue.aged)
            if node.sub is not None:
                events.add_metric(m, node.sub.stats.events_applied)
                gaps.add_metric(m, node.sub.stats.gaps)
                replays.add_metric(m, node.sub.stats.replays)
                full_dumps.add_metric(m, node.sub.stats.full_dumps)
            sync = node.active_sync
            if sync is not None:
                remote.add_metric(m, len(r.active) - len(r.active.of_router(r.router_id)))
                replicas.add_metric(m, len(sync.last_seen))
                expired.add_metric(m, sync.expired_sequences)
        yield from (decisions, ready, indexed, workers, refused, active, pruned, events, gaps, replays, full_dumps)
        yield from (remote, replicas, expired)
        yield from (queued, queue_refused, queue_dispatched, queue_overtaken, queue_aged)
        yield from self.overlap.collect()
        yield from self.lag.collect()


def dump_index(router: Router) -> dict[str, object]:
    """JSON view of the index: worker -> sorted block hashes (admin/test use)."""
    idx = router.indexer
    workers = {f"{k[0]}/{k[1]}": sorted(v) for k, v in idx.dump().items() if isinstance(k, tuple)}
    return {
        "ready": router.ready,
        "block_size": router.block_size,
        "indexed_blocks": len(idx),
        "workers": workers,
        "refused": router.refused,
    }


async def start_admin_http(
    host: str, port: int, metrics: RouterMetrics, router: Router, ssl_context: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, int]:
    """Serve /metrics and /dump-index (HTTPS with ``ssl_context``); port 0 picks a free one. Returns (runner, port)."""
    app = metrics_app(metrics.registry())

    async def dump_handler(_: web.Request) -> web.Response:
        return web.Response(text=json.dumps(dump_index(router)), content_type="application/json")

    app.router.add_get("/dump-index", dump_handler)
    return await serve_app(app, host, port, ssl_context)
