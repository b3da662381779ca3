"""The router process: a RouterNode (discovery -> event subscriber -> index) behind RouterService.

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
from dynamo_grpc.envflags import env_defaults
from dynamo_grpc.events.curve import CurveConfig, add_curve_flags
from dynamo_grpc.logs import add_log_flag, setup_logging
from dynamo_grpc.observability import add_tracing_flags, setup_tracing, shutdown_tracing
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.flags import add_router_flags, refuse_unused_flags, router_config_from_args
from dynamo_grpc.router.metrics import RouterMetrics, start_admin_http
from dynamo_grpc.router.node import RouterNode
from dynamo_grpc.router.service import RouterServicer
from dynamo_grpc.transport import GrpcServer, ServerOptions, TlsConfig, add_tls_flags, run_until_signal, use_tls
from dynamo_grpc.transport.addresses import (
    METRICS_META,
    add_address_flags,
    advertise_host,
    check_metrics_port,
    with_host,
)
from dynamo_grpc.v1 import router_pb2_grpc

log = logging.getLogger("dynamo_grpc.router")

SERVICE = "dynamo_grpc.v1.RouterService"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynamo-grpc router", description="KV-cache-aware router (RouterService).")
    add_router_process_flags(p, zmq=True)  # --metrics-port also serves /dump-index; --zmq-port: the active-sequence PUB
    return env_defaults(p)


def add_router_process_flags(p: argparse.ArgumentParser, zmq: bool) -> None:
    """The flags of a process serving RouterService: the router's and the global router's."""
    d = RouterConfig()
    p.add_argument("--host", default="127.0.0.1", help=f"address to bind gRPC{', ZMQ' if zmq else ''} and HTTP on")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0 = ephemeral)")
    p.add_argument("--consul", default=os.environ.get("CONSUL_HTTP_ADDR", "http://127.0.0.1:8500"))
    p.add_argument("--namespace", default=d.namespace)
    p.add_argument("--model", default=d.model, help="model to route for (default: the workers' model)")
    add_router_flags(p)
    add_log_flag(p)
    add_tracing_flags(p)
    add_curve_flags(p)
    add_tls_flags(p, public=False)
    add_address_flags(p, zmq=zmq)


class RouterProcess:
    """A RouterNode behind RouterService, registered in Consul as `dynamo-router`."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.config = router_config_from_args(args, namespace=args.namespace, model=args.model)
        self.router_id = f"router-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        self.metrics = RouterMetrics()
        self.discovery = Discovery(ConsulSettings.from_env(addr=args.consul or None))
        self.advertised_host = advertise_host(args.host, args.advertise_host)
        self.node = RouterNode(
            self.config,
            self.discovery,
            self.router_id,
            args.host,
            self.metrics,
            curve=CurveConfig.from_args(args),
            sync_port=args.zmq_port,
        )
        self.router = self.node.router
        tls: TlsConfig | None = getattr(args, "tls", None)
        self.server = GrpcServer(ServerOptions(args.host, args.port, tls=tls, health_port=args.health_port))
        self.tasks: list[asyncio.Task[None]] = []
        self.http_runner: Any = None
        self.metrics_port = -1

    async def start(self) -> None:
        a = self.args
        self.server.add(
            router_pb2_grpc.add_RouterServiceServicer_to_server,  # type: ignore[arg-type]
            RouterServicer(self.router),
            SERVICE,
        )
        grpc_address = await self.server.start(serving=False)
        if a.metrics_port >= 0:
            tls: TlsConfig | None = getattr(a, "tls", None)
            ctx = tls.ssl_context_server(public=True) if tls is not None else None  # scrapers bring the CA
            self.http_runner, self.metrics_port = await start_admin_http(
                a.host, a.metrics_port, self.metrics, self.router, ssl_context=ctx
            )
        self._grpc_address = with_host(grpc_address, self.advertised_host)
        self.node.on_ready_change = self.server.set_serving
        self.node.on_model = lambda model: self.tasks.append(asyncio.create_task(self._register(), name="register"))
        self.node.start()

    async def _register(self) -> None:
        sync = self.node.active_sync
        assert sync is not None
        meta = {"grpc_address": self._grpc_address, **sync.meta, "mode": self.config.mode}
        if "zmq_endpoint" in meta:
            meta["zmq_endpoint"] = with_host(meta["zmq_endpoint"], self.advertised_host)
        if self.metrics_port >= 0:
            meta[METRICS_META] = f"{with_host(f'{self.args.host}:{self.metrics_port}', self.advertised_host)}"
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
        log.info("registered %s (grpc %s, active-sync %s)", self.router_id, self._grpc_address, sync.endpoint)

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        with contextlib.suppress(Exception):
            await self.discovery.deregister()
        await self.server.stop(2.0)
        await self.node.close()
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
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    setup_tracing("dynamo-router", args.trace_file)
    args.tls = use_tls(TlsConfig.from_args(args, parser))  # RouterService and the Replay calls to workers
    try:
        refuse_unused_flags(parser, args)
        router_config_from_args(args)
        check_metrics_port(args.metrics_port)
        advertise_host(args.host, args.advertise_host)
    except ValueError as e:
        parser.error(str(e))
    try:
        return asyncio.run(_run(args))
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    finally:
        shutdown_tracing()  # the last spans leave before the process does


if __name__ == "__main__":
    raise SystemExit(main())
