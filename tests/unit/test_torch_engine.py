"""TorchEngine through the Engine ABC, on a tiny random Llama written to a safetensors directory."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dynamo_grpc import errors
from dynamo_grpc.engines.base import EngineOutput, EngineRequest, PromptTooLong, SamplingParams
from dynamo_grpc.engines.torch import TorchEngine
from dynamo_grpc.events.kv import KvEvent, KvRemoved, KvStored
from dynamo_grpc.tokens.block_hash import block_hash_list
from tests.helpers.tiny_llama import CTX, EOS, VOCAB, make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
async def engine(tiny_dir: Path) -> Iterator[TorchEngine]:
    eng = TorchEngine(tiny_dir, block_size=4, num_blocks=64, max_num_seqs=8, max_num_batched_tokens=32, num_threads=1)
    await eng.start()
    try:
        yield eng  # type: ignore[misc]
    finally:
        await eng.stop()


def _prompt(n: int, base: int = 2) -> list[int]:
    return [2 + (base + 7 * k) % (VOCAB - 2) for k in range(n)]


async def _run(eng: TorchEngine, ids: list[int], rid: str = "r", **sp: object) -> tuple[list[int], list[EngineOutput]]:
    outs = [o async for o in eng.generate(EngineRequest(rid, ids, SamplingParams(**sp)))]  # type: ignore[arg-type]
    return [t for o in outs for t in o.token_ids], outs


async def _idle(eng: TorchEngine) -> None:
    for _ in range(200):
        m = eng.load_metrics()
        if m.running == 0 and m.waiting == 0 and m.active_blocks == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine did not go idle: {eng.load_metrics()}")


def test_card_and_geometry(tiny_dir: Path) -> None:
    eng = TorchEngine(tiny_dir, block_size=4, kv_cache_bytes=1 << 20)
    per_block = 2 * 2 * 4 * 2 * 8 * 4  # k+v, layers, block, kv heads, head dim, fp32
    assert eng.num_blocks == (1 << 20) // per_block
    assert eng.card.block_size == 4 and eng.card.kv_blocks == eng.num_blocks
    assert eng.context_length == CTX and eng.eos_token_ids == frozenset({EOS})
    assert eng.stats()["kv_cache_bytes"] <= 1 << 20
    with pytest.raises(ValueError):
        TorchEngine(tiny_dir, num_blocks=4, kv_cache_bytes=1 << 20)
    with pytest.raises(ValueError):
        TorchEngine(tiny_dir, dtype="int8")


async def test_streams_tokens_until_max_tokens(engine: TorchEngine) -> None:
    toks, outs = await _run(engine, _prompt(10), temperature=0, max_tokens=7, ignore_eos=True)
    assert len(toks) == 7
    assert outs[-1].finish_reason == "length"
    assert all(o.finish_reason is None for o in outs[:-1])
    assert all(o.prompt_tokens == 10 for o in outs)
    await _idle(engine)


async def _first(eng: TorchEngine, req: EngineRequest) -> EngineOutput:
    return await anext(aiter(eng.generate(req)))


async def test_bad_requests_fail_before_any_output(engine: TorchEngine) -> None:
    with pytest.raises(PromptTooLong):
        await _first(engine, EngineRequest("a", _prompt(CTX)))
    with pytest.raises(errors.InvalidArgument):
        await _first(engine, EngineRequest("b", []))
    with pytest.raises(errors.InvalidArgument):
        await _first(engine, EngineRequest("c", [VOCAB]))
    with pytest.raises(errors.InvalidArgument):
        await _first(engine, EngineRequest("d", [3], SamplingParams(max_tokens=0)))
    with pytest.raises(errors.FailedPrecondition, match="adapter"):
        await _first(engine, EngineRequest("e", [3], lora="adapter"))
    await _idle(engine)


async def test_prompt_that_can_never_fit_the_cache(tiny_dir: Path) -> None:
    eng = TorchEngine(tiny_dir, block_size=4, num_blocks=8)
    await eng.start()
    try:
        with pytest.raises(PromptTooLong):
            await _first(eng, EngineRequest("a", _prompt(32)))
        # one that fits stops at the cache's capacity with "length"
        toks, outs = await _run(eng, _prompt(20), temperature=0, max_tokens=100, ignore_eos=True)
        assert outs[-1].finish_reason == "length" and 20 + len(toks) == 32
    finally:
        await eng.stop()


# closing the iterator, cancelling the consumer and stop(): tests/unit/engines/test_conformance.py (every engine)


async def test_seed_makes_sampling_reproducible(engine: TorchEngine) -> None:
    kw = {"temperature": 1.0, "max_tokens": 16, "ignore_eos": True}
    a, _ = await _run(engine, _prompt(6), seed=7, **kw)
    b, _ = await _run(engine, _prompt(6), seed=7, **kw)
    c, _ = await _run(engine, _prompt(6), seed=8, **kw)
    assert a == b
    assert a != c


async def test_prefix_hit_gives_the_same_greedy_output(engine: TorchEngine) -> None:
    ids = _prompt(23, base=11)
    cold, outs_cold = await _run(engine, ids, temperature=0, max_tokens=12, ignore_eos=True)
    warm, outs_warm = await _run(engine, ids, temperature=0, max_tokens=12, ignore_eos=True)
    assert outs_cold[0].cached_tokens == 0
    assert outs_warm[0].cached_tokens == 20
    assert warm == cold
    assert engine.stats()["prefix_hit_tokens"] >= 20


async def test_batched_and_preempted_outputs_match_solo_runs(tiny_dir: Path) -> None:
    prompts = [_prompt(n, base=n) for n in (3, 9, 17, 26, 40)]
    solo_eng = TorchEngine(tiny_dir, block_size=4, num_blocks=128, enable_prefix_caching=False)
    await solo_eng.start()
    try:
        solo = [(await _run(solo_eng, p, temperature=0, max_tokens=24, ignore_eos=True))[0] for p in prompts]
    finally:
        await solo_eng.stop()
    # 5 requests growing to 27..64 tokens need ~58 blocks; 24 blocks force preemption
    eng = TorchEngine(tiny_dir, block_size=4, num_blocks=24, max_num_batched_tokens=16)
    await eng.start()
    try:
        res = await asyncio.gather(
            *[_run(eng, p, f"r{i}", temperature=0, max_tokens=24, ignore_eos=True) for i, p in enumerate(prompts)]
        )
        assert eng.stats()["preemptions"] > 0
        assert [r[0] for r in res] == solo
        await _idle(eng)
    finally:
        await eng.stop()


async def test_events_describe_exactly_the_cached_blocks(engine: TorchEngine) -> None:
    events: list[KvEvent] = []
    engine.set_event_sink(events.extend)
    ids = _prompt(18, base=5)
    toks, _ = await _run(engine, ids, temperature=0, max_tokens=6, ignore_eos=True)
    await _idle(engine)
    stored = [b.block_hash for e in events if isinstance(e, KvStored) for b in e.blocks]
    # 18 prompt + 5 fed outputs = 23 computed tokens: 5 full blocks, hashed over the token stream
    assert stored == block_hash_list((ids + toks)[:20], 4)
    view: set[int] = set()
    for e in events:
        if isinstance(e, KvStored):
            view |= {b.block_hash for b in e.blocks}
        elif isinstance(e, KvRemoved):
            view -= set(e.block_hashes)
    assert view == {b.block_hash for st in engine.cached_blocks() for b in st.blocks}


async def test_logprobs_min_tokens_and_stop_ids(engine: TorchEngine) -> None:
    ids = _prompt(9, base=3)
    toks, outs = await _run(engine, ids, temperature=0, max_tokens=5, logprobs=3, ignore_eos=True)
    lps = [lp for o in outs for lp in (o.logprobs or [])]
    assert [lp.token_id for lp in lps] == toks
    assert all(lp.logprob <= 0 and len(lp.top) == 3 and lp.top[0][0] == lp.token_id for lp in lps)
    first = toks[0]
    stopped, outs = await _run(engine, ids, temperature=0, max_tokens=5, stop_token_ids=[first], ignore_eos=True)
    assert stopped == [first] and outs[-1].finish_reason == "stop"
    held, _ = await _run(engine, ids, temperature=0, max_tokens=5, stop_token_ids=[first], min_tokens=3)
    assert len(held) >= 3 and first not in held[:2]


async def test_safetensors_logits_match_transformers(tiny_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from dynamo_grpc.engines.torch.model import LlamaModel
    from dynamo_grpc.engines.torch.weights import load_checkpoint
    from tests.helpers.engine_steps import last_logits, torch_core

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    core, runner = torch_core(LlamaModel(load_checkpoint(tiny_dir)), 64, 4, 16)
    ids = _prompt(37)
    logits, _ = last_logits(core, runner, ids, "p")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1]
    assert (logits - ref).abs().max().item() < 1e-4
