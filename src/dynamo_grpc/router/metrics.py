"""Router metrics (Prometheus) and the admin HTTP endpoint (/metrics, /dump-index)."""

from __future__ import annotations

import json
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from dynamo_grpc.events.subscriber import KvEventSubscriber
from dynamo_grpc.router.router import Router, RouteResult


class RouterMetrics:
    """Decisions by mode, overlap histogram, indexed blocks, event lag, gaps and replays."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decisions = Counter("dynamo_router_decisions", "Routing decisions", ["mode"], registry=r)
        self.overlap = Histogram(
            "dynamo_router_overlap_blocks",
            "Prompt blocks already cached on the chosen worker",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
            registry=r,
        )
        self.indexed = Gauge("dynamo_router_indexed_blocks", "Block hashes in the index", registry=r)
        self.workers = Gauge("dynamo_router_workers", "Workers routed to", registry=r)
        self.refused = Gauge("dynamo_router_refused_workers", "Workers refused (block size mismatch)", registry=r)
        self.active = Gauge("dynamo_router_active_sequences", "Sequences tracked as active", registry=r)
        self.lag = Histogram(
            "dynamo_router_event_lag_seconds",
            "Publish-to-apply delay of KV event batches",
            buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5),
            registry=r,
        )
        self.gaps = Gauge("dynamo_router_event_gaps", "Seq gaps detected (total)", registry=r)
        self.replays = Gauge("dynamo_router_replays", "Replay calls made (total)", registry=r)
        self.full_dumps = Gauge("dynamo_router_full_dumps", "Replays answered with a full dump (total)", registry=r)
        self.events = Gauge("dynamo_router_events_applied", "KV events applied (total)", registry=r)
        self.pruned = Gauge("dynamo_router_pruned_blocks", "Blocks pruned by the memory bound (total)", registry=r)

    def on_decision(self, res: RouteResult) -> None:
        self.decisions.labels(res.mode).inc()
        self.overlap.observe(res.overlap_blocks)

    def refresh(self, router: Router, sub: KvEventSubscriber | None) -> None:
        self.indexed.set(router.indexed_blocks())
        self.workers.set(len(router.workers))
        self.refused.set(len(router.refused))
        self.active.set(len(router.active))
        self.pruned.set(router.indexer.stats.pruned_blocks)
        if sub is not None:
            self.gaps.set(sub.stats.gaps)
            self.replays.set(sub.stats.replays)
            self.full_dumps.set(sub.stats.full_dumps)
            self.events.set(sub.stats.events_applied)


def dump_index(router: Router) -> dict[str, object]:
    """JSON view of the index: worker -> sorted block hashes (admin/test use)."""
    idx = router.approx.index if router.config.mode == "approx" else router.indexer
    workers = {f"{k[0]}/{k[1]}": sorted(v) for k, v in idx.dump().items() if isinstance(k, tuple)}
    return {
        "ready": router.ready,
        "block_size": router.block_size,
        "indexed_blocks": len(idx),
        "workers": workers,
        "refused": router.refused,
    }


async def start_admin_http(
    host: str,
    port: int,
    metrics: RouterMetrics,
    router: Router,
    subscriber: Callable[[], KvEventSubscriber | None],
) -> tuple[web.AppRunner, int]:
    """Serve /metrics and /dump-index; port 0 picks a free one. Returns (runner, port)."""

    async def metrics_handler(_: web.Request) -> web.Response:
        metrics.refresh(router, subscriber())
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def dump_handler(_: web.Request) -> web.Response:
        return web.Response(text=json.dumps(dump_index(router)), content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/dump-index", dump_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    bound = server.sockets[0].getsockname()[1] if server is not None and server.sockets else port  # type: ignore[union-attr,attr-defined]
    return runner, int(bound)
