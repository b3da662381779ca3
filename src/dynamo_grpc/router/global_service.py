"""RouterService for the global router: protobuf <-> GlobalRouter, its errors -> dynamo_grpc.errors.

The same contract as ``dynamo-grpc router``, so a frontend needs no special mode; ``RouteRequest.pool``
pins a pool (unknown: INVALID_ARGUMENT), ``RouteRequest.phase`` picks the grid, and ``RouteResponse``
carries the pool and the decision's reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc

from dynamo_grpc import errors
from dynamo_grpc.observability import spans
from dynamo_grpc.router.global_router import GlobalRouter, UnknownPool
from dynamo_grpc.router.router import AllBusy, NotReady, NoWorkers, RouteInput
from dynamo_grpc.router.service import PHASE_NAMES, apply_updates, route_response
from dynamo_grpc.v1 import router_pb2, router_pb2_grpc


class GlobalRouterServicer(router_pb2_grpc.RouterServiceServicer):
    """Thin adapter: decode, call the GlobalRouter, encode. ``model()`` is the model served ("" = any)."""

    def __init__(self, router: GlobalRouter, model: Callable[[], str]) -> None:
        self.router = router
        self.model = model

    async def Route(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteResponse:
        served = self.model()
        if served and request.model and request.model != served:
            await errors.abort(
                context, errors.ModelNotFound(f"this router serves model {served!r}, not {request.model!r}")
            )
        if not request.token_ids and not request.block_hashes:
            await errors.abort(context, errors.InvalidArgument("token_ids or block_hashes is required"))
        phase = PHASE_NAMES.get(request.phase)
        if phase is None:
            await errors.abort(context, errors.InvalidArgument(f"phase {request.phase}: unknown RoutePhase value"))
        assert phase is not None
        inp = RouteInput(
            request_id=request.request_id,
            model=request.model,
            token_ids=request.token_ids,
            block_hashes=list(request.block_hashes) or None,
            lora=request.lora,
            exclude=list(request.exclude_instance_ids),
            expected_output_tokens=request.expected_output_tokens,
            dry_run=request.dry_run,
        )
        try:
            with spans.span("global_router.decide", request_id=request.request_id, model=request.model) as sp:
                d = self.router.route(inp, phase, request.pool)
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
