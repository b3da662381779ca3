"""Run the consul-dev HTTP API on a socket, in-process (tests, benches) or as the role's main loop."""

from __future__ import annotations

import os
import socket
import ssl

from aiohttp import web

from dynamo_grpc.consul_dev.acl import ACL
from dynamo_grpc.consul_dev.http_api import build_app
from dynamo_grpc.consul_dev.state import Store
from dynamo_grpc.consul_dev.trace import AnswerTrace


class ConsulDevServer:
    """One agent: a ``Store`` served by aiohttp. ``start()`` binds (port 0 picks a free port).

    ``acl``: the ACL system (None: ACLs off). ``acl_token`` is shorthand for ACLs in deny mode with that
    initial management token (the older single-shared-token mode behaves the same way)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8500,
        *,
        acl_token: str = "",
        acl: ACL | None = None,
        time_scale: float = 1.0,
        node: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        trace_file: str | None = None,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.host, self.port = host, port
        if acl is None and acl_token:
            acl = ACL("deny", initial_management=acl_token)
        self.acl = acl
        self.time_scale = time_scale
        self.node = node or f"consul-dev-{socket.gethostname()}"
        self.store: Store | None = None
        self._runner: web.AppRunner | None = None
        self.ssl_context = ssl_context
        self.trace_file = trace_file  # see trace.py
        self._trace: AnswerTrace | None = None

    @property
    def address(self) -> str:
        """The bound address as ``http://host:port`` (what CONSUL_HTTP_ADDR takes)."""
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}"

    async def start(self) -> str:
        self.store = Store(node=self.node, address="127.0.0.1", time_scale=self.time_scale)
        self.store.start()
        if self.trace_file:
            self._trace = AnswerTrace(self.trace_file)
        app = build_app(self.store, self.acl, self._trace)
        # handler_cancellation: a watcher that hangs up must not leave its blocking query parked here.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.host, self.port, reuse_address=True, ssl_context=self.ssl_context
        )
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = sockets[0].getsockname()[1]
        return self.address

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.store is not None:
            await self.store.close()
        if self._trace is not None:
            self._trace.close()
            self._trace = None


def server_tls(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """TLS for the HTTP API, like Consul's ``tls.https``; with ``client_ca`` clients must present a
    certificate signed by it (Consul's ``verify_incoming``)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def write_addr_file(path: str, address: str) -> None:
    """Write atomically so a reader polling for the file never sees half an address."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(address + "\n")
    os.replace(tmp, path)
