"""RouterService for the global router: protobuf <-> GlobalRouter, its errors -> dynamo_grpc.errors.

The same contract as ``dynamo-grpc router``, so a frontend needs no special mode; ``RouteRequest.pool``
pins a pool (unknown: INVALID_ARGUMENT), ``RouteRequest.phase`` picks the grid and, inside the pool, the
workers whose role serves it (as ``dynamo-grpc router``), and ``RouteResponse`` carries the pool and the
decision's reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc

from dynamo_grpc import errors
from dynamo_grpc.observability import spans
from dynamo_grpc.router.global_router import GlobalRouter, UnknownPool
from dynamo_grpc.router.router import AllBusy, NotReady, NoWorkers
from dynamo_grpc.router.service import apply_updates, route_input, route_response
from dynamo_grpc.v1 import router_pb2, router_pb2_grpc


class GlobalRouterServicer(router_pb2_grpc.RouterServiceServicer):
    """Thin adapter: decode, call the GlobalRouter, encode. ``model()`` is the model served ("" = any)."""

    def __init__(self, router: GlobalRouter, model: Callable[[], str]) -> None:
        self.router = router
        self.model = model

    async def Route(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteResponse:
        inp = await route_input(request, context, self.model())
        try:
            with spans.span("global_router.decide", request_id=request.request_id, model=request.model) as sp:
                d = self.router.route(inp, inp.phase, request.pool)
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
