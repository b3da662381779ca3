"""Picking a worker for a request: the `Router` the pipeline talks to, and the KV router over gRPC.

`KvRouterClient` (`--router-mode kv-service`) asks the `dynamo-router` that serves the request's model
(RouterService.Route) and reports progress on that router's long-lived Update stream (PREFILL_DONE after
the first token, FREE at the end), so each router's active-block accounting stays right. The other modes run
the router core in the frontend (frontend/kv_router.py). Progress reports are fire-and-forget
(`prefill_done`/`free` never block a request). Failures are `dynamo_grpc.errors` classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import grpc

from dynamo_grpc import errors
from dynamo_grpc.transport import ChannelOptions, open_channel
from dynamo_grpc.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

#: phase name -> RouteRequest.phase
ROUTE_PHASES = {
    "aggregated": router_pb2.ROUTE_PHASE_UNSPECIFIED,
    "prefill": router_pb2.ROUTE_PHASE_PREFILL,
    "decode": router_pb2.ROUTE_PHASE_DECODE,
}


@dataclass(frozen=True)
class WorkerEndpoint:
    """A live worker serving a model."""

    instance_id: str
    address: str
    #: disaggregation role (discovery/worker_roles.py)
    role: str = "both"


@dataclass(frozen=True)
class Pick:
    """Where a request goes."""

    instance_id: str
    address: str
    overlap_blocks: int = 0
    cost: float = 0.0  # the router's total cost for this worker (for the route span)
    pool: str = ""  # the worker pool a global router chose ("" from a plain router)
    reason: str = ""  # why, in the global router's words (RouteResponse.reason)


class Router(Protocol):
    async def route(
        self,
        request_id: str,
        model: str,
        token_ids: Sequence[int],
        workers: Sequence[WorkerEndpoint],
        exclude: set[str],
        expected_output_tokens: int,
        lora: str,
        phase: str = "aggregated",
    ) -> Pick: ...

    def prefill_done(self, request_id: str, output_tokens: int) -> None: ...

    def free(self, request_id: str, output_tokens: int) -> None: ...

    async def close(self) -> None: ...


_UPDATE_RETRIES = 20  # reopen attempts (0.5 s apart) while updates wait for a router


@dataclass
class _RouterConn:
    """One router process: its channel and its Update stream (FREE must reach the router that routed)."""

    address: str
    channel: grpc.aio.Channel
    updates: asyncio.Queue[router_pb2.UpdateRequest | None] = field(
        default_factory=lambda: asyncio.Queue(maxsize=65536)
    )
    task: asyncio.Task[None] | None = None

    def stub(self) -> router_pb2_grpc.RouterServiceStub:
        return router_pb2_grpc.RouterServiceStub(self.channel)

    def send(self, req: router_pb2.UpdateRequest) -> None:
        try:
            self.updates.put_nowait(req)
        except asyncio.QueueFull:
            log.warning("router %s update queue full; dropping %s for %s", self.address, req.kind, req.request_id)
        self.ensure_updates()

    def ensure_updates(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        """Keep one Update stream open; reopen it (after a pause) when the router restarts."""
        pending: list[router_pb2.UpdateRequest] = []

        async def feed() -> AsyncIterator[router_pb2.UpdateRequest]:
            while True:
                item = await self.updates.get()
                if item is None:
                    return
                pending.append(item)
                yield item
                pending.clear()

        failures = 0
        while True:
            try:
                await self.stub().Update(feed())
                return  # feed() ended: closing
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as e:
                log.warning("router %s Update stream broke (%s); reopening", self.address, e.code().name)
                for item in pending:  # the message being sent when it broke
                    with contextlib.suppress(asyncio.QueueFull):
                        self.updates.put_nowait(item)
                pending.clear()
                if self.updates.empty():
                    return  # nothing to report: the next route reopens the stream
                failures += 1
                if failures > _UPDATE_RETRIES:  # the router is gone for good: its accounting went with it
                    log.warning("router %s unreachable; dropping %d updates", self.address, self.updates.qsize())
                    while not self.updates.empty():
                        self.updates.get_nowait()
                    return
                await asyncio.sleep(0.5)

    async def close(self) -> None:
        if self.task is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self.updates.put_nowait(None)
            try:
                await asyncio.wait_for(self.task, 2.0)
            except (TimeoutError, asyncio.CancelledError, grpc.aio.AioRpcError):
                self.task.cancel()
        await self.channel.close(None)


class KvRouterClient:
    """Routes through RouterServices. `address_fn(model)` gives the router serving a model (fixed or Consul)."""

    mode = "kv-service"  # for the frontend.request span

    def __init__(
        self,
        address_fn: Callable[[str], str | None],
        timeout_s: float | None = None,
        skipped: Callable[[], set[str]] = set,
    ) -> None:
        """``skipped``: workers this process will not use (its WorkerView), excluded on every Route so the
        router service skips them too. ``timeout_s``: a bound on each Route call; none by default, because the
        router may hold a request in its queue while every worker is busy (a fixed 5 s failed every request
        that waited longer with DEADLINE_EXCEEDED); the call ends when the request does (a client that goes
        away or whose deadline passes cancels it, and the router drops it from its queue)."""
        self._skipped = skipped
        self._address_fn = address_fn
        self._timeout = timeout_s
        self._conns: dict[str, _RouterConn] = {}
        self._owner: dict[str, _RouterConn] = {}  # request id -> the router that routed it

    def _conn(self, model: str) -> _RouterConn:
        addr = self._address_fn(model)
        if addr is None:
            raise errors.Unavailable(f"no dynamo-router is live for model '{model}' (use --router or start one)")
        conn = self._conns.get(addr)
        if conn is None:
            ch = open_channel(addr, ChannelOptions(idempotent=("dynamo_grpc.v1.RouterService/Route",)))
            conn = self._conns[addr] = _RouterConn(addr, ch)
        return conn

    async def route(
        self,
        request_id: str,
        model: str,
        token_ids: Sequence[int],
        workers: Sequence[WorkerEndpoint],
        exclude: set[str],
        expected_output_tokens: int,
        lora: str,
        phase: str = "aggregated",
    ) -> Pick:
        conn = self._conn(model)
        conn.ensure_updates()
        req = router_pb2.RouteRequest(
            request_id=request_id,
            model=model,
            token_ids=token_ids,
            lora=lora,
            exclude_instance_ids=sorted(exclude | self._skipped()),
            expected_output_tokens=expected_output_tokens,
            phase=ROUTE_PHASES[phase],
        )
        try:
            resp = await conn.stub().Route(req, timeout=self._timeout)
        except grpc.aio.AioRpcError as e:
            err = errors.from_grpc(e, f"router {conn.address}")
            if isinstance(err, (errors.WorkerLost, errors.NotFound)):  # the router (not a worker) is gone / empty
                err = errors.Unavailable(err.message)
            raise err from None
        address = resp.address or next((w.address for w in workers if w.instance_id == resp.worker.instance_id), "")
        self._owner[request_id] = conn
        if not address:
            self.free(request_id, 0)
            raise errors.Unavailable(f"router chose {resp.worker.instance_id!r} with no address")
        return Pick(resp.worker.instance_id, address, resp.overlap_blocks, resp.cost.total, resp.pool, resp.reason)

    def prefill_done(self, request_id: str, output_tokens: int) -> None:
        conn = self._owner.get(request_id)
        if conn is not None:
            kind = router_pb2.SEQUENCE_EVENT_KIND_PREFILL_DONE
            conn.send(router_pb2.UpdateRequest(request_id=request_id, kind=kind, output_tokens=output_tokens))

    def free(self, request_id: str, output_tokens: int) -> None:
        conn = self._owner.pop(request_id, None)
        if conn is not None:
            kind = router_pb2.SEQUENCE_EVENT_KIND_FREE
            conn.send(router_pb2.UpdateRequest(request_id=request_id, kind=kind, output_tokens=output_tokens))

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._conns.values()), return_exceptions=True)
        self._conns.clear()
        self._owner.clear()
