"""RouterService for the global router: protobuf <-> GlobalRouter, its errors -> dynamo_grpc.errors.

The same contract as ``dynamo-grpc router``, so a frontend needs no special mode; ``RouteRequest.pool``
pins a pool (unknown: INVALID_ARGUMENT), ``RouteRequest.phase`` picks the grid and, inside the pool, the
workers whose role serves it (as ``dynamo-grpc router``), and ``RouteResponse`` carries the pool and the
decision's reason. A request its pool holds (``hold_spill_s``) waits here, woken by every PREFILL_DONE /
FREE; a client that cancels while it waits is dropped from the hold at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from dynamo_grpc import errors
from dynamo_grpc.observability import spans
from dynamo_grpc.router.global_router import GlobalRouter, Held, PoolDecision, UnknownPool
from dynamo_grpc.router.router import AllBusy, NotReady, NoWorkers, RouteInput
from dynamo_grpc.router.service import apply_updates, route_input, route_response
from dynamo_grpc.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger("dynamo_grpc.global_router")

#: a hold ends this long before the caller's deadline, leaving time to route and answer (the frontend's Route
#: deadline is 5 s): a held request is never failed by its own wait
DEADLINE_MARGIN_S = 0.5


class GlobalRouterServicer(router_pb2_grpc.RouterServiceServicer):
    """Thin adapter: decode, call the GlobalRouter, encode. ``model()`` is the model served ("" = any)."""

    def __init__(self, router: GlobalRouter, model: Callable[[], str]) -> None:
        self.router = router
        self.model = model
        #: set (and replaced) on every change that may let a held request go
        self._changed = asyncio.Event()
        router.on_change = self._wake
        #: held requests whose hold was logged (once each)
        self._told: set[str] = set()

    def _wake(self) -> None:
        ev, self._changed = self._changed, asyncio.Event()
        ev.set()

    async def decide(
        self, inp: RouteInput, pool: str, sp: Any = None, time_left: Callable[[], float | None] = lambda: None
    ) -> PoolDecision:
        """Route, waiting while the GlobalRouter holds the request (never past ``time_left()`` minus
        DEADLINE_MARGIN_S: then it routes as without hold); a cancelled wait frees the hold."""
        try:
            while True:
                changed = self._changed
                left = time_left()
                budget = None if left is None else left - DEADLINE_MARGIN_S
                try:
                    return self.router.route(inp, inp.phase, pool, hold=budget is None or budget > 0)
                except Held as h:
                    if inp.request_id not in self._told:
                        self._told.add(inp.request_id)
                        log.debug("request %s: %s", inp.request_id, h)
                        spans.event(sp, "held", reason=str(h))
                    try:
                        await asyncio.wait_for(changed.wait(), h.wait_s if budget is None else min(h.wait_s, budget))
                    except TimeoutError:
                        pass  # the next route() sees hold_spill_s ran out and queues the request
        finally:
            self._told.discard(inp.request_id)
            if self.router.unhold(inp.request_id):  # cancelled (or failed) while held
                self._wake()

    async def Route(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteResponse:
        inp = await route_input(request, context, self.model())
        try:
            with spans.span("global_router.decide", request_id=request.request_id, model=request.model) as sp:
                d = await self.decide(inp, request.pool, sp, context.time_remaining)
                spans.set_attributes(sp, pool=d.pool, worker=d.result.instance_id, reason=d.reason)
        except (UnknownPool, ValueError) as exc:
            await errors.abort(context, errors.InvalidArgument(str(exc)))
        except AllBusy as exc:
            await errors.abort(context, errors.Overloaded(str(exc)))
        except (NoWorkers, NotReady) as exc:
            await errors.abort(context, errors.Unavailable(str(exc)))
        return route_response(d.result, d.pool, d.reason)

    async def Update(
        self, request_iterator: AsyncIterator[router_pb2.UpdateRequest], context: grpc.aio.ServicerContext
    ) -> router_pb2.UpdateResponse:
        return await apply_updates(self.router, request_iterator, context)
