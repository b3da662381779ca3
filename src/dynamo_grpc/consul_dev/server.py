"""Run the consul-dev HTTP API on a socket, in-process (tests, benches) or as the role's main loop."""

from __future__ import annotations

import os
import socket

from aiohttp import web

from dynamo_grpc.consul_dev.http_api import build_app
from dynamo_grpc.consul_dev.state import Store


class ConsulDevServer:
    """One agent: a ``Store`` served by aiohttp. ``start()`` binds (port 0 picks a free port)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8500,
        *,
        acl_token: str = "",
        time_scale: float = 1.0,
        node: str | None = None,
    ) -> None:
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        self.host, self.port = host, port
        self.acl_token = acl_token
        self.time_scale = time_scale
        self.node = node or f"consul-dev-{socket.gethostname()}"
        self.store: Store | None = None
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        """The bound address as ``http://host:port`` (what CONSUL_HTTP_ADDR takes)."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> str:
        self.store = Store(node=self.node, address="127.0.0.1", time_scale=self.time_scale)
        self.store.start()
        app = build_app(self.store, self.acl_token)
        # handler_cancellation: a watcher that hangs up must not leave its blocking query parked here.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
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


def write_addr_file(path: str, address: str) -> None:
    """Write atomically so a reader polling for the file never sees half an address."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(address + "\n")
    os.replace(tmp, path)
