"""`dynamo-grpc frontend`: the KServe v2 gRPC endpoint of the mesh.

Watches Consul for workers (`dynamo-worker` + model cards), serves `inference.GRPCInferenceService`,
and registers itself as `dynamo-frontend`. Routing: `kv` runs the KV router in this process (one
index per model, fed by the workers' events); `kv-service` asks a `dynamo-router` over gRPC
(`--router`, or from Consul the router registered for the request's model); `round-robin` and `random` run the
same router core here, without an index.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Any

from dynamo_grpc import procstats
from dynamo_grpc.envflags import env_defaults
from dynamo_grpc.events.curve import CurveConfig, add_curve_flags
from dynamo_grpc.frontend.auth import ApiKeyInterceptor
from dynamo_grpc.frontend.disagg import DisaggConfig, DisaggPlanner, add_disagg_flags
from dynamo_grpc.frontend.engine_client import DECODE_TRANSPORTS, WorkerClient
from dynamo_grpc.frontend.kserve.service import InferenceServicer
from dynamo_grpc.frontend.kserve.wire import add_inference_service
from dynamo_grpc.frontend.kv_router import EmbeddedKvRouter
from dynamo_grpc.frontend.limits import Limits, add_limit_flags
from dynamo_grpc.frontend.models import ModelRegistry
from dynamo_grpc.frontend.pipeline import Pipeline
from dynamo_grpc.frontend.replicas import (
    REPLICA_WARMUP_S,
    add_replica_flags,
    check_replica_args,
    run_replicas,
    verify_group,
    wait_for_models,
)
from dynamo_grpc.frontend.routing import KvRouterClient, Router
from dynamo_grpc.frontend.stats import StatsBook
from dynamo_grpc.gc_tuning import tune_for_serving
from dynamo_grpc.launch.children import check_ports
from dynamo_grpc.logs import add_log_flag, setup_logging
from dynamo_grpc.observability import add_tracing_flags, setup_tracing, shutdown_tracing
from dynamo_grpc.observability.tracing import exporters_from_env
from dynamo_grpc.router.flags import add_router_flags, refuse_unused_flags, router_config_from_args
from dynamo_grpc.transport import (
    GrpcServer,
    ServerOptions,
    TlsConfig,
    TlsFileError,
    add_tls_flags,
    run_until_signal,
    use_tls,
)
from dynamo_grpc.transport.addresses import (
    METRICS_META,
    add_address_flags,
    advertise_host,
    check_metrics_port,
    with_host,
)

log = logging.getLogger("dynamo_grpc.frontend")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynamo-grpc frontend", description=__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 in containers)")
    p.add_argument("--grpc-port", type=int, default=8001, help="KServe gRPC port; 0 picks a free one")
    p.add_argument("--http-port", type=int, default=-1, help="OpenAI HTTP port; -1 disables (default)")
    p.add_argument("--consul", default=None, help="Consul address (default: CONSUL_HTTP_ADDR or 127.0.0.1:8500)")
    p.add_argument("--namespace", default="dynamo", help="serve workers tagged namespace=NS (default dynamo)")
    add_router_flags(p, extra_modes=("kv-service",))
    p.add_argument(
        "--router", default=None, help="RouterService address for kv-service (implies it); default: one from Consul"
    )
    p.add_argument("--migration-limit", type=int, default=3, help="re-routes after a worker dies mid-request")
    p.add_argument(
        "--decode-transport",
        choices=("auto", *DECODE_TRANSPORTS),
        default="auto",
        help="stream: each worker's requests share one DecodeStream, responses batched per message; call: a Decode "
        "call per request (carries its trace context); auto (default): stream, or call when tracing is on",
    )
    add_disagg_flags(p)
    p.add_argument("--ready-file", default=None, help="write {grpc_address, http_address} JSON here when serving")
    p.add_argument(
        "--with-simple-model",
        action="store_true",
        help="also serve Triton's `simple` example model (for client example scripts)",
    )
    add_log_flag(p)
    add_tracing_flags(p)
    add_curve_flags(p)
    add_limit_flags(p)  # --- limits and auth: frontend/limits.py ---
    add_tls_flags(p, public=True)  # KServe gRPC, OpenAI HTTP and /metrics; --tls-client-auth for clients
    add_address_flags(p)
    add_replica_flags(p)  # --replicas, --router-replica-sync: frontend/replicas.py
    return env_defaults(p)


class _RouterAddresses:
    """Which router serves a model: the one fixed by --router (every model), or, from Consul, a passing
    `dynamo-router` tagged `model=<name>` (a router without a model tag is used for models no router claims)."""

    def __init__(self, fixed: str | None, namespace: str) -> None:
        self.fixed = fixed
        self.namespace = namespace
        self.by_model: dict[str, list[str]] = {}

    def __call__(self, model: str) -> str | None:
        if self.fixed:
            return self.fixed
        addrs = self.by_model.get(model) or self.by_model.get("")
        return addrs[0] if addrs else None

    def update(self, snapshot: list[Any]) -> None:
        by_model: dict[str, list[str]] = {}
        for i in snapshot:
            if any(t.startswith("namespace=") for t in i.tags) and f"namespace={self.namespace}" not in i.tags:
                continue
            model = next((t.removeprefix("model=") for t in i.tags if t.startswith("model=")), "")
            addr = i.meta.get("grpc_address") or f"{i.address}:{i.port}"
            by_model.setdefault(model, []).append(addr)
        for model, addrs in by_model.items():  # keep a model on its router while that router lives
            old = self.by_model.get(model)
            if old and old[0] in addrs:
                addrs.remove(old[0])
                addrs.insert(0, old[0])
        if by_model != self.by_model:
            log.info("routers: %s", {m or "(any model)": a[0] for m, a in by_model.items()})
        self.by_model = by_model

    async def watch(self, discovery: Any) -> None:
        async for snapshot in discovery.watch("dynamo-router"):
            self.update(snapshot)


async def _start_routers(registry: ModelRegistry, router: EmbeddedKvRouter) -> None:
    """Give each model its KV router as soon as it appears, so the index is built before requests come."""
    while True:
        await registry.changed.wait()
        registry.changed.clear()
        router.sync_models(m.name for m in registry.models())


def _write_ready(path: str, data: dict[str, Any]) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


async def serve(args: argparse.Namespace) -> int:
    from dynamo_grpc.discovery import ConsulSettings, Discovery, Instance
    from dynamo_grpc.discovery.usable import WorkerView

    settings = ConsulSettings.from_env(addr=args.consul or None)
    discovery = Discovery(settings)
    workers = WorkerClient(transport=args.decode_transport)

    async def load_cards(model: str) -> Any:
        return await discovery.get_model_card_entries(model)  # with sessions, for the registry's check

    view = WorkerView()  # one verdict on each worker for the registry and the embedded routers

    async def forget_worker(address: str) -> None:  # a draining worker's streams get 30 s to finish
        await workers.forget(address, grace=30.0)

    registry = ModelRegistry(
        workers.get_file, load_cards, namespace=args.namespace, view=view, forget_address=forget_worker
    )
    router_addr = _RouterAddresses(args.router, args.namespace)
    instance_id = f"frontend-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
    router: Router
    embedded: EmbeddedKvRouter | None = None
    advertised = advertise_host(args.host, args.advertise_host)
    sync_pub = None
    if args.router_mode == "kv-service":
        router = KvRouterClient(router_addr, skipped=lambda: set(view.skipped()))
    else:  # kv, round-robin, random: the router core in this process, with every --router-* flag
        cfg = router_config_from_args(args, namespace=args.namespace)
        if args.router_replica_sync:  # one PUB for every model's embedded router (router/replicas.py)
            import zmq.asyncio

            from dynamo_grpc.events.sockets import bind_pub

            sync_pub = bind_pub(zmq.asyncio.Context.instance(), args.host, 0, curve=args.zmq_curve)
        router = embedded = EmbeddedKvRouter(
            discovery, cfg, instance_id, args.host, curve=args.zmq_curve, view=view, replica_sync=sync_pub
        )
    limits: Limits = getattr(args, "limits", None) or Limits.from_args(args)
    disagg = DisaggPlanner(DisaggConfig.from_args(args), router)
    pipeline = Pipeline(registry, router, workers, migration_limit=args.migration_limit, limits=limits, disagg=disagg)
    stats = StatsBook()
    servicer = InferenceServicer(pipeline, stats, simple=args.with_simple_model)

    tls: TlsConfig | None = args.tls
    reuse = bool(args.replica_group)  # a replica of `--replicas N` shares the ports (frontend/replicas.py)
    server = GrpcServer(
        ServerOptions(
            args.host,
            args.grpc_port,
            max_message_bytes=limits.max_message_bytes,
            extra_args=[("grpc.max_concurrent_streams", limits.max_concurrent_streams)],
            interceptors=[ApiKeyInterceptor(limits)] if limits.api_keys else [],
            tls=tls,
            public=True,
            health_port=args.health_port,
            reuse_port=reuse,
        )
    )
    server.add(add_inference_service, servicer, "inference.GRPCInferenceService")
    tasks = [asyncio.create_task(registry.watch(discovery), name="watch-workers")]
    if args.replica_group:  # the kernel hands a listening replica connections at once: know the models first
        await wait_for_models(registry, REPLICA_WARMUP_S)
    grpc_address = with_host(await server.start(), advertised)
    procstats.register()  # tasks, fds, RSS on /metrics (prometheus_client's registry): what a soak run checks
    procstats.register_view(view)  # dynamo_discovery_skipped_workers{source} on /metrics
    if args.router_mode == "kv-service" and not args.router:
        tasks.append(asyncio.create_task(router_addr.watch(discovery), name="watch-routers"))
    if embedded is not None:
        tasks.append(asyncio.create_task(_start_routers(registry, embedded), name="start-kv-routers"))
    http_address = metrics_address = ""
    runners = []
    if args.http_port >= 0 or args.metrics_port >= 0:
        from dynamo_grpc.frontend.openai.app import start_http

        scheme = "https" if tls is not None else "http"
        if args.http_port >= 0:
            ctx = tls.ssl_context_server(public=True) if tls is not None else None
            runner, http_address = await start_http(
                args.host, args.http_port, pipeline, stats, ssl_context=ctx, reuse_port=reuse
            )
            http_address = with_host(http_address, advertised)
            runners.append(runner)
        if args.metrics_port >= 0:
            ctx = tls.ssl_context_server(public=True) if tls is not None else None
            runner, metrics_address = await start_http(
                args.host, args.metrics_port, pipeline, stats, admin_only=True, ssl_context=ctx
            )
            metrics_address = with_host(metrics_address, advertised)
            runners.append(runner)
            log.info("metrics on %s://%s/metrics", scheme, metrics_address)
    host, port = grpc_address.rsplit(":", 1)
    inst = Instance(
        "dynamo-frontend",
        instance_id,
        host,
        int(port),
        tags=[f"namespace={args.namespace}", "role=frontend"],
        meta={"grpc_address": grpc_address, "http_address": http_address},
    )
    if metrics_address:
        inst.meta[METRICS_META] = metrics_address
    if sync_pub is not None:  # the other frontends' embedded routers follow this PUB
        inst.meta.update(sync_pub.meta())
        inst.meta["zmq_endpoint"] = with_host(sync_pub.endpoint, advertised)
    try:
        await discovery.register(inst, ttl=10.0)
    except Exception as e:  # serving without registration is still useful (and Consul may come back)
        log.warning("could not register in Consul at %s: %s", settings.address, e)
    tune_for_serving()  # started: the start-up heap leaves the collector's view (gc_tuning.py)
    if args.ready_file:
        _write_ready(
            args.ready_file,
            {
                "grpc_address": grpc_address,
                "http_address": http_address,
                "metrics_address": metrics_address,
                "health_port": server.health_port,
                "instance_id": instance_id,
            },
        )
    log.info("frontend serving KServe v2 gRPC on %s (router mode %s)", grpc_address, args.router_mode)

    async def stop() -> None:
        with contextlib.suppress(Exception):
            await discovery.deregister()
        await server.stop(5.0)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for runner in runners:
            await runner.cleanup()
        await router.close()
        await disagg.close()
        await workers.close()
        await discovery.close()

    await run_until_signal(stop)
    return 0


def _decode_transport(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """--decode-transport resolved: auto is stream unless tracing is on (a request's trace reaches its worker
    only through its own Decode call's metadata); stream with tracing on is refused."""
    try:
        traced = bool(args.trace_file or exporters_from_env())
    except ValueError:
        traced = False  # setup_tracing names the bad variable and exits
    if args.decode_transport == "auto":
        return "call" if traced else "stream"
    if args.decode_transport == "stream" and traced:
        parser.error(
            "--decode-transport stream: tracing is on, and a request's trace reaches its worker only on a Decode "
            "call of its own; use --decode-transport call (or auto)"
        )
    return str(args.decode_transport)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    args.decode_transport = _decode_transport(args, parser)  # before tracing starts: a refusal leaves none set up
    setup_tracing("dynamo-frontend", args.trace_file)
    args.tls = use_tls(TlsConfig.from_args(args, parser))  # every listener, and the hops to routers and workers
    if args.tls is not None:
        try:  # e.g. --tls-client-auth optional, which gRPC listeners cannot do: refuse before binding
            args.tls.server_credentials(public=True)
        except TlsFileError as e:
            parser.error(str(e))
    try:
        check_metrics_port(args.metrics_port)
        advertise_host(args.host, args.advertise_host)
    except ValueError as e:
        parser.error(str(e))
    try:
        DisaggConfig.from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.migration_limit < 0:
        raise SystemExit("--migration-limit must be >= 0")
    if args.router and args.router_mode == "kv":
        args.router_mode = "kv-service"  # a pinned router address means: use that RouterService
    try:
        check_replica_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.replicas == 1:  # a supervisor (--replicas N) checks the ports itself, holding the group's lock
        ports = [(args.metrics_port, "--metrics-port"), (args.health_port or -1, "--health-port")]
        if args.replica_group:
            verify_group(args.host, args.grpc_port, args.replica_group)  # SO_REUSEPORT only inside our group
        else:
            ports = [(args.grpc_port, "--grpc-port"), (args.http_port, "--http-port"), *ports]
        check_ports(args.host, ports)  # one line naming the port and its flag, not a bind traceback
    try:
        refuse_unused_flags(parser, args)
        router_config_from_args(args)
        args.zmq_curve = CurveConfig.from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.zmq_curve is not None and args.router_mode != "kv":
        log.warning("--zmq-curve-secret-key unused: --router-mode %s subscribes to no events", args.router_mode)
    if args.zmq_curve is not None and args.zmq_curve.allowed is not None and not args.router_replica_sync:
        log.warning("--zmq-curve-allow unused: a frontend binds no ZMQ socket (its embedded routers only subscribe)")
    try:
        args.limits = Limits.from_args(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"dynamo-grpc frontend: {e}") from None
    if args.replicas > 1:  # every flag checked above; now the supervisor's life (frontend/replicas.py)
        return run_replicas(args, list(sys.argv[1:] if argv is None else argv))
    try:
        return asyncio.run(serve(args))
    finally:
        shutdown_tracing()  # the last spans leave before the process does


if __name__ == "__main__":
    raise SystemExit(main())
