"""transport/: reflection and health seen by a real grpcurl, graceful drain, retries."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from dynamo_grpc.transport import ChannelOptions, GrpcServer, open_channel
from dynamo_grpc.v1 import common_pb2, events_pb2, events_pb2_grpc, router_pb2, router_pb2_grpc
from tests.helpers.grpcurl import grpcurl

ROOT = Path(__file__).resolve().parents[2]
EVENTS = "dynamo_grpc.v1.KvEventsService"
ROUTER = "dynamo_grpc.v1.RouterService"


class FlakyRouter(router_pb2_grpc.RouterServiceServicer):
    """Fails the first ``failures`` Route calls with UNAVAILABLE, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def Route(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return router_pb2.RouteResponse(worker=common_pb2.WorkerId(instance_id="w1"), address="x", mode="kv")


@pytest.fixture
async def server() -> AsyncIterator[GrpcServer]:
    srv = GrpcServer()
    from tests.helpers.stream_server import SlowReplay

    srv.add(events_pb2_grpc.add_KvEventsServiceServicer_to_server, SlowReplay(3, 0.01), EVENTS)
    srv.add(router_pb2_grpc.add_RouterServiceServicer_to_server, FlakyRouter(0), ROUTER)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(0)


async def test_grpcurl_lists_and_describes_services(server: GrpcServer) -> None:
    res = await asyncio.to_thread(grpcurl, server.address, "list")
    assert res.returncode == 0, res.stderr
    services = set(res.stdout.split())
    assert {EVENTS, ROUTER, "grpc.health.v1.Health"} <= services
    desc = await asyncio.to_thread(grpcurl, server.address, "describe", ROUTER)
    assert desc.returncode == 0, desc.stderr
    assert "rpc Route ( .dynamo_grpc.v1.RouteRequest ) returns ( .dynamo_grpc.v1.RouteResponse )" in desc.stdout
    msg = await asyncio.to_thread(grpcurl, server.address, "describe", "dynamo_grpc.v1.KvEventBatch")
    assert "uint64 seq = 3;" in msg.stdout


async def test_grpcurl_health_per_service(server: GrpcServer) -> None:
    res = await asyncio.to_thread(grpcurl, server.address, "grpc.health.v1.Health/Check", data={"service": ROUTER})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["status"] == "SERVING"
    await server.set_serving(False, ROUTER)
    res = await asyncio.to_thread(grpcurl, server.address, "grpc.health.v1.Health/Check", data={"service": ROUTER})
    assert json.loads(res.stdout)["status"] == "NOT_SERVING"
    # the other service is unaffected
    res = await asyncio.to_thread(grpcurl, server.address, "grpc.health.v1.Health/Check", data={"service": EVENTS})
    assert json.loads(res.stdout)["status"] == "SERVING"
    # an unknown service is NOT_FOUND, as the health protocol says
    res = await asyncio.to_thread(grpcurl, server.address, "grpc.health.v1.Health/Check", data={"service": "nope"})
    assert res.returncode != 0 and "NotFound" in res.stderr


async def test_grpcurl_calls_a_streaming_method(server: GrpcServer) -> None:
    res = await asyncio.to_thread(grpcurl, server.address, f"{EVENTS}/Replay", data={"from_seq": 5})
    assert res.returncode == 0, res.stderr
    seqs = [json.loads(chunk)["batch"]["seq"] for chunk in res.stdout.replace("}\n{", "}\x00{").split("\x00")]
    assert seqs == ["6", "7", "8"]


async def test_idempotent_calls_retry_unavailable() -> None:
    flaky = FlakyRouter(failures=2)
    srv = GrpcServer()
    srv.add(router_pb2_grpc.add_RouterServiceServicer_to_server, flaky, ROUTER)
    await srv.start()
    try:
        retrying = open_channel(srv.address, ChannelOptions(idempotent=(f"{ROUTER}/Route",)))
        resp = await router_pb2_grpc.RouterServiceStub(retrying).Route(router_pb2.RouteRequest(model="m"), timeout=5)
        assert resp.worker.instance_id == "w1"
        assert flaky.calls == 3
        await retrying.close()

        flaky.calls, flaky.failures = 0, 1
        plain = open_channel(srv.address)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await router_pb2_grpc.RouterServiceStub(plain).Route(router_pb2.RouteRequest(model="m"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        await plain.close()
    finally:
        await srv.stop(0)


async def test_sigterm_drains_in_flight_stream_and_refuses_new_calls() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.helpers.stream_server", "--batches", "10", "--interval", "0.1",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        address = json.loads(line)["address"]
        channel = open_channel(address)
        stub = events_pb2_grpc.KvEventsServiceStub(channel)
        call = stub.Replay(events_pb2.ReplayRequest(from_seq=0), timeout=30)
        first = await call.read()
        assert first.batch.seq == 1
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        with pytest.raises(grpc.aio.AioRpcError):
            # new RPCs are refused once the server stops accepting
            await events_pb2_grpc.KvEventsServiceStub(open_channel(address)).Replay(
                events_pb2.ReplayRequest(from_seq=100), timeout=5
            ).read()
        rest = []
        while (msg := await call.read()) is not grpc.aio.EOF:
            rest.append(msg.batch.seq)
        assert rest == list(range(2, 11)), "the in-flight stream must finish during the drain"
        assert await call.code() == grpc.StatusCode.OK
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        await channel.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
