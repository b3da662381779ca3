"""RouterService over real gRPC on loopback: a full router queue is RESOURCE_EXHAUSTED naming the queue, and a
waiting Route is answered once an Update frees a worker (the embedded router calls the same Router.route_wait)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.router import RouteInput, Router, WorkerInfo
from dynamo_grpc.router.service import RouterServicer
from dynamo_grpc.v1 import router_pb2, router_pb2_grpc

BS = 64


async def test_route_waits_in_the_router_queue_and_a_full_queue_is_resource_exhausted() -> None:
    cfg = RouterConfig(block_size=BS, queue_threshold=1.0, max_num_batched_tokens=4 * BS, queue_size=1, seed=1)
    router = Router(cfg)
    router.set_workers([WorkerInfo("w0", "127.0.0.1:1", "m", BS, 1, 10_000)])
    router.ready = True
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(RouterServicer(router), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = router_pb2_grpc.RouterServiceStub(ch)

            def req(rid: str, blocks: int) -> router_pb2.RouteRequest:
                return router_pb2.RouteRequest(request_id=rid, model="m", token_ids=list(range(blocks * BS)))

            first = await stub.Route(req("a", 5))
            assert first.worker.instance_id == "w0"

            async def route_b() -> router_pb2.RouteResponse:
                return await stub.Route(req("b", 1))

            waiting = asyncio.create_task(route_b())
            for _ in range(100):
                if router.queue is not None and len(router.queue):
                    break
                await asyncio.sleep(0.01)
            assert not waiting.done()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Route(req("c", 1))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "router queue is full" in (err.value.details() or "")

            async def done() -> object:
                yield router_pb2.UpdateRequest(request_id="a", kind=router_pb2.SEQUENCE_EVENT_KIND_PREFILL_DONE)

            await stub.Update(done())
            second = await asyncio.wait_for(waiting, 5.0)
            assert second.worker.instance_id == "w0" and "b" in router.active and "c" not in router.active
            # a deadline that passes while waiting leaves nothing behind
            router.route(RouteInput("x", token_ids=list(range(10**6, 10**6 + 5 * BS))))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Route(req("late", 1), timeout=0.3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await asyncio.sleep(0.1)
            assert router.queue is not None and len(router.queue) == 0 and "late" not in router.active
    finally:
        await server.stop(None)


async def test_bad_route_requests_name_what_is_wrong() -> None:
    """A pool on a router without pools, an unknown phase, no tokens, another model: each a clear status."""
    router = Router(RouterConfig(block_size=BS, model="m", seed=1))
    router.set_workers([WorkerInfo("w0", "127.0.0.1:1", "m", BS, 1, 10_000)])
    router.ready = True
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(RouterServicer(router), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = router_pb2_grpc.RouterServiceStub(ch)
            ok = dict(request_id="r", model="m", token_ids=list(range(BS)))
            cases = [
                (dict(ok, pool="short"), grpc.StatusCode.INVALID_ARGUMENT, "global-router"),
                (dict(ok, phase=7), grpc.StatusCode.INVALID_ARGUMENT, "phase 7"),
                (dict(ok, token_ids=[]), grpc.StatusCode.INVALID_ARGUMENT, "token_ids or block_hashes"),
                (dict(ok, model="other"), grpc.StatusCode.NOT_FOUND, "'other'"),
            ]
            for fields, code, words in cases:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Route(router_pb2.RouteRequest(**fields))  # type: ignore[arg-type]
                assert err.value.code() == code and words in (err.value.details() or ""), fields
            # the default pool is every worker here: it is honoured, not refused
            res = await stub.Route(router_pb2.RouteRequest(**dict(ok, pool="default")))  # type: ignore[arg-type]
            assert res.worker.instance_id == "w0"
    finally:
        await server.stop(None)
