"""RouterService: protobuf <-> the plain Router, and router errors -> dynamo_grpc.errors.

`route_response` and `apply_updates` are shared with the global router's servicer (global_service.py).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Protocol

import grpc

from dynamo_grpc import errors
from dynamo_grpc.discovery.pools import DEFAULT_POOL
from dynamo_grpc.observability import spans
from dynamo_grpc.router.router import AllBusy, NotReady, NoWorkers, RouteInput, Router, RouteResult
from dynamo_grpc.v1 import common_pb2, router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)


#: RouteRequest.phase -> the router's phase name
PHASE_NAMES = {
    router_pb2.ROUTE_PHASE_UNSPECIFIED: "aggregated",
    router_pb2.ROUTE_PHASE_PREFILL: "prefill",
    router_pb2.ROUTE_PHASE_DECODE: "decode",
}


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    """Thin adapter: no routing logic here."""

    def __init__(self, router: Router) -> None:
        self.router = router

    async def Route(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteResponse:
        r = self.router
        inp = await route_input(request, context, r.config.model)
        if request.pool and request.pool != DEFAULT_POOL:
            await errors.abort(
                context,
                errors.InvalidArgument(
                    f"pool {request.pool!r}: this router has no pools (dynamo-grpc global-router routes over pools)"
                ),
            )
        try:
            with spans.span("router.decide", request_id=request.request_id, model=request.model) as sp:
                res = await r.route_wait(inp)
                spans.set_attributes(
                    sp, worker=res.instance_id, overlap_blocks=res.overlap_blocks, cost=res.total_cost, mode=res.mode
                )
        except (NotReady, NoWorkers) as exc:
            await errors.abort(context, errors.Unavailable(str(exc)))
        except AllBusy as exc:
            await errors.abort(context, errors.Overloaded(str(exc)))
        except ValueError as exc:
            await errors.abort(context, errors.InvalidArgument(str(exc)))
        return route_response(res)

    async def Update(
        self, request_iterator: AsyncIterator[router_pb2.UpdateRequest], context: grpc.aio.ServicerContext
    ) -> router_pb2.UpdateResponse:
        return await apply_updates(self.router, request_iterator, context)


async def route_input(
    request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext, served_model: str
) -> RouteInput:
    """A RouteRequest checked (the model served, tokens given, a known phase) and decoded: the same rules for
    the router and the global router; a bad one ends the call with its status."""
    if served_model and request.model and request.model != served_model:
        await errors.abort(
            context, errors.ModelNotFound(f"this router serves model {served_model!r}, not {request.model!r}")
        )
    if not request.token_ids and not request.block_hashes:
        await errors.abort(context, errors.InvalidArgument("token_ids or block_hashes is required"))
    phase = PHASE_NAMES.get(request.phase, "")
    if not phase:
        await errors.abort(context, errors.InvalidArgument(f"phase {request.phase}: unknown RoutePhase value"))
    return RouteInput(
        request_id=request.request_id,
        model=request.model,
        token_ids=request.token_ids,
        block_hashes=list(request.block_hashes) or None,
        lora=request.lora,
        exclude=list(request.exclude_instance_ids),
        expected_output_tokens=request.expected_output_tokens,
        dry_run=request.dry_run,
        phase=phase,
    )


def route_response(res: RouteResult, pool: str = "", reason: str = "") -> router_pb2.RouteResponse:
    """A RouteResult as the contract's RouteResponse (the global router adds its pool and reason)."""
    return router_pb2.RouteResponse(
        worker=common_pb2.WorkerId(instance_id=res.instance_id, dp_rank=res.dp_rank),
        address=res.address,
        overlap_blocks=res.overlap_blocks,
        prompt_blocks=res.prompt_blocks,
        cost=router_pb2.CostBreakdown(prefill_cost=res.prefill_cost, decode_cost=res.decode_cost, total=res.total_cost),
        mode=res.mode,
        pool=pool,
        reason=reason,
    )


class _Updatable(Protocol):
    def prefill_done(self, request_id: str, output_tokens: int) -> bool: ...

    def free(self, request_id: str) -> bool: ...


async def apply_updates(
    router: _Updatable, request_iterator: AsyncIterator[router_pb2.UpdateRequest], context: grpc.aio.ServicerContext
) -> router_pb2.UpdateResponse:
    """One Update stream: progress events applied to the router that routed them; an unknown kind ends it."""
    applied = 0
    async for ev in request_iterator:
        if ev.kind == router_pb2.SEQUENCE_EVENT_KIND_PREFILL_DONE:
            ok = router.prefill_done(ev.request_id, ev.output_tokens)
        elif ev.kind == router_pb2.SEQUENCE_EVENT_KIND_FREE:
            ok = router.free(ev.request_id)
        else:
            await errors.abort(context, errors.InvalidArgument(f"unknown sequence event kind {ev.kind}"))
        applied += int(ok)
    return router_pb2.UpdateResponse(applied=applied)
