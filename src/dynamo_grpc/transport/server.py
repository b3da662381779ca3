"""Build and run a grpc.aio server the same way in every process.

Every server gets reflection (so ``grpcurl -plaintext HOST:PORT list`` works), the
standard ``grpc.health.v1`` service with a status per service, keepalive and message
size limits, and a graceful stop that refuses new RPCs and lets in-flight streams
finish within a grace period.

TLS is given once, in :class:`ServerOptions` (``tls=TlsConfig.from_args(args)``, ``public`` for the
frontend's client-facing listener); every service added with :meth:`GrpcServer.add` is then served
under it, and the certificates reload in place (SIGHUP or a changed file) without dropping streams.
``health_port`` adds a plaintext listener that serves only ``grpc.health.v1`` (the same statuses, and
reflection of that service alone),
because Kubernetes' gRPC probes cannot present a client certificate or even speak TLS.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from dynamo_grpc.observability.interceptors import server_interceptors
from dynamo_grpc.transport.options import DEFAULT_MAX_MESSAGE_BYTES, common_channel_args
from dynamo_grpc.transport.tls import TlsConfig

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@dataclass
class ServerOptions:
    """Where and how a server listens. Port 0 asks the OS for a free port."""

    host: str = "127.0.0.1"
    port: int = 0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    grace_s: float = 10.0
    tls: TlsConfig | None = None
    #: the frontend's client-facing listener: client certificates follow ``--tls-client-auth``
    public: bool = False
    #: plaintext grpc.health.v1-only listener for probes (0 picks a free port); None: no such listener
    health_port: int | None = None
    extra_args: list[tuple[str, int]] = field(default_factory=list)
    #: share the port with the other replicas of one frontend (SO_REUSEPORT, frontend/replicas.py); off,
    #: a second process on the port fails to bind instead of silently taking half the connections
    reuse_port: bool = False
    #: grpc.aio server interceptors (e.g. the frontend's API-key check); the health listener has none
    interceptors: list[Any] = field(default_factory=list)


class GrpcServer:
    """A grpc.aio server with reflection and health, started on :meth:`start`.

    ``add(add_fn, servicer, service_name)`` registers a servicer, e.g.
    ``add(router_pb2_grpc.add_RouterServiceServicer_to_server, svc, "dynamo_grpc.v1.RouterService")``.
    """

    def __init__(self, options: ServerOptions | None = None) -> None:
        self.options = options or ServerOptions()
        o = self.options
        self.server = grpc.aio.server(
            # tracing first (continue the caller's traceparent; none when off), then the role's own (API keys)
            interceptors=[*server_interceptors(), *o.interceptors] or None,
            options=common_channel_args(o.max_message_bytes, o.keepalive_time_s, o.keepalive_timeout_s)
            + [
                # tolerate our channels' keepalive pings (every keepalive_time_s) while no data flows, e.g. a
                # stream waiting for a long prefill; gRPC's server default tolerates one every 5 minutes
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
                ("grpc.http2.max_ping_strikes", 0),
                ("grpc.so_reuseport", 1 if o.reuse_port else 0),
            ]
            + o.extra_args,
        )
        self.health = health.aio.HealthServicer()
        self._services: list[str] = []
        self.port: int | None = None
        self.health_port: int | None = None
        self._health_server: grpc.aio.Server | None = None
        self._watching_certs = False
        self._stopping: asyncio.Event | None = None

    def add(self, add_fn: Callable[[Any, grpc.aio.Server], None], servicer: object, service_name: str) -> None:
        """Register a servicer under its full service name (for reflection and health)."""
        add_fn(servicer, self.server)
        self._services.append(service_name)

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        return f"{self.options.host}:{self.port}"

    async def start(self, serving: bool = True) -> str:
        """Bind, start and mark every service SERVING (or NOT_SERVING); returns host:port."""
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [*self._services, _HEALTH_SERVICE]
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], self.server)
        target = f"{self.options.host}:{self.options.port}"
        tls = self.options.tls
        if tls is not None:
            self.port = self.server.add_secure_port(target, tls.server_credentials(self.options.public))
        else:
            self.port = self.server.add_insecure_port(target)
        if not self.port:
            raise OSError(f"could not bind gRPC server to {target}")
        if self.options.health_port is not None:
            await self._start_health_listener()
        await self.server.start()
        if tls is not None:
            tls.certs.start()
            self._watching_certs = True
        await self.set_serving(serving)
        mode = "TLS" if tls else "plaintext"
        log.info("gRPC server listening on %s (%s, %s)", self.address, mode, ", ".join(self._services))
        return self.address

    async def _start_health_listener(self) -> None:
        self._health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
        # reflection of Health alone, so `grpcurl -plaintext HOST:PORT grpc.health.v1.Health/Check` works too
        reflection.enable_server_reflection([_HEALTH_SERVICE, reflection.SERVICE_NAME], self._health_server)
        target = f"{self.options.host}:{self.options.health_port}"
        self.health_port = self._health_server.add_insecure_port(target)
        if not self.health_port:
            raise OSError(f"could not bind the health listener to {target}")
        await self._health_server.start()
        log.info("plaintext grpc.health.v1 listener on %s:%d", self.options.host, self.health_port)

    async def set_serving(self, serving: bool, service: str | None = None) -> None:
        """Set health of one service, or of all (and the overall "" status) when None."""
        status = _SERVING if serving else _NOT_SERVING
        names: Iterable[str] = [service] if service is not None else ["", *self._services]
        for name in names:
            await self.health.set(name, status)

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new RPCs, let in-flight ones finish within grace."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.options.grace_s if grace_s is None else grace_s)
        if self._health_server is not None:
            await self._health_server.stop(0)
            self._health_server = None
        if self.options.tls is not None and self._watching_certs:
            self._watching_certs = False
            await self.options.tls.certs.stop()

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def run_until_signal(
    stop: Callable[[], Awaitable[None]], *, signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT)
) -> None:
    """Block until SIGTERM/SIGINT, then await ``stop()`` (which should drain and close)."""
    loop = asyncio.get_running_loop()
    event = asyncio.Event()
    for sig in signals:
        loop.add_signal_handler(sig, event.set)
    try:
        await event.wait()
        log.info("signal received, draining")
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    await stop()
