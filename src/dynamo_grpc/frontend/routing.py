"""Picking a worker for a request: the KV router over gRPC, or round-robin/random over live workers.

`kv` asks a `dynamo-router` (RouterService.Route) and reports progress on one long-lived
Update stream (PREFILL_DONE after the first token, FREE at the end) so the router's active-block
accounting stays right. `round-robin` and `random` decide here from the live worker set and need no
router. Progress reports are fire-and-forget (`prefill_done`/`free` never block a request).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import grpc

from dynamo_grpc.frontend.errors import Code, FrontendError
from dynamo_grpc.transport import ChannelOptions, open_channel
from dynamo_grpc.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerEndpoint:
    """A live worker serving a model."""

    instance_id: str
    address: str


@dataclass(frozen=True)
class Pick:
    """Where a request goes."""

    instance_id: str
    address: str
    overlap_blocks: int = 0


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
    ) -> Pick: ...

    def prefill_done(self, request_id: str, output_tokens: int) -> None: ...

    def free(self, request_id: str, output_tokens: int) -> None: ...

    async def close(self) -> None: ...


def _candidates(workers: Sequence[WorkerEndpoint], exclude: set[str]) -> list[WorkerEndpoint]:
    live = [w for w in workers if w.instance_id not in exclude]
    if not live:
        raise FrontendError(Code.UNAVAILABLE, "no live worker serves this model")
    return sorted(live, key=lambda w: w.instance_id)


class RoundRobinRouter:
    """Cycles through the live workers of each model."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    async def route(
        self,
        request_id: str,
        model: str,
        token_ids: Sequence[int],
        workers: Sequence[WorkerEndpoint],
        exclude: set[str],
        expected_output_tokens: int,
        lora: str,
    ) -> Pick:
        w = self._choose(_candidates(workers, exclude))
        return Pick(w.instance_id, w.address)

    def _choose(self, live: list[WorkerEndpoint]) -> WorkerEndpoint:
        return live[next(self._counter) % len(live)]

    def prefill_done(self, request_id: str, output_tokens: int) -> None:
        pass

    def free(self, request_id: str, output_tokens: int) -> None:
        pass

    async def close(self) -> None:
        pass


class RandomRouter(RoundRobinRouter):
    """Uniform choice among live workers."""

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self._rng = random.Random(seed)

    def _choose(self, live: list[WorkerEndpoint]) -> WorkerEndpoint:
        return self._rng.choice(live)


class KvRouterClient:
    """Routes through a RouterService. `address_fn` gives the current router address (static or Consul)."""

    def __init__(self, address_fn: Callable[[], str | None], timeout_s: float = 5.0) -> None:
        self._address_fn = address_fn
        self._timeout = timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._channel_addr: str | None = None
        self._updates: asyncio.Queue[router_pb2.UpdateRequest | None] = asyncio.Queue(maxsize=65536)
        self._update_task: asyncio.Task[None] | None = None

    def _stub(self) -> router_pb2_grpc.RouterServiceStub:
        addr = self._address_fn()
        if addr is None:
            raise FrontendError(Code.UNAVAILABLE, "no dynamo-router is live (use --router or --router-mode)")
        if self._channel is None or addr != self._channel_addr:
            if self._channel is not None:
                old = self._channel
                asyncio.get_running_loop().create_task(old.close(1.0))
            self._channel = open_channel(addr, ChannelOptions(idempotent=("dynamo_grpc.v1.RouterService/Route",)))
            self._channel_addr = addr
        return router_pb2_grpc.RouterServiceStub(self._channel)

    async def route(
        self,
        request_id: str,
        model: str,
        token_ids: Sequence[int],
        workers: Sequence[WorkerEndpoint],
        exclude: set[str],
        expected_output_tokens: int,
        lora: str,
    ) -> Pick:
        stub = self._stub()
        self._ensure_updates()
        req = router_pb2.RouteRequest(
            request_id=request_id,
            model=model,
            token_ids=token_ids,
            lora=lora,
            exclude_instance_ids=sorted(exclude),
            expected_output_tokens=expected_output_tokens,
        )
        try:
            resp = await stub.Route(req, timeout=self._timeout)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise FrontendError(Code.RESOURCE_EXHAUSTED, f"router: {e.details()}") from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND):
                raise FrontendError(Code.UNAVAILABLE, f"router: {e.details()}") from None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise FrontendError(Code.INVALID_ARGUMENT, f"router: {e.details()}") from None
            raise FrontendError(Code.UNAVAILABLE, f"router: {code.name}: {e.details()}") from None
        address = resp.address
        if not address:
            known = {w.instance_id: w.address for w in workers}
            address = known.get(resp.worker.instance_id, "")
        if not address:
            raise FrontendError(Code.UNAVAILABLE, f"router chose {resp.worker.instance_id!r} with no address")
        return Pick(resp.worker.instance_id, address, resp.overlap_blocks)

    def _send(self, req: router_pb2.UpdateRequest) -> None:
        try:
            self._updates.put_nowait(req)
        except asyncio.QueueFull:
            log.warning("router update queue full; dropping %s for %s", req.kind, req.request_id)

    def prefill_done(self, request_id: str, output_tokens: int) -> None:
        self._send(
            router_pb2.UpdateRequest(
                request_id=request_id,
                kind=router_pb2.SEQUENCE_EVENT_KIND_PREFILL_DONE,
                output_tokens=output_tokens,
            )
        )

    def free(self, request_id: str, output_tokens: int) -> None:
        self._send(
            router_pb2.UpdateRequest(
                request_id=request_id, kind=router_pb2.SEQUENCE_EVENT_KIND_FREE, output_tokens=output_tokens
            )
        )

    def _ensure_updates(self) -> None:
        if self._update_task is None or self._update_task.done():
            self._update_task = asyncio.get_running_loop().create_task(self._pump_updates())

    async def _pump_updates(self) -> None:
        """Keep one Update stream open; reopen it (after a pause) when the router restarts."""
        pending: list[router_pb2.UpdateRequest] = []

        async def feed() -> AsyncIterator[router_pb2.UpdateRequest]:
            while True:
                item = await self._updates.get()
                if item is None:
                    return
                pending.append(item)
                yield item
                pending.clear()

        while True:
            try:
                await self._stub().Update(feed())
                return  # feed() ended: closing
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, FrontendError) as e:
                log.warning("router Update stream broke (%s); reopening", e)
                for item in pending:  # the message being sent when it broke
                    self._send(item)
                pending.clear()
                await asyncio.sleep(0.5)

    async def close(self) -> None:
        if self._update_task is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self._updates.put_nowait(None)
            try:
                await asyncio.wait_for(self._update_task, 2.0)
            except (TimeoutError, asyncio.CancelledError, grpc.aio.AioRpcError, FrontendError):
                self._update_task.cancel()
        if self._channel is not None:
            await self._channel.close(None)
