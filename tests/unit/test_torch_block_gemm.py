"""The many-row block GEMM (``block_gemm.py``): the dense path's fp32 weights, read from the file's blocks.

Unit tests hold the kernel to torch's matmul on the dequantised weights (one-hot rows read single weights
back bit for bit; random rows agree to fp32 summation noise); the slow test drives 32 concurrent requests
of the default model through it and compares their greedy tokens with the dense path's.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from dynamo_grpc.engines.base import EngineRequest, SamplingParams
from dynamo_grpc.engines.torch import TorchEngine, block_gemm
from dynamo_grpc.engines.torch.decode_step import DecodeStack
from dynamo_grpc.engines.torch.exact_gemv import EXACT_ROWS, ExactBlocks, Q8Blocks
from dynamo_grpc.engines.torch.kv_cache import KvCache
from dynamo_grpc.engines.torch.linear import Q4Blocks
from dynamo_grpc.engines.torch.model import AttnBatch, DecodeGroup, LlamaModel, PrefillSegment
from dynamo_grpc.models import load_model_source
from dynamo_grpc.tokens.chat_template import render_chat
from dynamo_grpc.tokens.tokenizer import Tokenizer

ROWS = (EXACT_ROWS + 1, 12, 13, 32, 64, 300)


def _q4(n: int, k: int, seed: int) -> Q4Blocks:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    d = (torch.rand(n, k // 32, generator=g) * 0.02).half().float()  # a GGUF's fp16 scales, widened
    m = (torch.randn(n, k // 32, generator=g) * 0.1).half().float()
    return Q4Blocks(q, d, m)


def _q4_fp32_scales(n: int, k: int, seed: int) -> Q4Blocks:
    """Scales that are not fp16 values: the weights need gguf's two roundings, not one fma."""
    b = _q4(n, k, seed)
    b.scale = b.scale * (1 + 2**-20)
    return b


def _q8(n: int, k: int, seed: int) -> Q8Blocks:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    return Q8Blocks(q, (torch.rand(n, k // 32, generator=g) * 0.01).half().float())


MAKERS = pytest.mark.parametrize("make", [_q4, _q4_fp32_scales, _q8], ids=["q4_1", "q4_1-fp32-scales", "q8_0"])


@MAKERS
def test_many_rows_compute_with_exactly_the_dense_weights(lib, make) -> None:  # type: ignore[no-untyped-def]
    """One-hot rows read single weights back: each equals gguf's fp32 dequantisation, bit for bit."""
    cols = int(lib.block_gemm_cols())
    blocks = make(3 * cols, 160, 0)
    lin = ExactBlocks(lib, blocks)
    assert lin.panel is not None
    assert lin.f16 == (make is _q4)
    dense = blocks.dequantize()
    for rows in ROWS:
        pick = torch.randint(0, 160, (rows,))
        assert torch.equal(lin(F.one_hot(pick, 160).float()), dense[:, pick].t()), rows


@MAKERS
def test_many_rows_match_torch_matmul_on_the_dequantised_weights(lib, make) -> None:  # type: ignore[no-untyped-def]
    cols = int(lib.block_gemm_cols())
    blocks = make(7 * cols, 576, 1)
    lin = ExactBlocks(lib, blocks)
    w = blocks.dequantize()
    calls = []
    panel = lin.panel
    assert panel is not None
    lin.panel = lambda x: calls.append(x.shape[0]) or panel(x)  # type: ignore[assignment,func-returns-value]
    for rows in ROWS:
        x = torch.randn(rows, 576)
        got = lin(x)
        # only the summation order differs from BLAS (a sequential fma chain over k here): within the
        # rounding bound of an fp32 dot product of length K, |err| <= K * 2^-24 * sum |w x|, of the exact sum
        exact = x.double() @ w.double().t()
        bound = 576 * 2.0**-24 * (x.double().abs() @ w.double().abs().t())
        assert bool(((got.double() - exact).abs() <= bound).all()), rows
        assert torch.allclose(got, x @ w.t(), rtol=1e-4, atol=1e-4), rows
    assert calls == list(ROWS)  # every one of them ran the block GEMM, not the dense copy
    x = torch.randn(EXACT_ROWS, 576)
    assert torch.allclose(lin(x), x @ w.t(), rtol=1e-4, atol=1e-4) and len(calls) == len(ROWS)


def test_a_row_gets_the_same_bits_whatever_shares_its_call(lib) -> None:  # type: ignore[no-untyped-def]
    """Batch composition does not change a row's result (its sum over k is the same chain at any row count)."""
    lin = ExactBlocks(lib, _q4(2 * int(lib.block_gemm_cols()), 576, 2))
    x = torch.randn(64, 576)
    full = lin(x)
    for rows in (9, 20, 33):
        assert torch.equal(lin(x[:rows]), full[:rows]), rows
        assert torch.equal(lin(x[64 - rows :]), full[64 - rows :]), rows


def test_columns_that_do_not_fill_a_panel_run_dense(lib) -> None:  # type: ignore[no-untyped-def]
    cols = int(lib.block_gemm_cols())
    blocks = _q4(cols + 8, 96, 3)
    lin = ExactBlocks(lib, blocks)
    assert lin.panel is None
    x = torch.randn(20, 96)
    assert torch.equal(lin(x), F.linear(x, blocks.dequantize()))
    with pytest.raises(ValueError, match="panel width"):
        block_gemm.PanelBlocks(lib, lin.qs, lin.scale, lin.low, lin.f16)


@MAKERS
def test_the_dense_copy_is_built_only_when_needed_and_is_gguf_s(lib, make) -> None:  # type: ignore[no-untyped-def]
    """With the block GEMM nothing needs the dense fp32 expansion (~400 MiB for the default model) until a
    caller asks for it; then it is exactly ``dequantize()``'s values."""
    blocks = make(2 * int(lib.block_gemm_cols()), 96, 4)
    lin = ExactBlocks(lib, blocks)
    for rows in (1, EXACT_ROWS, 40):
        lin(torch.randn(rows, 96))
    assert lin._w is None
    assert torch.equal(lin.w, blocks.dequantize())


def test_a_model_prefilling_and_decoding_keeps_no_dense_layer_weights(lib) -> None:  # type: ignore[no-untyped-def]
    from tests.unit.test_torch_exact_gemv import _tiny_checkpoint

    model = LlamaModel(_tiny_checkpoint())
    kv = KvCache(model.cfg, 4, 16, torch.float32)
    ids = list(range(3, 40))
    model.forward(
        torch.tensor(ids),
        AttnBatch(torch.arange(37), torch.arange(37), [], [PrefillSegment(0, 37, 0, None)]),
        kv,
        torch.tensor([36]),
    )
    layers = [v for layer in model.layers for v in layer.values() if isinstance(v, ExactBlocks)]
    assert len(layers) == 4 * model.cfg.num_hidden_layers and all(b._w is None for b in layers)


@pytest.mark.parametrize("scales", ["fp16", "fp32"])
@pytest.mark.parametrize("weights", ["dense", "w4a8"])
def test_decode_step_of_many_rows_in_one_c_call_matches_the_layer_by_layer_path(lib, weights: str, scales: str) -> None:  # type: ignore[no-untyped-def]
    """12 decode rows: the one-call stack (decode_step.py) with the block GEMM against torch's layer-by-layer path
    (which runs the same block GEMM per matmul); w4a8 too, whose rows above 8 are fp32 on the same weights.
    Scales that are not fp16 values keep gguf's two roundings in the stack too (each weight's own rule)."""
    from tests.unit.test_torch_exact_gemv import _tiny_checkpoint

    ckpt = _tiny_checkpoint()
    if scales == "fp32":
        for b in ckpt.q4.values():
            b.scale = b.scale * (1 + 2**-20)
    model = LlamaModel(ckpt, weights=weights)
    stack = model.stack
    assert stack is not None and stack.panels is not None and stack.max_rows > 12
    assert stack.panels[:, 3::4].eq(int(scales == "fp16")).all()  # the rebuild rule the C side applies per weight
    bs, n = 16, 12
    prompts = [[3 + i, 17, 99 - i, 42][: 1 + i % 4] + list(range(20, 20 + i)) for i in range(n)]
    runs = []
    for use_stack in (True, False):
        model.stack = stack if use_stack else None
        kv = KvCache(model.cfg, 2 * n, bs, torch.float32)
        for i, p in enumerate(prompts):
            seg = PrefillSegment(0, len(p), 0, None)
            batch = AttnBatch(torch.arange(len(p)), torch.arange(len(p)) + 2 * i * bs, [], [seg])
            model.forward(torch.tensor(p), batch, kv, torch.tensor([0]))
        tables = torch.tensor([[2 * i, 2 * i + 1] for i in range(n)])
        toks = [[7 + i] for i in range(n)]
        logits = []
        for step in range(6):
            pos = torch.tensor([len(p) + step for p in prompts])
            mask = torch.ones(n, 1, 1, 2 * bs, dtype=torch.bool)
            slots = tables[torch.arange(n), pos // bs] * bs + pos % bs
            batch = AttnBatch(pos, slots, [DecodeGroup(0, n, tables, mask, pos + 1)], [])
            lg = model.forward(torch.tensor([t[-1] for t in toks]), batch, kv, torch.arange(n))
            logits.append(lg)
            for i in range(n):
                toks[i].append(int(lg[i].argmax()))
        runs.append((toks, torch.stack(logits)))
    assert runs[0][0] == runs[1][0]
    assert torch.allclose(runs[0][1], runs[1][1], rtol=1e-4, atol=1e-4)


async def _greedy(eng: TorchEngine, prompts: list[list[int]]) -> list[list[int]]:
    async def one(i: int, ids: list[int]) -> list[int]:
        toks: list[int] = []
        async for o in eng.generate(EngineRequest(f"r{i}", ids, SamplingParams(max_tokens=8, temperature=0.0))):
            toks += o.token_ids
        return toks

    await eng.start()
    try:
        return list(await asyncio.gather(*[one(i, ids) for i, ids in enumerate(prompts)]))
    finally:
        await eng.stop()


@pytest.mark.slow
async def test_32_concurrent_requests_decode_like_the_dense_path(lib, model_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The default model, 32 greedy requests at once: decode steps of 32 rows (and the prefill chunks) run
    the block GEMM, and every request's tokens equal those of the dense fp32 path (``block_kernels=False``)."""
    card, tok_json = load_model_source(model_path)
    tok = Tokenizer.from_card(card, tok_json)
    assert card.chat_template
    topics = ["rivers", "bread", "chess", "volcanoes", "owls", "glass", "tides", "maps"]
    prompts = [
        tok.encode(
            render_chat(
                card.chat_template,
                [{"role": "user", "content": f"Tell me {i % 4 + 1} facts about {topics[i % 8]}."}],
                special_tokens=card.special_tokens_map(),
            )
        )
        for i in range(32)
    ]
    seen: list[int] = []  # rows of the block GEMM called from torch (prefill chunks)
    stacked: list[int] = []  # rows of decode steps run as one C call (its matmuls: the block GEMM above 8 rows)
    real, real_run = block_gemm.PanelBlocks.__call__, DecodeStack.run

    def spy(self: block_gemm.PanelBlocks, x: torch.Tensor) -> Any:
        seen.append(x.shape[0])
        return real(self, x)

    def spy_run(self: DecodeStack, x: torch.Tensor, *args: Any) -> None:
        stacked.append(x.shape[0])
        real_run(self, x, *args)

    monkeypatch.setattr(block_gemm.PanelBlocks, "__call__", spy)
    monkeypatch.setattr(DecodeStack, "run", spy_run)
    fast = TorchEngine(model_path, num_blocks=48, max_num_seqs=32, num_threads=1)
    assert fast.stats()["fp32_kernels"] == "block kernels"
    got = await _greedy(fast, prompts)
    assert max(seen) > 32  # the prompts' prefill chunk
    assert 32 in stacked  # decode steps of all 32 rows, their matmuls in the block GEMM
    dense = TorchEngine(model_path, num_blocks=48, max_num_seqs=32, num_threads=1, block_kernels=False)
    seen.clear()
    stacked.clear()
    want = await _greedy(dense, prompts)
    assert not seen and not stacked
    assert all(len(t) > 0 for t in want)
    assert got == want
