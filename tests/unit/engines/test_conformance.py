"""What every Engine must do, whatever runs behind it: the engine-interface conformance suite.

Written against ``dynamo_grpc.engines.base.Engine`` only, through the ``engine_factory`` fixture
(conftest.py), so a new engine (the TensorRT-LLM adapter) passes the same checks by adding a param
there: streaming, cancel frees blocks, request errors raised from inside ``generate`` with their
errors.py class, duplicate client ids, a bounded queue, KV events that agree with
``cached_blocks()``, and load metrics.
"""

from __future__ import annotations

import asyncio

import pytest

from dynamo_grpc import errors
from dynamo_grpc.engines.base import Engine, EngineOutput, EngineRequest, SamplingParams
from dynamo_grpc.events.kv import KvCleared, KvEvent, KvRemoved, KvStored

from .conftest import VOCAB, EngineFactory


def _prompt(n: int, base: int = 2) -> list[int]:
    return [2 + (base + 7 * k) % (VOCAB - 2) for k in range(n)]


def _req(rid: str, n: int, max_tokens: int = 8, base: int = 2, **kw: object) -> EngineRequest:
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, **kw)  # type: ignore[arg-type]
    return EngineRequest(rid, _prompt(n, base), sp)


async def _collect(eng: Engine, req: EngineRequest) -> tuple[list[int], list[EngineOutput]]:
    outs = [o async for o in eng.generate(req)]
    return [t for o in outs for t in o.token_ids], outs


async def _idle(eng: Engine) -> None:
    for _ in range(500):
        m = eng.load_metrics()
        if (m.active_blocks, m.running, m.waiting) == (0, 0, 0):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine did not go idle: {eng.load_metrics()}")


async def test_generate_streams_until_max_tokens_with_usage(engine_factory: EngineFactory) -> None:
    eng = await engine_factory()
    toks, outs = await _collect(eng, _req("a", 10, max_tokens=7))
    assert len(toks) == 7 and all(0 <= t < VOCAB for t in toks)
    assert outs[-1].finish_reason == "length" and all(o.finish_reason is None for o in outs[:-1])
    assert all(o.prompt_tokens == 10 for o in outs)
    again, outs2 = await _collect(eng, _req("b", 10, max_tokens=7))
    assert again == toks  # greedy (and the mocker's hash) is deterministic
    assert outs2[0].cached_tokens == 8  # two full blocks of 4 from the first run
    await _idle(eng)


async def test_closing_the_stream_cancels_and_frees_blocks(engine_factory: EngineFactory) -> None:
    eng = await engine_factory()
    agen = eng.generate(_req("long", 30, max_tokens=200))
    got = 0
    async for out in agen:
        got += len(out.token_ids)
        if got >= 3:
            break
    assert eng.load_metrics().active_blocks > 0
    await agen.aclose()  # type: ignore[attr-defined]
    await _idle(eng)


async def test_cancelling_the_consumer_task_frees_blocks(engine_factory: EngineFactory) -> None:
    eng = await engine_factory()
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in eng.generate(_req("x", 30, max_tokens=200)):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _idle(eng)


@pytest.mark.parametrize(
    ("request_", "error", "text"),
    [
        (EngineRequest("e", []), errors.InvalidArgument, "empty"),
        (EngineRequest("v", [VOCAB]), errors.InvalidArgument, "vocabulary"),
        (EngineRequest("m", [3], SamplingParams(max_tokens=0)), errors.InvalidArgument, "max_tokens"),
        (EngineRequest("t", [3], SamplingParams(top_p=0.0)), errors.InvalidArgument, "top_p"),
        (EngineRequest("b", [3], SamplingParams(logit_bias={5: 101.0})), errors.InvalidArgument, "logit_bias"),
        (EngineRequest("c", _prompt(256)), errors.PromptTooLong, "256"),
        (EngineRequest("k", _prompt(200)), errors.PromptTooLong, "KV cache"),
    ],
)
async def test_request_errors_are_raised_from_inside_generate(
    engine_factory: EngineFactory, request_: EngineRequest, error: type[errors.DynamoError], text: str
) -> None:
    eng = await engine_factory(num_blocks=32)  # 128 tokens of KV, a 256-token context
    agen = eng.generate(request_)  # creating the stream never raises: the first __anext__ does
    with pytest.raises(error, match=text):
        await anext(aiter(agen))
    toks, _ = await _collect(eng, _req("ok", 5, max_tokens=2))  # the engine keeps serving
    assert len(toks) == 2
    await _idle(eng)


async def test_options_an_engine_cannot_honour_are_refused_by_name(engine_factory: EngineFactory) -> None:
    eng = await engine_factory()
    options = {
        "logprobs": {"logprobs": 2},
        "bad_words": {"bad_words": [[5, 6]]},
        "allowed_token_ids": {"allowed_token_ids": [5, 6]},
        "logit_bias": {"logit_bias": {5: 3.0}},
    }
    for name, kw in options.items():
        try:
            toks, _ = await _collect(eng, _req(name, 5, max_tokens=3, **kw))
        except errors.UnsupportedOption as e:
            assert e.option == name and name in e.message
        else:
            assert len(toks) == 3  # honoured
    await _idle(eng)


async def test_duplicate_client_ids_never_fail_or_mix(engine_factory: EngineFactory) -> None:
    eng = await engine_factory()
    (a, outs_a), (b, outs_b) = await asyncio.gather(
        _collect(eng, _req("same", 6, max_tokens=5)), _collect(eng, _req("same", 9, max_tokens=9, base=40))
    )
    assert (len(a), len(b)) == (5, 9)
    assert outs_a[-1].prompt_tokens == 6 and outs_b[-1].prompt_tokens == 9
    await _idle(eng)


async def test_a_full_queue_is_overloaded_and_recovers(engine_factory: EngineFactory) -> None:
    eng = await engine_factory(max_waiting=1, max_num_seqs=1, realtime=True)
    running = eng.generate(_req("run", 5, max_tokens=200))
    assert (await anext(aiter(running))).token_ids
    waiting = asyncio.create_task(_collect(eng, _req("wait", 5, max_tokens=2, base=30)))
    for _ in range(100):
        if eng.load_metrics().waiting == 1:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(errors.Overloaded, match="waiting queue is full"):
        await _collect(eng, _req("more", 5, max_tokens=2, base=60))
    await running.aclose()  # type: ignore[attr-defined]
    toks, _ = await asyncio.wait_for(waiting, 30)
    assert len(toks) == 2
    await _idle(eng)


async def test_kv_events_agree_with_cached_blocks(engine_factory: EngineFactory) -> None:
    eng = await engine_factory(num_blocks=12)  # small: later prompts evict earlier blocks
    events: list[KvEvent] = []
    eng.set_event_sink(events.extend)
    for i in range(6):
        await _collect(eng, _req(f"r{i}", 14, max_tokens=3, base=11 * i))
    await _idle(eng)
    view: dict[int, int | None] = {}
    for ev in events:
        if isinstance(ev, KvStored):
            parent = ev.parent_hash
            for blk in ev.blocks:
                assert blk.block_hash not in view, "stored twice without a removal"
                view[blk.block_hash] = parent
                parent = blk.block_hash
        elif isinstance(ev, KvRemoved):
            for h in ev.block_hashes:
                assert h in view, "removed a block never stored"
                del view[h]
        elif isinstance(ev, KvCleared):
            view.clear()
    assert any(isinstance(ev, KvRemoved) for ev in events)
    dumped = {blk.block_hash for st in eng.cached_blocks() for blk in st.blocks}
    assert dumped == set(view)


async def test_load_metrics_follow_the_requests(engine_factory: EngineFactory) -> None:
    eng = await engine_factory(num_blocks=64, max_num_seqs=1, realtime=True)
    idle = eng.load_metrics()
    assert (idle.active_blocks, idle.total_blocks, idle.running, idle.waiting) == (0, 64, 0, 0)
    agen = eng.generate(_req("busy", 9, max_tokens=200))
    await anext(aiter(agen))
    second = asyncio.create_task(_collect(eng, _req("queued", 5, max_tokens=2, base=50)))
    for _ in range(100):
        m = eng.load_metrics()
        if m.waiting == 1:
            break
        await asyncio.sleep(0.01)
    assert m.running == 1 and m.waiting == 1 and m.active_blocks >= 3
    await agen.aclose()  # type: ignore[attr-defined]
    await asyncio.wait_for(second, 30)
    await _idle(eng)


async def test_stop_ends_in_flight_streams_cancelled(engine_factory: EngineFactory) -> None:
    eng = await engine_factory()
    agen = eng.generate(_req("a", 8, max_tokens=10_000))
    first = await anext(aiter(agen))
    assert first.finish_reason is None
    await eng.stop()
    rest = [o async for o in agen]
    assert rest and rest[-1].finish_reason == "cancelled"
    assert eng.load_metrics().active_blocks == 0
