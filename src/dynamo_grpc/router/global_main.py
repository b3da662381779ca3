"""`dynamo-grpc global-router --config pools.yaml`: RouterService over worker pools (docs/global-router.md).

One RouterNode per pool (discovery filtered by the workers' ``pool=`` tag, KV events of that pool's workers
only), a GlobalRouter picking the pool, and the same RouterService contract as `dynamo-grpc router`, so a
frontend reaches it with ``--router-mode kv-service --router ADDR`` or finds it in Consul (it registers as
``dynamo-router`` with ``role=global-router``). The config reloads on SIGHUP and when the file changes:
new pools start, removed pools drain (their in-flight requests finish), an invalid file is logged and the
running config kept.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import socket
from pathlib import Path
from typing import Any

from dynamo_grpc.discovery import ConsulSettings, Discovery, Instance
from dynamo_grpc.envflags import env_defaults
from dynamo_grpc.events.curve import CurveConfig
from dynamo_grpc.logs import setup_logging
from dynamo_grpc.observability import setup_tracing, shutdown_tracing
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.flags import refuse_unused_flags, router_config_from_args
from dynamo_grpc.router.global_router import GlobalRouter
from dynamo_grpc.router.global_service import GlobalRouterServicer
from dynamo_grpc.router.main import add_router_process_flags
from dynamo_grpc.router.node import RouterNode
from dynamo_grpc.router.pool_config import PoolConfigError, PoolGrid, PoolSpec, load_pool_config
from dynamo_grpc.router.pool_metrics import PoolMetrics
from dynamo_grpc.router.router import Router
from dynamo_grpc.transport import GrpcServer, ServerOptions, TlsConfig, run_until_signal, use_tls
from dynamo_grpc.transport.addresses import (
    METRICS_META,
    advertise_host,
    check_metrics_port,
    with_host,
)
from dynamo_grpc.transport.http import metrics_app, serve_app
from dynamo_grpc.v1 import router_pb2_grpc

log = logging.getLogger("dynamo_grpc.global_router")

SERVICE = "dynamo_grpc.v1.RouterService"
#: seconds the start-up waits for each pool's first worker snapshot before warning that a pool is empty
EMPTY_POOL_GRACE_S = 5.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynamo-grpc global-router",
        description="RouterService over worker pools: a pool grid by input/context length, one KV router per pool.",
    )
    p.add_argument("--config", type=Path, default=None, help="pools YAML (docs/global-router.md); required")
    p.add_argument(
        "--reload-interval",
        type=float,
        default=1.0,
        help="seconds between checks of the config file for changes (SIGHUP always reloads); 0: SIGHUP only",
    )
    add_router_process_flags(p, zmq=False)
    return env_defaults(p)


class GlobalRouterProcess:
    def __init__(self, args: argparse.Namespace, grid: PoolGrid) -> None:
        self.args = args
        self.base = router_config_from_args(args, namespace=args.namespace, model=args.model)
        self.router_id = f"global-router-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.discovery = Discovery(ConsulSettings.from_env(addr=args.consul or None))
        self.advertised_host = advertise_host(args.host, args.advertise_host)
        self.curve = CurveConfig.from_args(args)
        self.nodes: dict[str, RouterNode] = {}
        self.started = False  # pools added by a reload start their node at once
        self.config_path: Path = args.config
        self._mtime = self._stat()
        self.router = GlobalRouter(grid, self._make_router)
        tls: TlsConfig | None = getattr(args, "tls", None)
        self.server = GrpcServer(ServerOptions(args.host, args.port, tls=tls, health_port=args.health_port))
        self.tasks: list[asyncio.Task[None]] = []
        self.http_runner: Any = None
        self.metrics_port = -1
        self.grpc_address = ""
        self._registered = False

    def _make_router(self, spec: PoolSpec) -> Router:
        cfg = dataclasses.replace(self.base, busy_threshold=spec.busy_threshold)
        node = RouterNode(
            cfg,
            self.discovery,
            f"{self.router_id}/{spec.name}",
            self.args.host,
            share_active=False,  # replicas of a global router do not share active load (docs/global-router.md)
            curve=self.curve,
            pool=spec.name,
        )
        node.on_model = lambda model: self._on_model(model)
        self.nodes[spec.name] = node
        if self.started:
            node.start()
        return node.router

    def model(self) -> str:
        return self.base.model or next((n.config.model for n in self.nodes.values() if n.config.model), "")

    def _on_model(self, model: str) -> None:
        if not self._registered and self.grpc_address:
            self._registered = True
            self.tasks.append(asyncio.create_task(self._register(model), name="register"))

    def _stat(self) -> float:
        try:
            return self.config_path.stat().st_mtime
        except OSError:
            return 0.0

    async def start(self) -> None:
        a = self.args
        self.server.add(
            router_pb2_grpc.add_RouterServiceServicer_to_server,  # type: ignore[arg-type]
            GlobalRouterServicer(self.router, self.model),
            SERVICE,
        )
        self.grpc_address = with_host(await self.server.start(serving=False), self.advertised_host)
        if a.metrics_port >= 0:
            tls: TlsConfig | None = getattr(a, "tls", None)
            ctx = tls.ssl_context_server(public=True) if tls is not None else None
            self.http_runner, self.metrics_port = await serve_app(
                metrics_app(PoolMetrics(self.router).registry()), a.host, a.metrics_port, ctx
            )
        self.tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        for node in self.nodes.values():
            node.start()
        self.started = True
        self.tasks.append(asyncio.create_task(self._startup(), name="startup"))
        if a.reload_interval > 0:
            self.tasks.append(asyncio.create_task(self._watch_file(), name="watch-config"))
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)

    async def _startup(self) -> None:
        """Serve once every pool's index is rebuilt; warn (never fail) about pools with no worker."""
        await asyncio.gather(*(n.wait_ready(EMPTY_POOL_GRACE_S) for n in self.nodes.values()))
        await self.server.set_serving(True)
        for line in self.router.grid.describe():
            log.info("%s", line)
        self._warn_empty(list(self.nodes))
        model = self.model()
        if model:
            self._on_model(model)

    def _warn_empty(self, names: list[str]) -> None:
        for name in names:
            node = self.nodes.get(name)
            if node is not None and not node.router.workers:
                log.warning(
                    "pool %s has no worker yet (start workers with --pool %s); it is skipped meanwhile", name, name
                )

    async def _register(self, model: str) -> None:
        meta = {"grpc_address": self.grpc_address, "mode": self.base.mode, "pools": ",".join(self.router.serving())}
        if self.metrics_port >= 0:
            meta[METRICS_META] = with_host(f"{self.args.host}:{self.metrics_port}", self.advertised_host)
        host, port = self.grpc_address.rsplit(":", 1)
        inst = Instance(
            "dynamo-router",
            self.router_id,
            host,
            int(port),
            tags=[f"namespace={self.base.namespace}", f"model={model}", "role=global-router"],
            meta=meta,
        )
        await self.discovery.register(inst, ttl=10.0)
        log.info("registered %s (grpc %s, pools %s)", self.router_id, self.grpc_address, meta["pools"])

    def reload(self) -> None:
        """Re-read the config: new pools start, removed pools drain; an invalid file keeps the running config."""
        self._mtime = self._stat()
        try:
            grid = load_pool_config(self.config_path)
        except PoolConfigError as exc:
            log.error("config reload refused, keeping the running pools: %s", exc)
            return
        added, draining = self.router.apply(grid)
        log.info("config reloaded: pools %s; added %s; draining %s", self.router.serving(), added, draining)
        if added:
            asyncio.get_running_loop().call_later(EMPTY_POOL_GRACE_S, self._warn_empty, added)

    async def _watch_file(self) -> None:
        while True:
            await asyncio.sleep(self.args.reload_interval)
            if self._stat() != self._mtime:
                self.reload()

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.router.housekeeping()
            for name in self.router.drained():
                node = self.nodes.pop(name, None)
                if node is not None:
                    log.info("pool %s drained and closed", name)
                    await node.close()

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(Exception):
            await self.discovery.deregister()
        await self.server.stop(2.0)
        for node in self.nodes.values():
            await node.close()
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        await self.discovery.close()


async def _run(args: argparse.Namespace, grid: PoolGrid) -> int:
    proc = GlobalRouterProcess(args, grid)
    await proc.start()
    print(
        f"global-router {proc.router_id} grpc={proc.grpc_address} metrics_port={proc.metrics_port} "
        f"pools={','.join(grid.pools)}",
        flush=True,
    )
    await run_until_signal(proc.stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    setup_tracing("dynamo-global-router", args.trace_file)
    args.tls = use_tls(TlsConfig.from_args(args, parser))
    try:
        if args.config is None:
            raise ValueError("--config (or DYN_CONFIG) is required: the pools YAML")
        refuse_unused_flags(parser, args)
        if args.router_busy_threshold != RouterConfig().busy_threshold:  # given: it has no meaning here
            raise ValueError("--router-busy-threshold: set busy_threshold in the pools config (per pool or for all)")
        if args.reload_interval < 0:
            raise ValueError("--reload-interval must be >= 0")
        router_config_from_args(args)
        check_metrics_port(args.metrics_port)
        advertise_host(args.host, args.advertise_host)
        grid = load_pool_config(args.config)
    except ValueError as e:  # PoolConfigError included: the file and every problem in it
        parser.error(str(e))
    try:
        return asyncio.run(_run(args, grid))
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    raise SystemExit(main())
