"""The adapter over the STAND-IN of TensorRT-LLM 1.1's LLM API: what reaches TensorRT-LLM, and what comes back.

Streaming, cancellation and the shared checks are also run by tests/unit/engines/test_conformance.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from dynamo_grpc import errors
from dynamo_grpc.engines.base import EngineDead, EngineRequest, SamplingParams
from dynamo_grpc.engines.trtllm import TrtllmApi, disagg
from dynamo_grpc.engines.trtllm.config import TrtllmConfig
from dynamo_grpc.engines.trtllm.engine import TrtllmEngine
from dynamo_grpc.engines.trtllm.stats import load_from_stats
from dynamo_grpc.events.kv import KvEvent, KvStored
from dynamo_grpc.models.card import ModelCard
from dynamo_grpc.tokens.block_hash import block_hash_list
from dynamo_grpc.v1 import kv_transfer_pb2
from tests.unit.trtllm.standin import tensorrt_llm as standin

from .conftest import EOS, VOCAB, MakeEngine


def _req(rid: str, n: int, max_tokens: int = 6, **sp: object) -> EngineRequest:
    prompt = [2 + (5 * k) % (VOCAB - 2) for k in range(n)]
    return EngineRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **sp))  # type: ignore[arg-type]


async def _tokens(eng: TrtllmEngine, req: EngineRequest) -> list[int]:
    return [t async for o in eng.generate(req) for t in o.token_ids]


def _card() -> ModelCard:
    return ModelCard(name="tiny", context_length=256, tokenizer_sha256="", vocab_size=VOCAB, eos_token_ids=[EOS])


async def test_llm_is_built_with_our_block_size_cache_and_batch(make_engine: MakeEngine) -> None:
    eng = await make_engine(block_size=8, num_blocks=40, max_num_seqs=3, max_num_batched_tokens=128)
    kw = eng.llm_kwargs()
    kv = kw["kv_cache_config"]
    assert (kv.tokens_per_block, kv.max_tokens, kv.enable_block_reuse) == (8, 320, True)
    assert kv.event_buffer_max_size > 0  # without a buffer TensorRT-LLM emits no KV events
    assert (kw["max_batch_size"], kw["max_num_tokens"], kw["max_seq_len"], kw["skip_tokenizer_init"]) == (
        3, 128, 256, True,
    )  # fmt: skip
    assert eng.num_blocks == 40 == eng.load_metrics().total_blocks  # from its "created" event


def test_a_model_without_an_eos_id_is_refused(api: TrtllmApi, checkpoint: Path) -> None:
    card = ModelCard(name="tiny", context_length=256, tokenizer_sha256="", vocab_size=VOCAB)
    with pytest.raises(ValueError, match="names no EOS token id"):
        TrtllmEngine(TrtllmConfig(model=checkpoint, block_size=4), card, api)


@pytest.mark.parametrize("block_size", [0, 1, 48])
def test_a_block_size_it_cannot_use_is_refused(api: TrtllmApi, checkpoint: Path, block_size: int) -> None:
    with pytest.raises(ValueError, match=rf"--block-size {block_size}: .*power of two"):
        TrtllmEngine(TrtllmConfig(model=checkpoint, block_size=block_size), _card(), api)


def test_an_engine_built_with_another_block_size_is_refused(api: TrtllmApi, tmp_path: Path) -> None:
    engine_dir = tmp_path / "engine"
    engine_dir.mkdir()
    (engine_dir / "config.json").write_text(json.dumps({"build_config": {"plugin_config": {"tokens_per_block": 32}}}))
    with pytest.raises(ValueError, match=r"tokens_per_block=32.*block size is 64"):
        TrtllmEngine(TrtllmConfig(model=engine_dir, block_size=64), _card(), api)


def test_a_tensorrt_llm_without_tokens_per_block_is_refused(api: TrtllmApi, checkpoint: Path) -> None:
    class OldKvCacheConfig:  # TensorRT-LLM < 1.1: the block size was a build option, not a KvCacheConfig field
        def __init__(self, *, enable_block_reuse: bool = True, event_buffer_max_size: int = 0) -> None:
            pass

    old = TrtllmApi(api.LLM, api.SamplingParams, OldKvCacheConfig, api.DisaggregatedParams, "0.20.0")
    with pytest.raises(ValueError, match=r"TensorRT-LLM 0\.20\.0: KvCacheConfig\(tokens_per_block=4\).*>= 1\.1"):
        TrtllmEngine(TrtllmConfig(model=checkpoint, block_size=4), _card(), old)


async def test_a_running_block_size_that_differs_kills_the_engine(make_engine: MakeEngine) -> None:
    eng = await make_engine()
    eng._on_stats({"numActiveRequests": 0, "kvCacheStats": {"tokensPerBlock": 32, "maxNumBlocks": 64}})
    with pytest.raises(EngineDead, match="tokens_per_block=32"):
        await _tokens(eng, _req("a", 5))


async def test_kv_events_carry_our_hashes_for_the_tokens(make_engine: MakeEngine) -> None:
    eng = await make_engine()
    events: list[KvEvent] = []
    eng.set_event_sink(events.extend)
    req = _req("a", 13, max_tokens=5)
    out = await _tokens(eng, req)
    for _ in range(200):
        if sum(len(e.blocks) for e in events if isinstance(e, KvStored)) >= 4:
            break
        await asyncio.sleep(0.01)
    announced = [b.block_hash for e in events if isinstance(e, KvStored) for b in e.blocks]
    assert announced == block_hash_list(req.token_ids + out, 4)  # what the router computes for the same tokens
    again = [o async for o in eng.generate(_req("b", 13, max_tokens=2))]
    assert again[0].cached_tokens == 12  # the prompt's 3 full blocks are held


async def test_closing_the_stream_aborts_through_its_handle(make_engine: MakeEngine) -> None:
    eng = await make_engine()
    agen = eng.generate(_req("long", 9, max_tokens=10_000))
    assert (await anext(aiter(agen))).token_ids
    (result,) = eng._active
    await agen.aclose()  # type: ignore[attr-defined]
    assert not eng._active
    final = await asyncio.wait_for(result.aresult(), 5)
    assert final.outputs[0].finish_reason == "cancelled"  # TensorRT-LLM ended it; its blocks are free
    for _ in range(300):
        if eng.load_metrics().active_blocks == 0:
            break
        await asyncio.sleep(0.01)
    assert eng.load_metrics().active_blocks == 0


async def test_logprobs_are_mapped_and_trimmed(make_engine: MakeEngine) -> None:
    eng = await make_engine()
    outs = [o async for o in eng.generate(_req("lp", 5, max_tokens=3, logprobs=2))]
    lps = [lp for o in outs for lp in (o.logprobs or [])]
    toks = [t for o in outs for t in o.token_ids]
    assert [lp.token_id for lp in lps] == toks and all(lp.rank == 1 and len(lp.top) == 2 for lp in lps)
    outs0 = [o async for o in eng.generate(_req("lp0", 5, max_tokens=2, logprobs=0))]
    lps0 = [lp for o in outs0 for lp in (o.logprobs or [])]
    assert len(lps0) == 2 and all(lp.top == [] and lp.rank == 1 for lp in lps0)  # the sampled token's only


def test_its_stats_become_our_load_metrics() -> None:
    stat = {
        "iter": 7, "numActiveRequests": 3, "numQueuedRequests": 2,
        "kvCacheStats": {"maxNumBlocks": 100, "freeNumBlocks": 60, "usedNumBlocks": 40, "tokensPerBlock": 64},
    }  # fmt: skip
    m = load_from_stats(stat, total_blocks=1)
    assert (m.active_blocks, m.total_blocks, m.waiting, m.running) == (40, 100, 2, 3)
    assert load_from_stats({}, total_blocks=9).total_blocks == 9  # before the first iteration


@pytest.mark.parametrize("repeats", [True, False], ids=["gen-only-repeats-first", "gen-only-continues"])
async def test_disaggregated_prefill_then_decode_continues_the_same_sequence(
    make_engine: MakeEngine, repeats: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(standin, "GEN_ONLY_REPEATS_FIRST_TOKENS", repeats)
    prefill, decode = await make_engine(), await make_engine()
    req = _req("d", 11, max_tokens=6)
    whole = await _tokens(prefill, _req("w", 11, max_tokens=6))
    first, opaque = await prefill.prefill(req)
    assert first.token_ids == whole[:1]
    tail = [t async for o in decode.decode(req, opaque) for t in o.token_ids]
    assert first.token_ids + tail == whole  # the first token is not repeated by the generation-only stream
    _, again = await prefill.prefill(_req("d2", 11, max_tokens=50))
    stream = decode.decode(_req("d2", 11, max_tokens=50), again)
    assert (await anext(aiter(stream))).token_ids
    await stream.aclose()  # closing the decode stream aborts the generation-only request
    assert not decode._active
    doc = json.loads(opaque)
    assert doc["format"] == disagg.FORMAT and doc["first_gen_tokens"] == whole[:1] and doc["ctx_request_id"]


async def test_opaque_params_that_are_not_ours_are_refused(make_engine: MakeEngine) -> None:
    eng = await make_engine()
    for bad in (b"\xff\x00", b'{"format": "vllm"}'):
        with pytest.raises(errors.InvalidArgument, match="opaque_params"):
            await anext(aiter(eng.decode(_req("x", 5), bad)))
    stale = json.dumps({"format": disagg.FORMAT, "ctx_request_id": 1, "first_gen_tokens": [3]}).encode()
    with pytest.raises(errors.InvalidArgument, match="TensorRT-LLM refused the request: unknown ctx_request_id"):
        [t async for o in eng.decode(_req("y", 5), stale) for t in o.token_ids]
    assert len(await _tokens(eng, _req("z", 5, max_tokens=2))) == 2  # still serving


def test_opaque_params_ride_on_the_kv_handle() -> None:
    handle = kv_transfer_pb2.KvHandle(handle_id="h")
    if "opaque_params" in kv_transfer_pb2.KvHandle.DESCRIPTOR.fields_by_name:
        disagg.attach(handle, b"abc")
        assert kv_transfer_pb2.KvHandle.FromString(handle.SerializeToString()).opaque_params == b"abc"  # type: ignore[attr-defined]
    else:  # before the disaggregation contract lands the adapter says what is missing
        with pytest.raises(errors.Unimplemented, match="opaque_params"):
            disagg.attach(handle, b"abc")


async def test_stats_handed_over_as_json_text_are_read(make_engine: MakeEngine) -> None:
    eng = await make_engine()
    eng._on_stats(json.dumps({"numActiveRequests": 2, "numQueuedRequests": 1, "kvCacheStats": {"usedNumBlocks": 5}}))
    m = eng.load_metrics()
    assert (m.running, m.waiting, m.active_blocks, m.total_blocks) == (2, 1, 5, 64)
