"""A worker that leaves discovery (it starts draining, or its health check flaps) while a request to it is
just starting: the request still finishes, or fails with a clear error to migrate on; it never hangs.

Regression for a request that waited until its client's deadline (the planner bench, one of 293): the
frontend closed the channel to a worker as it left discovery; grpc.aio's close cancelled the call that had
just started on it, the reader got a bare CancelledError and the request waited forever. A real grpc.aio
DecodeService on loopback streams slowly; the ``yields`` place the departure inside that starting window.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from dynamo_grpc import errors
from dynamo_grpc.frontend.engine_client import WorkerClient
from dynamo_grpc.v1 import common_pb2, worker_pb2, worker_pb2_grpc

TOKENS = 8
#: generous: a loaded 2-core box must not turn a slow answer into a failure; a hang is what fails
WAIT_S = 30.0


class Slow(worker_pb2_grpc.DecodeServiceServicer):
    """One token every 50 ms, then a finish: a request that is still running when its worker leaves."""

    async def Decode(  # type: ignore[override]
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        for i in range(TOKENS):
            await asyncio.sleep(0.05)
            reason = common_pb2.FINISH_REASON_LENGTH if i == TOKENS - 1 else common_pb2.FINISH_REASON_UNSPECIFIED
            yield worker_pb2.DecodeResponse(token_ids=[i], finish_reason=reason)


@pytest.fixture
async def address() -> AsyncIterator[str]:
    server = grpc.aio.server()
    worker_pb2_grpc.add_DecodeServiceServicer_to_server(Slow(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def _read(client: WorkerClient, address: str, got: list[int]) -> None:
    request = worker_pb2.DecodeRequest(request_id="r", token_ids=[1, 2, 3])
    async for resp in client.decode(address, request, timeout=WAIT_S):
        got.extend(resp.token_ids)


@pytest.mark.parametrize("yields", [2, 3, 5, 8])
async def test_a_request_starting_as_its_worker_leaves_discovery_finishes(address: str, yields: int) -> None:
    client = WorkerClient()
    got: list[int] = []
    try:
        reading = asyncio.create_task(_read(client, address, got))
        for _ in range(yields):
            await asyncio.sleep(0)
        # what the frontend does when the worker leaves the passing set (frontend/main.py forget_worker)
        dropping = asyncio.create_task(client.pool.drop(address, grace=WAIT_S))
        await asyncio.wait_for(reading, WAIT_S)
        await asyncio.wait_for(dropping, WAIT_S)  # closed once the stream ended, not after the whole grace
        assert got == list(range(TOKENS))
        assert client.pool.inflight(address) == 0
    finally:
        await client.pool.close()


async def test_a_new_request_after_the_departure_opens_a_fresh_channel(address: str) -> None:
    client = WorkerClient()
    try:
        client.pool.get(address)
        await client.pool.drop(address, grace=WAIT_S)  # nothing in flight: closed at once
        got: list[int] = []
        await asyncio.wait_for(_read(client, address, got), WAIT_S)
        assert got == list(range(TOKENS))
    finally:
        await client.pool.close()


@pytest.mark.parametrize("yields", [2, 3, 5])
async def test_a_call_cancelled_by_its_channel_closing_is_worker_lost_not_silence(address: str, yields: int) -> None:
    client = WorkerClient()
    got: list[int] = []
    try:
        reading = asyncio.create_task(_read(client, address, got))
        for _ in range(yields):
            await asyncio.sleep(0)
        # anything else closing the channel under a starting call (here grpc's own close, no grace):
        # grpc.aio cancels the call on this side; the reader must get an error the session migrates on
        await client.pool.get(address).close(None)
        try:
            await asyncio.wait_for(reading, WAIT_S)
        except errors.WorkerLost as e:
            assert address in e.message and e.spec.migrate
        else:  # the call was not cut after all: then it must have finished whole
            assert got == list(range(TOKENS))
        assert client.pool.inflight(address) == 0
    finally:
        await client.pool.close()

