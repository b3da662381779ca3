"""The torch engine against transformers' LlamaForCausalLM on the default GGUF (SmolLM2-135M Q4_1).

transformers dequantises the same file itself, so equal logits mean our GGUF reading (Q/K
un-permutation included), RoPE, GQA attention over the paged cache and chunked prefill
are right; equal greedy text means batching, prefix hits and preemption change nothing.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dynamo_grpc.engines.base import EngineRequest, SamplingParams
from dynamo_grpc.engines.torch import TorchEngine
from dynamo_grpc.engines.torch.exact_gemv import ExactBlocks, kernels
from dynamo_grpc.engines.torch.model import LlamaModel
from dynamo_grpc.engines.torch.weights import load_checkpoint
from dynamo_grpc.models import load_model_source
from dynamo_grpc.tokens.chat_template import render_chat
from dynamo_grpc.tokens.tokenizer import Tokenizer
from tests.helpers.engine_steps import last_logits, torch_core

transformers = pytest.importorskip("transformers")
# the transformers reference is slow on a loaded 2-core box: a longer per-test bound than the suite default
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PASSAGE = (
    "The Amazon rainforest covers much of the Amazon basin of South America. The basin encompasses "
    "seven million square kilometres, of which five and a half million are covered by the rainforest. "
    "The region includes territory belonging to nine nations and 3,344 formally acknowledged indigenous "
    "territories. The majority of the forest is contained within Brazil, with 60% of the rainforest, "
    "followed by Peru with 13%, Colombia with 10%, and with minor amounts in Bolivia, Ecuador, French "
    "Guiana, Guyana, Suriname, and Venezuela. "
)
CHATS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a refrigerator works, step by step.",
    "List ten fruits and describe the taste of each one.",
    PASSAGE * 2 + "\nSummarise the text above in detail.",
    "Give me a recipe for pancakes with all the steps.",
]
MAX_NEW = 64


@pytest.fixture(scope="module")
def hf_model(model_path: Path) -> Any:
    torch.set_num_threads(2)
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def chat_ids(model_path: Path) -> list[list[int]]:
    card, tok_json = load_model_source(model_path)
    tok = Tokenizer.from_card(card, tok_json)
    assert card.chat_template
    texts = [
        render_chat(card.chat_template, [{"role": "user", "content": c}], special_tokens=card.special_tokens_map())
        for c in CHATS
    ]
    return [tok.encode(t) for t in texts]


@pytest.fixture(scope="module")
def hf_greedy(hf_model: Any, chat_ids: list[list[int]]) -> list[list[int]]:
    out = []
    for ids in chat_ids:
        with torch.no_grad():
            gen = hf_model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=2, pad_token_id=2,
            )  # fmt: skip
        out.append(gen[0, len(ids) :].tolist())
    return out


@pytest.mark.parametrize("blocks", [True, False], ids=["block-kernels", "dense"])
def test_last_token_logits_match_transformers(model_path: Path, hf_model: Any, blocks: bool) -> None:
    """Both fp32 paths: the file's blocks for few rows (the engine's default when a C compiler is present), dense."""
    model = LlamaModel(load_checkpoint(model_path, keep_q4=blocks, keep_q8=blocks))
    assert isinstance(model.lm_head, ExactBlocks) == (blocks and kernels() is not None)
    core, runner = torch_core(model, 40, 64, 256)  # 700 tokens: three chunks over the cached prefix
    g = torch.Generator().manual_seed(0)
    for n in (1, 63, 64, 65, 700):
        ids = torch.randint(0, model.cfg.vocab_size, (n,), generator=g).tolist()
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0, -1]
        ours, cached = last_logits(core, runner, ids, f"cold{n}")
        assert cached == 0
        assert (ours - ref).abs().max().item() < 1e-3, n
        if n >= 65:  # the same prompt again is served from the prefix cache
            warm, cached = last_logits(core, runner, ids, f"warm{n}")
            assert cached == (n - 1) // 64 * 64
            assert (warm - ref).abs().max().item() < 1e-3, n


async def _generate(eng: TorchEngine, chats: list[list[int]], tag: str) -> list[tuple[list[int], int]]:
    async def one(i: int, ids: list[int]) -> tuple[list[int], int]:
        toks: list[int] = []
        cached = 0
        stream: AsyncIterator[Any] = eng.generate(
            EngineRequest(f"{tag}{i}", ids, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
        )
        async for o in stream:
            toks += o.token_ids
            cached = o.cached_tokens
        return toks, cached

    return list(await asyncio.gather(*[one(i, ids) for i, ids in enumerate(chats)]))


async def test_greedy_matches_transformers_batched_prefix_hit_and_preempted(
    model_path: Path, chat_ids: list[list[int]], hf_greedy: list[list[int]]
) -> None:
    lens = sorted(len(x) for x in chat_ids)
    assert lens[0] < 64 < lens[-1], lens  # mixed lengths, some spanning several blocks
    assert sum(len(x) for x in hf_greedy) > 3 * MAX_NEW  # mostly long answers, not early EOS

    eng = TorchEngine(model_path, num_blocks=64, max_num_batched_tokens=256, num_threads=2)
    if kernels() is not None:  # decodes (1..5 rows) and prefill chunks (block_gemm.py) read the blocks
        assert eng.stats()["fp32_kernels"] == "block kernels"
    await eng.start()
    try:
        cold = await _generate(eng, chat_ids, "cold")
        assert [t for t, _ in cold] == hf_greedy
        warm = await _generate(eng, chat_ids, "warm")
        assert [t for t, _ in warm] == hf_greedy
        assert all(c == (len(ids) - 1) // 64 * 64 for (_, c), ids in zip(warm, chat_ids, strict=True))
        assert any(c > 0 for _, c in warm)
    finally:
        await eng.stop()

    # the longest request alone needs 6 blocks; five at once need ~14: preemption by recompute
    need = max(-(-(len(ids) + MAX_NEW) // 64) for ids in chat_ids)
    small = TorchEngine(model_path, num_blocks=need + 1, max_num_batched_tokens=128, num_threads=2)
    await small.start()
    try:
        pre = await _generate(small, chat_ids, "pre")
        assert small.stats()["preemptions"] > 0
        assert [t for t, _ in pre] == hf_greedy
        assert small.load_metrics().active_blocks == 0
    finally:
        await small.stop()
