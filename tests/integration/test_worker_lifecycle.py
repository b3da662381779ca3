"""Worker lifecycle with real processes: SIGTERM drains (finish or hand back), SIGKILL ages out by TTL."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dynamo_grpc.discovery import ConsulSettings, Discovery
from dynamo_grpc.v1 import common_pb2, worker_pb2_grpc
from tests.helpers.consul_dev import ConsulDevProcess, run_consul_dev
from tests.integration.test_worker_serving import MODEL, WorkerProcess, collect, decode_request, start_worker


@pytest.fixture
def consul() -> Iterator[ConsulDevProcess]:
    with run_consul_dev() as agent:
        yield agent


async def _passing(consul: ConsulDevProcess) -> tuple[list[str], dict[str, object]]:
    d = Discovery(ConsulSettings.from_addr(consul.address))
    try:
        snapshot = await asyncio.wait_for(anext(aiter(d.watch("dynamo-worker"))), 10)
        cards = await d.get_model_cards(MODEL)
    finally:
        await d.close()
    return [i.instance_id for i in snapshot], dict(cards.get(MODEL, {}))


async def _wait_not_serving(address: str) -> None:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(200):
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=""))
            if resp.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                return
            await asyncio.sleep(0.02)
    raise AssertionError("worker never reported NOT_SERVING")


async def test_sigterm_finishes_in_flight_refuses_new_and_deregisters(consul: ConsulDevProcess, tmp_path: Path) -> None:
    # speedup 10: ~2 ms per decode step, 600 tokens ≈ 1.3 s, well inside the 10 s grace
    w = start_worker(consul.address, tmp_path, "--speedup-ratio", "10", "--drain-grace", "10")
    try:
        ids, cards = await _passing(consul)
        assert w.info["instance_id"] in ids and w.info["instance_id"] in cards
        async with grpc.aio.insecure_channel(w.address) as ch:
            stub = worker_pb2_grpc.DecodeServiceStub(ch)
            call = stub.Decode(decode_request(list(range(1000, 1100)), 600))
            first = await call.read()
            assert first.token_ids
            w.signal(signal.SIGTERM)
            await _wait_not_serving(w.address)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await collect(stub, decode_request([1, 2, 3], 5))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "draining" in (err.value.details() or "")
            toks = list(first.token_ids)
            last = first
            while (resp := await call.read()) is not grpc.aio.EOF:
                toks += resp.token_ids
                last = resp
            assert len(toks) == 600 and last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert await asyncio.to_thread(w.proc.wait, 15) == 0
        ids, cards = await _passing(consul)
        assert w.info["instance_id"] not in ids and w.info["instance_id"] not in cards
        assert "drained" in w.log()
    finally:
        w.stop()


async def test_sigterm_hands_back_streams_that_outlive_the_grace(consul: ConsulDevProcess, tmp_path: Path) -> None:
    w = start_worker(consul.address, tmp_path, "--speedup-ratio", "2", "--drain-grace", "0.5")
    try:
        async with grpc.aio.insecure_channel(w.address) as ch:
            call = worker_pb2_grpc.DecodeServiceStub(ch).Decode(decode_request(list(range(100)), 5000))
            got = len((await call.read()).token_ids)
            w.signal(signal.SIGTERM)
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                while (resp := await call.read()) is not grpc.aio.EOF:
                    got += len(resp.token_ids)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "handed the request back" in (err.value.details() or "")
            assert 0 < got < 5000 and time.monotonic() - t0 < 8
        assert await asyncio.to_thread(w.proc.wait, 15) == 0
        ids, _ = await _passing(consul)
        assert w.info["instance_id"] not in ids
    finally:
        w.stop()


async def test_sigkill_drops_out_of_the_passing_set_after_the_ttl(consul: ConsulDevProcess, tmp_path: Path) -> None:
    w: WorkerProcess = start_worker(consul.address, tmp_path, "--ttl", "1")
    try:
        ids, _ = await _passing(consul)
        assert w.info["instance_id"] in ids
        w.signal(signal.SIGKILL)
        w.proc.wait(5)
        t0 = time.monotonic()
        while w.info["instance_id"] in (await _passing(consul))[0]:
            assert time.monotonic() - t0 < 10, "still passing 10 s after SIGKILL with a 1 s TTL"
            await asyncio.sleep(0.2)
        _, cards = await _passing(consul)
        for _ in range(50):  # the card's session is invalidated with the check
            if w.info["instance_id"] not in cards:
                break
            await asyncio.sleep(0.1)
            _, cards = await _passing(consul)
        assert w.info["instance_id"] not in cards
    finally:
        w.stop()
