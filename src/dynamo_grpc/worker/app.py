"""The worker's lifecycle: build the engine, serve, register, publish load, drain on SIGTERM.

Start-up order makes every advertised thing reachable before it is advertised: engine, event
publisher, gRPC server, then Consul registration with the model card, then the ready file.
Drain reverses it: NOT_SERVING, deregister (no new work is routed here) and refuse new streams, let
in-flight ones finish within the grace period (then hand the rest back with UNAVAILABLE), stop the
server, close the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynamo_grpc import procstats
from dynamo_grpc.discovery import ConsulSettings, Discovery, Instance
from dynamo_grpc.discovery.pools import DEFAULT_POOL, pool_tag
from dynamo_grpc.discovery.worker_roles import ROLES
from dynamo_grpc.engines.base import Engine
from dynamo_grpc.engines.core.driver import CoreEngine
from dynamo_grpc.events import KvEventPublisher
from dynamo_grpc.events.curve import CurveConfig
from dynamo_grpc.events.kv import KvEvent, LoadMetrics
from dynamo_grpc.events.service import KvEventsServicer
from dynamo_grpc.kvbm.metrics import register_kvbm_metrics
from dynamo_grpc.models.card import TOKENIZER_FILE, ModelCard
from dynamo_grpc.transport import GrpcServer, ServerOptions, TlsConfig
from dynamo_grpc.transport.addresses import METRICS_META, advertise_host, with_host
from dynamo_grpc.transport.http import metrics_app, serve_app
from dynamo_grpc.v1 import events_pb2_grpc, kv_transfer_pb2_grpc, worker_pb2_grpc
from dynamo_grpc.worker.drain import DrainGate
from dynamo_grpc.worker.kv_transfer import KvTransferServicer, geometry_for
from dynamo_grpc.worker.metrics import WorkerMetrics
from dynamo_grpc.worker.service import DecodeServicer, ModelFilesServicer, PrefillServicer, WorkerContext

log = logging.getLogger(__name__)

SERVICE_NAME = "dynamo-worker"
#: how often leases past their expiry are freed
LEASE_SWEEP_S = 0.5
LOAD_PERIOD_S = 0.1
LOAD_POLL_S = 0.02


def _add(server: GrpcServer, add_fn: Callable[[Any, Any], None], servicer: object, name: str) -> None:
    server.add(add_fn, servicer, name)


def new_instance_id() -> str:
    return f"worker-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


@dataclass
class WorkerSettings:
    host: str = "127.0.0.1"
    port: int = 0
    namespace: str = "dynamo"
    consul: str | None = None  # None: CONSUL_HTTP_ADDR; "" with register=False: no Consul at all
    register: bool = True
    ttl_s: float = 10.0
    drain_grace_s: float = 10.0
    metrics_port: int | None = None  # None or -1: no /metrics listener; 0: any free port
    ready_file: Path | None = None
    engine_name: str = "mocker"
    curve: CurveConfig | None = None  # ZeroMQ CURVE on the event publisher (None: plain)
    instance_id: str = field(default_factory=new_instance_id)
    tls: TlsConfig | None = None  # every gRPC service of the worker (KvEvents Replay included)
    health_port: int | None = None  # plaintext grpc.health.v1-only listener (probes)
    advertise_host: str | None = None  # what Consul gets (default: host; with 0.0.0.0 the first non-loopback IP)
    zmq_port: int = 0  # fixed KV event PUB port (0: any free port)
    pool: str = DEFAULT_POOL  # worker pool (Consul tag pool=NAME; discovery/pools.py)
    role: str = "both"  # prefill | decode | both (Consul tag role=<role>)
    kv_transfer_gbps: float = 0.0  # mocker: modelled KV transfer speed, GB/s (0: instant)
    kv_transfer_path: str = "socket"  # KV bytes over a one-shot data socket (socket) or the Pull stream (grpc)
    stream_interval: int = 1  # tokens per Decode message (worker/stream_interval.py)


class WorkerApp:
    """One worker process's moving parts; ``await start()``, then ``await drain()`` to leave."""

    def __init__(self, engine: Engine, card: ModelCard, tokenizer_json: bytes, settings: WorkerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.card = dataclasses.replace(card, block_size=engine.block_size, kv_blocks=engine.num_blocks)
        self.instance_id = settings.instance_id
        self.metrics = WorkerMetrics(self.card.name)
        self.gate = DrainGate()
        self.ctx = WorkerContext(
            engine=engine,
            card=self.card,
            files={TOKENIZER_FILE: tokenizer_json},
            gate=self.gate,
            metrics=self.metrics,
            instance_id=self.instance_id,
            role=settings.role,
            geometry=geometry_for(engine, self.card),
            kv_transfer_path=settings.kv_transfer_path,
            stream_interval=settings.stream_interval,
        )
        if settings.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {settings.role!r}")
        self._lease_task: asyncio.Task[None] | None = None
        self.publisher: KvEventPublisher | None = None
        self.server: GrpcServer | None = None
        self.discovery: Discovery | None = None
        self.metrics_address: str | None = None
        self._metrics_server: Any = None
        self._load_task: asyncio.Task[None] | None = None
        self._drained = asyncio.Event()
        self.advertised_host = advertise_host(settings.host, settings.advertise_host)

    @property
    def grpc_address(self) -> str:
        """The advertised gRPC address (the bound port on --advertise-host)."""
        assert self.server is not None
        return with_host(self.server.address, self.advertised_host)

    @property
    def zmq_endpoint(self) -> str:
        assert self.publisher is not None
        return with_host(self.publisher.endpoint, self.advertised_host)

    # ------------------------------------------------------------------ start

    async def start(self) -> None:
        s = self.settings
        self.publisher = KvEventPublisher(
            self.instance_id, self.card.name, self.engine.block_size, bind_host=s.host, curve=s.curve, port=s.zmq_port
        )
        publisher = self.publisher

        def sink(events: list[KvEvent]) -> None:
            publisher.publish_kv(events)

        self.engine.set_event_sink(sink)
        await self.engine.start()

        options = ServerOptions(host=s.host, port=s.port, grace_s=1.0, tls=s.tls, health_port=s.health_port)
        self.server = GrpcServer(options)
        _add(
            self.server,
            worker_pb2_grpc.add_DecodeServiceServicer_to_server,
            DecodeServicer(self.ctx),
            "dynamo_grpc.v1.DecodeService",
        )
        _add(
            self.server,
            worker_pb2_grpc.add_PrefillServiceServicer_to_server,
            PrefillServicer(self.ctx),
            "dynamo_grpc.v1.PrefillService",
        )
        _add(
            self.server,
            worker_pb2_grpc.add_ModelFilesServiceServicer_to_server,
            ModelFilesServicer(self.ctx),
            "dynamo_grpc.v1.ModelFilesService",
        )
        _add(
            self.server,
            events_pb2_grpc.add_KvEventsServiceServicer_to_server,
            KvEventsServicer(self.publisher, self.engine.cached_blocks),
            "dynamo_grpc.v1.KvEventsService",
        )
        if isinstance(self.engine, CoreEngine) and self.ctx.geometry is not None:
            _add(
                self.server,
                kv_transfer_pb2_grpc.add_KvTransferServiceServicer_to_server,
                KvTransferServicer(
                    self.engine, self.ctx.geometry, s.kv_transfer_gbps, s.kv_transfer_path, host=s.host, tls=s.tls
                ),
                "dynamo_grpc.v1.KvTransferService",
            )
            self.metrics.watch_leases(self.engine.lease_counts)
            self._lease_task = asyncio.create_task(self._lease_loop(self.engine), name="worker-leases")
        await self.server.start()
        self.ctx.grpc_address = self.grpc_address

        if s.metrics_port is not None and s.metrics_port >= 0:
            await self._start_metrics(s.host, s.metrics_port)
        self._load_task = asyncio.create_task(self._load_loop(), name="worker-load")

        if s.register:
            settings = ConsulSettings.from_env(addr=s.consul or None)
            self.discovery = Discovery(settings)
            await self.discovery.register(self._instance(), ttl=s.ttl_s)
            await self.discovery.put_model_card(self.card.name, self.instance_id, self.model_card_dict())
        if s.ready_file is not None:
            self._write_ready(s.ready_file)
        log.info(
            "worker %s serving %s on %s (events %s)",
            self.instance_id,
            self.card.name,
            self.grpc_address,
            self.zmq_endpoint,
        )

    def _instance(self) -> Instance:
        s = self.settings
        assert self.publisher is not None
        meta = {
            "grpc_address": self.grpc_address,
            **self.publisher.meta(),  # zmq_endpoint (+ zmq_public_key with CURVE)
            "zmq_endpoint": self.zmq_endpoint,  # on the advertised host
            "model": self.card.name,
            "block_size": str(self.engine.block_size),
            "kv_blocks": str(self.engine.num_blocks),
            "engine": s.engine_name,
            "dp_size": "1",
            "role": s.role,
        }
        if self.metrics_address:
            meta[METRICS_META] = self.metrics_address
        assert self.server is not None and self.server.port is not None
        inst = Instance(
            service=SERVICE_NAME,
            instance_id=self.instance_id,
            address=self.advertised_host,
            port=self.server.port,
            tags=[f"namespace={s.namespace}", f"model={self.card.name}", f"role={s.role}"],
            meta=meta,
        )
        inst.tags.append(pool_tag(s.pool))  # the global router's per-pool routers follow this tag
        return inst

    def model_card_dict(self) -> dict[str, Any]:
        d = self.card.to_dict()
        d["files"] = dict(self.ctx.file_sha256)
        d["grpc_address"] = self.grpc_address
        return d

    def _write_ready(self, path: Path) -> None:
        info = {
            "grpc_address": self.grpc_address,
            "instance_id": self.instance_id,
            "zmq_endpoint": self.zmq_endpoint,
            "model": self.card.name,
            "metrics_address": self.metrics_address,
            "health_port": self.server.health_port if self.server is not None else None,
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(path)

    async def _start_metrics(self, host: str, port: int) -> None:
        """/metrics over HTTP, or HTTPS with the worker's TLS settings (scrapers bring the CA)."""
        tls = self.settings.tls
        ctx = tls.ssl_context_server(public=True) if tls is not None else None
        procstats.register(self.metrics.registry)  # tasks, fds, RSS: what a soak run checks
        register_kvbm_metrics(self.metrics.registry, self.card.name, self.engine)
        self._metrics_server, bound = await serve_app(metrics_app(self.metrics.registry), host, port, ctx)
        self.metrics_address = with_host(f"{host}:{bound}", self.advertised_host)

    # ------------------------------------------------------------------ load

    async def _load_loop(self) -> None:
        """LoadMetrics on ``load.<model>`` when they change (polled every 20 ms) and at least every 100 ms."""
        loop = asyncio.get_running_loop()
        last: LoadMetrics | None = None
        last_t = 0.0
        hit_rate = getattr(self.engine, "hit_rate", None)
        while True:
            load = self.engine.load_metrics()
            now = loop.time()
            if load != last or now - last_t >= LOAD_PERIOD_S:
                assert self.publisher is not None
                self.publisher.publish_load(load)
                self.metrics.observe_load(load, hit_rate() if callable(hit_rate) else None)
                last, last_t = load, now
            await asyncio.sleep(LOAD_POLL_S)

    async def _lease_loop(self, engine: CoreEngine) -> None:
        """Free the blocks of leases nobody pulled or released in time."""
        while True:
            await asyncio.sleep(LEASE_SWEEP_S)
            n = engine.expire_leases()
            if n:
                log.info("%d KV leases expired unpulled; their blocks are free", n)

    # ------------------------------------------------------------------ drain

    async def drain(self) -> None:
        """Stop taking work (deregister first), finish or hand back in-flight streams, close everything."""
        if self.gate.draining:
            await self._drained.wait()
            return
        grace = self.settings.drain_grace_s
        log.info("draining %s: %d streams in flight, grace %.1fs", self.instance_id, self.gate.inflight, grace)
        self.gate.start_drain()
        self.metrics.draining.labels(self.card.name).set(1)
        if self.server is not None:
            await self.server.set_serving(False)
        if self.discovery is not None:
            # leave the passing set first, so routers and frontends stop sending new work here
            await self.discovery.deregister()
        if not await self.gate.wait_idle(grace):
            log.warning("%d streams still running after %.1fs; handing them back", self.gate.inflight, grace)
            self.gate.handing_back = True
            await self.engine.stop()
            await self.gate.wait_idle(2.0)
        await self._close()
        self._drained.set()
        log.info("worker %s drained", self.instance_id)

    async def _close(self) -> None:
        for task in (self._load_task, self._lease_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.ctx.kv_channels.close()
        if self.server is not None:
            await self.server.stop(1.0)
        await self.engine.stop()
        if self.publisher is not None:
            # a last load report so subscribers see the worker empty before it goes
            self.publisher.publish_load(self.engine.load_metrics())
            await self.publisher.close()
        if self.discovery is not None:
            await self.discovery.close()
        if self._metrics_server is not None:
            await self._metrics_server.cleanup()
            self._metrics_server = None
