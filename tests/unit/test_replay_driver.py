"""The replay's KServe streaming driver against an in-process gRPC frontend double on loopback."""

from __future__ import annotations

import asyncio
import json
import math
import struct
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from dynamo_grpc.bench.replay_driver import Driver, DriverConfig, build_request, finish_tokens
from dynamo_grpc.bench.replay_metrics import RequestRecord
from dynamo_grpc.bench.replay_trace import TraceRequest
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc


def _int_out(resp: pb.ModelInferResponse, name: str, v: int) -> None:
    o = resp.outputs.add()
    o.name, o.datatype = name, "INT32"
    o.shape.append(1)
    resp.raw_output_contents.append(struct.pack("<i", v))


class FakeFrontend(pb_grpc.GRPCInferenceServiceServicer):
    """Streams one token per response; says which worker and how much was cached on the last one."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, np.ndarray, dict[str, object]]] = []

    async def ModelReady(self, request: pb.ModelReadyRequest, context: object) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name == "m")

    async def RepositoryIndex(self, request: object, context: object) -> pb.RepositoryIndexResponse:
        r = pb.RepositoryIndexResponse()
        r.models.add(name="down", state="UNAVAILABLE")
        r.models.add(name="m", state="READY")
        return r

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: object
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for req in request_iterator:
            names = [i.name for i in req.inputs]
            ids = np.frombuffer(req.raw_input_contents[names.index("input_ids")], dtype="<i4")
            raw = req.raw_input_contents[names.index("sampling_parameters")]
            sampling = json.loads(raw[4 : 4 + struct.unpack("<I", raw[:4])[0]])
            self.seen.append((req.id, ids, sampling))
            if ids.size > 1000:
                yield pb.ModelStreamInferResponse(error_message="prompt too long")
                continue
            n = int(sampling["max_tokens"])
            for i in range(n):
                await asyncio.sleep(0.002)
                resp = pb.ModelInferResponse(model_name=req.model_name, id=req.id)
                _int_out(resp, "num_output_tokens", 1)
                if i == n - 1:
                    _int_out(resp, "num_input_tokens", int(ids.size))
                    resp.parameters["cached_tokens"].int64_param = 64
                    resp.parameters["worker_id"].string_param = f"w{int(ids[0]) % 2}"
                    resp.parameters["triton_final_response"].bool_param = True
                yield pb.ModelStreamInferResponse(infer_response=resp)


@pytest.fixture
async def frontend() -> AsyncIterator[tuple[str, FakeFrontend]]:
    server = grpc.aio.server()
    fake = FakeFrontend()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", fake
    finally:
        await server.stop(None)


def test_build_request_shapes() -> None:
    req = build_request("r1", "m", np.array([5, 6, 7], dtype=np.int32), 9)
    names = [i.name for i in req.inputs]
    assert names == ["input_ids", "sampling_parameters", "stream"]
    assert req.inputs[0].datatype == "INT32" and list(req.inputs[0].shape) == [3]
    assert np.frombuffer(req.raw_input_contents[0], "<i4").tolist() == [5, 6, 7]
    sp = json.loads(req.raw_input_contents[1][4:])
    assert sp == {"max_tokens": 9, "ignore_eos": True, "temperature": 0.0}
    assert [o.name for o in req.outputs] == ["num_output_tokens"]


def test_finish_tokens_delta_and_cumulative() -> None:
    r = RequestRecord(0, 0.0, expected_output_tokens=3)
    r.chunks = [(0.0, 1), (0.1, 1), (0.2, 1)]
    finish_tokens(r)
    assert r.output_tokens == 3
    r.chunks = [(0.0, 1), (0.1, 2), (0.2, 3)]  # cumulative counts
    finish_tokens(r)
    assert r.output_tokens == 3


async def test_driver_replays_on_schedule_and_records(frontend: tuple[str, FakeFrontend]) -> None:
    addr, fake = frontend
    drv = Driver(DriverConfig(addr, "", time_scale=10.0, channels=2))
    try:
        assert await drv.served_model(timeout_s=5) == "m"
    finally:
        await drv.close()
    drv = Driver(DriverConfig(addr, "m", time_scale=10.0, channels=2))
    reqs = [
        TraceRequest(0, 0.0, 100, 4),
        TraceRequest(1, 1.0, 200, 1),
        TraceRequest(2, 2.0, 2000, 3),  # the fake refuses prompts over 1000 tokens
    ]
    try:
        await drv.wait_ready(timeout_s=5)
        recs = await drv.run(reqs, lambda r: np.full(r.input_length, r.index + 1, dtype=np.int32))
    finally:
        await drv.close()
    assert [s[0] for s in fake.seen] == ["replay-0", "replay-1", "replay-2"]
    assert fake.seen[0][1].size == 100 and fake.seen[0][2]["max_tokens"] == 4
    r0, r1, r2 = recs
    assert r0.ok and r1.ok and not r2.ok
    assert r2.error is not None and "prompt too long" in r2.error
    assert (r0.output_tokens, r0.prompt_tokens, r0.cached_tokens, r0.worker_id) == (4, 100, 64, "w1")
    assert r1.output_tokens == 1 and math.isnan(r1.itl) and r1.worker_id == "w0"
    assert 0 < r0.ttft <= r0.e2e and r0.itl > 0
    # arrivals 1 trace second apart at time scale 10 -> 0.1 s apart on the wall
    assert r1.sent_s - r0.sent_s == pytest.approx(0.1, abs=0.05)
    assert max(r.sent_s - r.scheduled_s for r in recs) < 0.05


async def test_wait_ready_times_out_with_reason(frontend: tuple[str, FakeFrontend]) -> None:
    addr, _ = frontend
    drv = Driver(DriverConfig(addr, "other"))
    try:
        with pytest.raises(TimeoutError, match="model not ready"):
            await drv.wait_ready(timeout_s=0.6)
    finally:
        await drv.close()


async def test_unreachable_frontend_records_unavailable() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    drv = Driver(DriverConfig(f"127.0.0.1:{port}", "m", request_timeout_s=2.0, channels=1))
    try:
        recs = await drv.run([TraceRequest(0, 0.0, 10, 2)], lambda r: np.ones(10, dtype=np.int32))
    finally:
        await drv.close()
    assert not recs[0].ok and recs[0].error is not None
    assert recs[0].error.split(":")[0] in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
