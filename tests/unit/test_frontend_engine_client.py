"""The worker hop: a worker's gRPC status (and `dynamo-error` name) becomes the error class the session acts on.

A real grpc.aio DecodeService on loopback aborts through `errors.abort`, as workers do.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from dynamo_grpc import errors
from dynamo_grpc.frontend.engine_client import WorkerClient
from dynamo_grpc.v1 import common_pb2, worker_pb2, worker_pb2_grpc

RAISED: dict[str, errors.DynamoError | grpc.StatusCode] = {
    "overloaded": errors.Overloaded("queue full"),
    "too_long": errors.PromptTooLong("prompt needs 900 blocks, the cache has 512"),
    "refused": errors.UnsupportedOption("bad_words", "is not supported by the mocker"),
    "draining": errors.Draining("worker is draining"),
    "internal": errors.Internal("step crashed"),
    "bare_unknown": grpc.StatusCode.UNKNOWN,
    "bare_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


class Failing(worker_pb2_grpc.DecodeServiceServicer):
    async def Decode(  # type: ignore[override]
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        if request.request_id == "finished_then_failed":  # the whole answer, then a late failure
            yield worker_pb2.DecodeResponse(token_ids=[1, 2], finish_reason=common_pb2.FINISH_REASON_LENGTH)
            await context.abort(grpc.StatusCode.INTERNAL, "teardown failed")
        yield worker_pb2.DecodeResponse(token_ids=[1])
        what = RAISED[request.request_id]
        if isinstance(what, errors.DynamoError):
            await errors.abort(context, what)
        await context.abort(what, "no metadata")


@pytest.fixture
async def address() -> AsyncIterator[str]:
    server = grpc.aio.server()
    worker_pb2_grpc.add_DecodeServiceServicer_to_server(Failing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


EXPECTED: dict[str, type[errors.DynamoError]] = {
    "overloaded": errors.Overloaded,  # re-route once
    "too_long": errors.PromptTooLong,  # reported, never migrated
    "refused": errors.InvalidArgument,  # reported, names the option
    "draining": errors.Draining,  # migrate
    "internal": errors.WorkerLost,  # a broken worker: migrate
    "bare_unknown": errors.WorkerLost,
    "bare_exhausted": errors.Overloaded,
}


@pytest.mark.parametrize("case", sorted(RAISED))
async def test_worker_status_becomes_the_error_class(address: str, case: str) -> None:
    client = WorkerClient()
    try:
        with pytest.raises(errors.DynamoError) as ei:
            async for _ in client.decode(address, worker_pb2.DecodeRequest(request_id=case), timeout=10):
                pass
        assert type(ei.value) is EXPECTED[case], ei.value
        assert address in ei.value.message
        if case == "refused":
            assert "bad_words" in ei.value.message
        assert ei.value.spec.migrate == (case in ("draining", "internal", "bare_unknown"))
    finally:
        await client.pool.close()


async def test_a_failure_after_the_finish_message_loses_nothing(address: str) -> None:
    """The client reads a Decode call to its end after the finish (so it ends OK and its span closes); a status
    that goes wrong after the whole answer arrived is not a lost worker: the answer is delivered as it is."""
    client = WorkerClient()
    try:
        got = [r async for r in client.decode(address, worker_pb2.DecodeRequest(request_id="finished_then_failed"))]
        assert [list(r.token_ids) for r in got] == [[1, 2]]
        assert got[0].finish_reason == common_pb2.FINISH_REASON_LENGTH
    finally:
        await client.pool.close()
