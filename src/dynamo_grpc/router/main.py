"""The router process: discovery -> event subscriber -> index -> RouterService.

Until every known worker's Replay has been applied, health is NOT_SERVING and Route answers
UNAVAILABLE: a new or restarted router never routes from a stale, empty view.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import socket
from typing import Any

from dynamo_grpc.discovery import ConsulSettings, Discovery, Instance
from dynamo_grpc.events.replay_client import GrpcReplayClient
from dynamo_grpc.events.subscriber import KvEventSubscriber
from dynamo_grpc.router.config import MODES, RouterConfig
from dynamo_grpc.router.metrics import RouterMetrics, start_admin_http
from dynamo_grpc.router.replicas import ActiveSync
from dynamo_grpc.router.router import Router, WorkerInfo
from dynamo_grpc.router.service import RouterServicer
from dynamo_grpc.router.sync import IndexSink
from dynamo_grpc.transport import GrpcServer, ServerOptions, run_until_signal
from dynamo_grpc.v1 import router_pb2_grpc

log = logging.getLogger("dynamo_grpc.router")

SERVICE = "dynamo_grpc.v1.RouterService"


def build_parser() -> argparse.ArgumentParser:
    d = RouterConfig()
    p = argparse.ArgumentParser(prog="dynamo-grpc router", description="KV-cache-aware router (RouterService).")
    p.add_argument("--host", default="127.0.0.1", help="address to bind gRPC, ZMQ and HTTP on")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0 = ephemeral)")
    p.add_argument("--consul", default=os.environ.get("CONSUL_HTTP_ADDR", "http://127.0.0.1:8500"))
    p.add_argument("--namespace", default=d.namespace)
    p.add_argument("--model", default=d.model, help="model to route for (default: the workers' model)")
    p.add_argument("--mode", choices=MODES, default=d.mode)
    p.add_argument("--block-size", type=int, default=d.block_size, help="0 = from the model card / workers")
    p.add_argument("--max-indexed-blocks", type=int, default=d.max_indexed_blocks, help="0 = unbounded")
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--prefill-load-scale", type=float, default=d.prefill_load_scale)
    p.add_argument("--busy-threshold", type=float, default=d.busy_threshold, help="KV usage fraction; 1 = off")
    p.add_argument("--approx-ttl", type=float, default=d.approx_ttl_s, help="seconds (approx mode)")
    p.add_argument("--resync-interval", type=float, default=d.resync_interval_s, help="seconds; 0 = off")
    p.add_argument("--metrics-port", type=int, default=0, help="/metrics and /dump-index; 0 = ephemeral, -1 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--log-level", default=os.environ.get("DYNAMO_LOG_LEVEL", "INFO"))
    return p


def _worker_info(inst: Instance) -> WorkerInfo:
    m = inst.meta

    def num(key: str, default: int) -> int:
        try:
            return int(m.get(key, default))
        except ValueError:
            return default

    return WorkerInfo(
        instance_id=inst.instance_id,
        grpc_address=m.get("grpc_address") or f"{inst.address}:{inst.port}",
        model=m.get("model", ""),
        block_size=num("block_size", 0),
        dp_size=num("dp_size", 1),
        kv_blocks=num("kv_blocks", 0),
        zmq_endpoint=m.get("zmq_endpoint", ""),
    )


def _card_block_size(cards: dict[str, dict[str, Any]]) -> int:
    for _, card in sorted(cards.items()):
        try:
            bs = int(card.get("block_size", 0) or 0)
        except (TypeError, ValueError):
            continue
        if bs:
            return bs
    return 0


class RouterProcess:
    """Wires discovery, the event plane, the router core and the gRPC server."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config = RouterConfig(
            mode=args.mode,
            block_size=args.block_size,
            max_indexed_blocks=args.max_indexed_blocks,
            temperature=args.temperature,
            prefill_load_scale=args.prefill_load_scale,
            busy_threshold=args.busy_threshold,
            approx_ttl_s=args.approx_ttl,
            namespace=args.namespace,
            model=args.model,
            resync_interval_s=args.resync_interval,
            seed=args.seed,
        )
        self.config.validate()
        self.router_id = f"router-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.router = Router(self.config, self.router_id)
        self.metrics = RouterMetrics()
        self.router.on_decision = self.metrics.on_decision
        self.discovery = Discovery(ConsulSettings.from_env(addr=args.consul or None))
        self.replay = GrpcReplayClient()
        self.sub: KvEventSubscriber | None = None
        self.active_sync: ActiveSync | None = None
        self.server = GrpcServer(ServerOptions(args.host, args.port))
        self.tasks: list[asyncio.Task[None]] = []
        self.http_runner: Any = None
        self.metrics_port = -1
        self._first_snapshot = asyncio.Event()

    async def start(self) -> None:
        a = self.args
        self.server.add(
            router_pb2_grpc.add_RouterServiceServicer_to_server,  # type: ignore[arg-type]
            RouterServicer(self.router),
            SERVICE,
        )
        grpc_address = await self.server.start(serving=False)
        if a.metrics_port >= 0:
            self.http_runner, self.metrics_port = await start_admin_http(
                a.host, a.metrics_port, self.metrics, self.router, lambda: self.sub
            )
        self.tasks.append(asyncio.create_task(self._watch_workers(), name="watch-workers"))
        self.tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        self.tasks.append(asyncio.create_task(self._readiness(), name="readiness"))
        self._grpc_address = grpc_address

    def _ensure_model(self, model: str) -> None:
        """Set up the per-model event plane once the model is known."""
        if self.sub is not None:
            return
        self.config.model = model
        a = self.args
        self.active_sync = ActiveSync(self.router, model, a.host)
        self.router.on_active_change = self.active_sync.publish
        self.active_sync.start()
        if self.config.mode == "kv":
            self.sub = KvEventSubscriber(
                model,
                IndexSink(self.router),
                self.replay,
                resync_interval_s=self.config.resync_interval_s,
                on_lag=self.metrics.lag.observe,
            )
            self.sub.start()
        self.tasks.append(asyncio.create_task(self._register(), name="register"))
        self.tasks.append(asyncio.create_task(self._watch_routers(), name="watch-routers"))

    async def _register(self) -> None:
        assert self.active_sync is not None
        meta = {"grpc_address": self._grpc_address, "zmq_endpoint": self.active_sync.endpoint, "mode": self.config.mode}
        if self.metrics_port >= 0:
            meta["metrics_address"] = f"{self.args.host}:{self.metrics_port}"
        host, port = self._grpc_address.rsplit(":", 1)
        inst = Instance(
            "dynamo-router",
            self.router_id,
            host,
            int(port),
            tags=[f"namespace={self.config.namespace}", f"model={self.config.model}", "role=router"],
            meta=meta,
        )
        await self.discovery.register(inst, ttl=10.0)
        log.info(
            "registered %s (grpc %s, active-sync %s)", self.router_id, self._grpc_address, self.active_sync.endpoint
        )

    async def _watch_workers(self) -> None:
        tags = [f"namespace={self.config.namespace}"]
        async for snapshot in self.discovery.watch("dynamo-worker", tags=tags):
            infos = [_worker_info(i) for i in snapshot]
            model = self.config.model
            if not model and infos:
                model = sorted(infos, key=lambda w: w.instance_id)[0].model
                log.info("routing for model %s", model)
            if model:
                infos = [w for w in infos if w.model in ("", model)]
                self._ensure_model(model)
                card_bs = 0
                try:
                    cards = await self.discovery.get_model_cards(model)
                    card_bs = _card_block_size(cards.get(model, {}))
                except Exception as exc:  # cards are a cross-check; Meta still has block_size
                    log.debug("model cards unavailable: %s", exc)
                accepted = self.router.set_workers(infos, card_bs)
                if self.sub is not None:
                    self.sub.sync_workers(
                        [(w.instance_id, w.zmq_endpoint, w.grpc_address, w.dp_size) for w in accepted if w.zmq_endpoint]
                    )
            self._first_snapshot.set()

    async def _watch_routers(self) -> None:
        tags = [f"namespace={self.config.namespace}"]
        async for snapshot in self.discovery.watch("dynamo-router", tags=tags):
            eps = {
                i.meta.get("zmq_endpoint", "")
                for i in snapshot
                if i.instance_id != self.router_id and f"model={self.config.model}" in i.tags
            }
            if self.active_sync is not None:
                self.active_sync.set_peers({e for e in eps if e})

    async def _readiness(self) -> None:
        """NOT_SERVING until the first worker snapshot is in and every worker's Replay is applied."""
        await self._first_snapshot.wait()
        while True:
            synced = self.sub is None or self.sub.is_synced()
            if synced != self.router.ready:
                self.router.ready = synced
                await self.server.set_serving(synced)
                log.info("router %s", "ready: index rebuilt, SERVING" if synced else "resyncing: NOT_SERVING")
            await asyncio.sleep(0.05)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.router.housekeeping()
            self.metrics.refresh(self.router, self.sub)

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(Exception):
            await self.discovery.deregister()
        await self.server.stop(2.0)
        if self.sub is not None:
            await self.sub.close()
        if self.active_sync is not None:
            await self.active_sync.close()
        await self.replay.close()
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        await self.discovery.close()


async def _run(args: argparse.Namespace) -> int:
    proc = RouterProcess(args)
    await proc.start()
    print(f"router {proc.router_id} grpc={proc._grpc_address} metrics_port={proc.metrics_port}", flush=True)
    await run_until_signal(proc.stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(_run(args))
    except ValueError as exc:
        log.error("%s", exc)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
