"""MockerEngine through the Engine API: prefix hits, events during decode, cancel, seeds, EOS, limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from dynamo_grpc import errors
from dynamo_grpc.engines.base import EngineOutput, EngineRequest, PromptTooLong, SamplingParams
from dynamo_grpc.engines.mocker import MockerConfig, MockerEngine
from dynamo_grpc.engines.mocker.timing import decode_ms, prefill_ms
from dynamo_grpc.events.kv import KvEvent, KvRemoved, KvStored
from dynamo_grpc.tokens.block_hash import block_hash_list

VOCAB = 49152
EOS = 2


def _config(**kw: object) -> MockerConfig:
    base: dict[str, object] = {
        "block_size": 16,
        "num_gpu_blocks": 256,
        "speedup_ratio": 1e6,
        "vocab_size": VOCAB,
        "eos_token_ids": [EOS],
        "context_length": 2048,
    }
    base.update(kw)
    return MockerConfig(**base)  # type: ignore[arg-type]


@pytest.fixture
async def engine() -> AsyncIterator[MockerEngine]:
    e = MockerEngine(_config())
    await e.start()
    try:
        yield e
    finally:
        await e.stop()


async def _collect(e: MockerEngine, rid: str, prompt: list[int], **sp: object) -> tuple[list[int], EngineOutput]:
    toks: list[int] = []
    last: EngineOutput | None = None
    async for out in e.generate(EngineRequest(rid, prompt, SamplingParams(**sp))):  # type: ignore[arg-type]
        toks += out.token_ids
        last = out
    assert last is not None
    return toks, last


async def test_second_identical_prompt_is_served_from_the_prefix_cache(engine: MockerEngine) -> None:
    prompt = list(range(1000, 1050))  # 3 full blocks of 16 + 2
    _, first = await _collect(engine, "a", prompt, max_tokens=4)
    _, second = await _collect(engine, "b", prompt, max_tokens=4)
    assert first.cached_tokens == 0 and first.prompt_tokens == 50
    assert second.cached_tokens == 48
    assert engine.hit_rate() == pytest.approx(48 / 100)


async def test_events_cover_prompt_and_decode_blocks_with_the_shared_hashes(engine: MockerEngine) -> None:
    events: list[KvEvent] = []
    engine.set_event_sink(events.extend)
    prompt = list(range(300, 340))  # 2 full blocks + 8
    toks, last = await _collect(engine, "r", prompt, max_tokens=40)
    assert last.finish_reason == "length" and len(toks) == 40
    # 80 tokens; the last sampled token's KV is never computed, so blocks 0..3 (64 tokens) are stored
    expected = block_hash_list(prompt + toks, 16)
    chain: list[int] = []
    for ev in events:
        assert isinstance(ev, KvStored)
        assert ev.parent_hash == (chain[-1] if chain else None)
        chain += [b.block_hash for b in ev.blocks]
    assert chain == expected[:4]
    assert len(events) >= 2  # the prompt's blocks, then blocks completed while decoding


async def test_evictions_are_announced_with_the_evicted_hashes() -> None:
    e = MockerEngine(_config(num_gpu_blocks=4, block_size=16))
    events: list[KvEvent] = []
    e.set_event_sink(events.extend)
    await e.start()
    try:
        a = list(range(0, 33))
        await _collect(e, "a", a, max_tokens=1)  # 2 full blocks cached, 3 blocks used
        await _collect(e, "b", list(range(5000, 5049)), max_tokens=1)  # 4 blocks: evicts a's
    finally:
        await e.stop()
    removed = [h for ev in events if isinstance(ev, KvRemoved) for h in ev.block_hashes]
    a_hashes = block_hash_list(a, 16)
    assert sorted(removed) == sorted(a_hashes)
    assert removed == [a_hashes[1], a_hashes[0]]  # tail first
    assert not any(b.block_hash in a_hashes for s in e.cached_blocks() for b in s.blocks)


async def test_closing_the_iterator_frees_the_blocks(engine: MockerEngine) -> None:
    agen = engine.generate(EngineRequest("c", list(range(100)), SamplingParams(max_tokens=10_000)))
    first = await agen.__anext__()
    assert first.token_ids
    assert engine.load_metrics().active_blocks > 0
    await agen.aclose()  # type: ignore[attr-defined]
    m = engine.load_metrics()
    assert (m.active_blocks, m.running, m.waiting) == (0, 0, 0)


async def test_cancelling_the_consumer_task_frees_the_blocks(engine: MockerEngine) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(EngineRequest("t", list(range(64)), SamplingParams(max_tokens=10**6))):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.load_metrics().active_blocks == 0
    assert engine.stats.cancelled == 1


async def test_stop_ends_in_flight_requests_as_cancelled() -> None:
    e = MockerEngine(_config(speedup_ratio=1.0))
    await e.start()
    agen = e.generate(EngineRequest("s", list(range(10)), SamplingParams(max_tokens=10**6)))
    first = asyncio.ensure_future(agen.__anext__())
    await asyncio.sleep(0.01)
    await e.stop()
    out = await asyncio.wait_for(first, 5)
    while out.finish_reason is None:
        out = await agen.__anext__()
    assert out.finish_reason == "cancelled"
    assert e.load_metrics().active_blocks == 0


async def test_tokens_are_deterministic_by_seed() -> None:
    async def run(seed: int, prompt: list[int], req_seed: int | None = None) -> list[int]:
        e = MockerEngine(_config(seed=seed))
        await e.start()
        try:
            return (await _collect(e, "x", prompt, max_tokens=20, seed=req_seed))[0]
        finally:
            await e.stop()

    p = list(range(20))
    assert await run(1, p) == await run(1, p)
    assert await run(1, p) != await run(2, p)
    assert await run(1, p) != await run(1, [*p[:-1], 99])
    # a request seed replaces the prompt as the key: same positions, same tokens
    assert await run(1, p, req_seed=7) == await run(1, [*p[:-1], 99], req_seed=7)
    assert all(0 <= t < VOCAB and t != EOS for t in await run(3, p))


async def test_eos_probability_ignore_eos_and_stop_tokens() -> None:
    e = MockerEngine(_config(eos_probability=1.0))
    await e.start()
    try:
        toks, last = await _collect(e, "eos", [5, 6, 7], max_tokens=10)
        assert toks == [EOS] and last.finish_reason == "stop"
        toks, last = await _collect(e, "ign", [5, 6, 7], max_tokens=10, ignore_eos=True)
        assert len(toks) == 10 and EOS not in toks and last.finish_reason == "length"
        toks, last = await _collect(e, "min", [5, 6, 7], max_tokens=10, min_tokens=3)
        assert len(toks) == 3 and last.finish_reason == "stop"
    finally:
        await e.stop()
    e = MockerEngine(_config())
    await e.start()
    try:
        full, _ = await _collect(e, "a", [1, 2, 3], max_tokens=10)
        toks, last = await _collect(e, "b", [1, 2, 3], max_tokens=10, stop_token_ids=[full[4]])
        assert toks == full[: full.index(full[4]) + 1] and last.finish_reason == "stop"
    finally:
        await e.stop()


async def test_prompts_that_can_never_run_are_refused(engine: MockerEngine) -> None:
    with pytest.raises(PromptTooLong, match="2048"):
        await _collect(engine, "ctx", [1] * 2048, max_tokens=1)
    small = MockerEngine(_config(num_gpu_blocks=2, block_size=16))
    await small.start()
    try:
        with pytest.raises(PromptTooLong, match="KV cache holds 32"):
            await _collect(small, "kv", [1] * 32, max_tokens=1)
        toks, last = await _collect(small, "fits", [1] * 20, max_tokens=100)
        assert last.finish_reason == "length" and 20 + len(toks) == 32  # stopped by the cache size
    finally:
        await small.stop()
    with pytest.raises(errors.InvalidArgument, match="empty"):
        await _collect(engine, "e", [], max_tokens=1)
    with pytest.raises(errors.InvalidArgument, match="vocabulary"):
        await _collect(engine, "v", [VOCAB], max_tokens=1)


async def test_simulated_time_follows_the_timing_model_and_wall_time_keeps_up() -> None:
    e = MockerEngine(_config(speedup_ratio=20.0, num_gpu_blocks=100))
    await e.start()
    try:
        t0 = time.monotonic()
        await _collect(e, "t", list(range(100)), max_tokens=5)
        wall = time.monotonic() - t0
    finally:
        await e.stop()
    # step 1: prefill 100 tokens (7 blocks in use); steps 2-5: one decode each (7 blocks)
    expected = (prefill_ms(100) + 4 * decode_ms(7 / 100)) / 20 / 1000
    assert e.stats.simulated_s == pytest.approx(expected)
    assert wall >= expected - 0.002  # the loop never runs ahead of the model


async def test_many_concurrent_requests_at_high_speedup_all_finish(engine: MockerEngine) -> None:
    results = await asyncio.gather(
        *[_collect(engine, f"r{i}", list(range(i, i + 30)), max_tokens=50) for i in range(100)]
    )
    assert all(len(t) == 50 and last.finish_reason == "length" for t, last in results)
    m = engine.load_metrics()
    assert (m.active_blocks, m.running, m.waiting) == (0, 0, 0)


async def test_reset_prefix_cache_makes_the_next_identical_prompt_cold(engine: MockerEngine) -> None:
    prompt = list(range(2000, 2050))
    await _collect(engine, "a", prompt, max_tokens=4)
    assert engine.reset_prefix_cache()
    _, again = await _collect(engine, "b", prompt, max_tokens=4)
    assert again.cached_tokens == 0
