"""A decode worker that pulls KV first reserves the blocks it goes into; with none free it waits for them,
and falls back to a local prefill only when the lease would expire first.

Two real workers in this process (mocker engines, real gRPC servers on 127.0.0.1, no Consul): a prefill
worker leases a prompt's blocks, the decode worker's Decode(kv_handle) reserves, pulls, continues. The
decoder's cache is filled by hand (a reservation held by the test, as a long pull would hold it) to
show the wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from dynamo_grpc.engines.core.driver import CoreEngine
from dynamo_grpc.engines.mocker import MockerConfig, MockerEngine
from dynamo_grpc.models import ModelCard
from dynamo_grpc.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from dynamo_grpc.worker.app import WorkerApp, WorkerSettings

VOCAB, BLOCK = 96, 16
CARD = ModelCard(
    name="tiny", context_length=4096, tokenizer_sha256="", vocab_size=VOCAB, num_layers=2, num_kv_heads=2,
    head_dim=8, kv_dtype="bfloat16",
)  # fmt: skip


async def _worker(role: str, blocks: int, lease_s: float) -> WorkerApp:
    cfg = MockerConfig(
        block_size=BLOCK, vocab_size=VOCAB, num_gpu_blocks=blocks, seed=5, speedup_ratio=100.0,
        kv_lease_seconds=lease_s,
    )  # fmt: skip
    settings = WorkerSettings(register=False, consul="", metrics_port=None, role=role, engine_name="mocker")
    app = WorkerApp(MockerEngine(cfg), CARD, b"{}", settings)
    await app.start()
    return app


@pytest.fixture
async def pair() -> AsyncIterator[tuple[WorkerApp, WorkerApp]]:
    prefill = await _worker("prefill", 64, lease_s=3.0)
    decode = await _worker("decode", 8, lease_s=30.0)
    try:
        yield prefill, decode
    finally:
        for app in (decode, prefill):
            await app.drain()


PROMPT = [2 + (7 * k) % 90 for k in range(70)]  # 5 blocks (4 full + a partial one)
STOP = common_pb2.StopConditions(max_tokens=4, ignore_eos=True)


async def _prefill_then_decode(prefill: WorkerApp, decode: WorkerApp) -> list[int]:
    async with grpc.aio.insecure_channel(prefill.grpc_address) as pch:
        pre = await worker_pb2_grpc.PrefillServiceStub(pch).Prefill(
            worker_pb2.PrefillRequest(model="tiny", token_ids=PROMPT, stop=STOP)
        )
    req = worker_pb2.DecodeRequest(
        model="tiny", token_ids=PROMPT, stop=STOP, kv_handle=pre.kv_handle, first_token=pre.first_token
    )
    async with grpc.aio.insecure_channel(decode.grpc_address) as dch:
        rest = [t async for r in worker_pb2_grpc.DecodeServiceStub(dch).Decode(req, timeout=30) for t in r.token_ids]
    return [pre.first_token, *rest]


def _hold(engine: CoreEngine, blocks: int) -> object:
    """Take ``blocks`` of the decoder's blocks, as a long pull in flight would."""
    res = engine.reserve_kv([1 + k % 50 for k in range(blocks * BLOCK - 1)])
    assert res is not None and len(res.blocks) == blocks
    return res


async def test_a_pull_waits_for_free_blocks_then_lands_in_them(pair: tuple[WorkerApp, WorkerApp]) -> None:
    prefill, decode = pair
    engine = decode.engine
    assert isinstance(engine, CoreEngine)
    held = _hold(engine, 6)  # 2 of 8 free: the 5-block prompt must wait

    async def free_later() -> None:
        await asyncio.sleep(0.5)
        engine.cancel_reservation(held)  # type: ignore[arg-type]

    freer = asyncio.create_task(free_later())
    tokens = await _prefill_then_decode(prefill, decode)
    await freer
    assert len(tokens) == 4
    assert decode.ctx.pull_fallbacks == 0  # it waited and pulled; it did not prefill locally
    assert engine.lease_counts()["active"] == 0
    core = engine.core
    assert core.kv.pool.num_active == 0 and not core.kv.reservations
    assert core.kv.pool.num_cached >= 4  # the pulled full blocks are in its prefix cache
    assert prefill.engine.lease_counts()["pulled"] == 1  # type: ignore[attr-defined]


async def test_with_no_blocks_before_the_lease_expires_it_prefills_locally(pair: tuple[WorkerApp, WorkerApp]) -> None:
    prefill, decode = pair
    engine = decode.engine
    assert isinstance(engine, CoreEngine)
    held = _hold(engine, 6)

    async def free_after_fallback() -> None:  # the local prefill needs the blocks too
        while decode.ctx.pull_fallbacks == 0:
            await asyncio.sleep(0.05)
        engine.cancel_reservation(held)  # type: ignore[arg-type]

    freer = asyncio.create_task(free_after_fallback())
    tokens = await asyncio.wait_for(_prefill_then_decode(prefill, decode), 20)
    await freer
    assert len(tokens) == 4 and decode.ctx.pull_fallbacks == 1
    counts = prefill.engine.lease_counts()  # type: ignore[attr-defined]
    assert counts["active"] == 0 and counts["pulled"] == 0  # released by the decoder, never pulled
    assert engine.core.kv.pool.num_active == 0 and not engine.core.kv.reservations
