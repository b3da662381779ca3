"""The fp32 block kernels (``exact_gemv.py``): same weights as the dense fp32 path, read from the file's blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynamo_grpc.engines.torch import exact_gemv
from dynamo_grpc.engines.torch.exact_gemv import EXACT_ROWS, ExactBlocks, Q8Blocks
from dynamo_grpc.engines.torch.kv_cache import KvCache
from dynamo_grpc.engines.torch.linear import Dense, Q4Blocks
from dynamo_grpc.engines.torch.model import AttnBatch, LlamaModel, PrefillSegment
from dynamo_grpc.engines.torch.weights import Checkpoint, LlamaConfig, q8_0_blocks


def _q4(n: int, k: int, seed: int) -> Q4Blocks:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    # scales as a GGUF stores them: fp16 values widened to fp32
    d = (torch.rand(n, k // 32, generator=g) * 0.02).half().float()
    m = (torch.randn(n, k // 32, generator=g) * 0.1).half().float()
    return Q4Blocks(q, d, m)


def _q8(n: int, k: int, seed: int) -> Q8Blocks:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    return Q8Blocks(q, (torch.rand(n, k // 32, generator=g) * 0.01).half().float())


@pytest.mark.parametrize("make", [_q4, _q8], ids=["q4_1", "q8_0"])
def test_kernel_computes_with_exactly_the_dense_weights(lib, make) -> None:  # type: ignore[no-untyped-def]
    """One-hot inputs read single weights back: every value equals the fp32 dequantisation, bit for bit."""
    blocks = make(80, 96, 0)
    lin = ExactBlocks(lib, blocks)
    dense = blocks.dequantize()
    for rows in range(1, EXACT_ROWS + 1):
        cols = torch.randint(0, 96, (rows,))
        x = F.one_hot(cols, 96).float()
        assert torch.equal(lin(x), dense[:, cols].t()), rows


@pytest.mark.parametrize("make", [_q4, _q8], ids=["q4_1", "q8_0"])
def test_kernel_matches_dense_fp32_matmul_for_any_rows(lib, make) -> None:  # type: ignore[no-untyped-def]
    blocks = make(200, 576, 1)
    lin = ExactBlocks(lib, blocks)
    dense = Dense(blocks.dequantize())
    for rows in (1, 3, EXACT_ROWS, EXACT_ROWS + 1, 40):
        # seeded: the global generator's state depends on which tests ran before (a sum of 576 products that
        # cancels to ~0 can miss atol=1e-5 by summation order alone; seen once in a run of three test files)
        x = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows))
        ref = dense(x)
        got = lin(x)
        if rows > EXACT_ROWS:  # 200 columns fill no whole panel (block_gemm.py): the dense copy, the same GEMM
            assert torch.equal(got, ref)
        else:  # only the summation order differs from BLAS
            assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5), rows
    # what a decode step reads: ~5.3x fewer bytes (Q4_1) / ~3.8x (Q8_0) than fp32
    assert lin.nbytes < dense.nbytes / 3.5


def test_q8_0_bytes_decode_like_gguf() -> None:
    gguf = pytest.importorskip("gguf")
    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).reshape(8, 64)
    assert torch.equal(q8_0_blocks(raw, 8, 64).dequantize(), torch.from_numpy(np.ascontiguousarray(ref)))


def test_missing_compiler_falls_back_to_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exact_gemv, "_tried", False)
    monkeypatch.setattr(exact_gemv, "_lib", None)
    monkeypatch.setattr(exact_gemv, "_status", "not loaded")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert exact_gemv.kernels() is None
    assert "no C compiler" in exact_gemv.status() and "/nonexistent/cc" in exact_gemv.status()
    monkeypatch.setattr(exact_gemv, "_tried", False)
    monkeypatch.setenv("DYN_TORCH_KERNELS", "off")
    assert exact_gemv.kernels() is None and "DYN_TORCH_KERNELS" in exact_gemv.status()


def _tiny_checkpoint() -> Checkpoint:
    """A 2-layer Llama whose matmul weights are Q4_1 blocks and whose tied vocabulary table is Q8_0."""
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=128,
    )  # fmt: skip
    q8 = _q8(256, 64, 9)
    tensors = {"model.embed_tokens.weight": q8.dequantize(), "model.norm.weight": torch.ones(64)}
    q4 = {}
    shapes = {
        "self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
        "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
        "mlp.down_proj": (64, 128),
    }  # fmt: skip
    for i in range(2):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = torch.ones(64)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(64)
        for j, (name, (n, k)) in enumerate(shapes.items()):
            q4[p + name + ".weight"] = _q4(n, k, 10 * i + j)
    return Checkpoint(cfg, tensors, None, q4, {"model.embed_tokens.weight": q8})


def test_model_with_block_kernels_decodes_like_dense(lib, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The same checkpoint with and without kernels: same greedy tokens, logits to fp32 summation noise."""
    fast = LlamaModel(_tiny_checkpoint())
    monkeypatch.setattr("dynamo_grpc.engines.torch.model.kernels", lambda: None)
    slow = LlamaModel(_tiny_checkpoint())
    assert isinstance(fast.lm_head, ExactBlocks) and isinstance(fast.layers[0]["qkv"], ExactBlocks)
    assert isinstance(slow.lm_head, Dense) and isinstance(slow.layers[0]["qkv"], Dense)
    assert fast.nbytes < slow.nbytes / 3.5
    outs = []
    for model in (fast, slow):
        kv = KvCache(model.cfg, 4, 16, torch.float32)
        ids = [3, 17, 99, 42, 5]
        toks: list[int] = []
        logits = []
        for pos in range(12):  # prompt token by token, then greedy: every step is one row (the kernel path)
            tok = ids[pos] if pos < len(ids) else toks[-1]
            batch = AttnBatch(torch.tensor([pos]), torch.tensor([pos]), [], [PrefillSegment(0, 1, 0, None)])
            if pos:
                batch.prefills = [PrefillSegment(0, 1, pos, torch.tensor([0]))]
            lg = model.forward(torch.tensor([tok]), batch, kv, torch.tensor([0]))[0]
            logits.append(lg)
            if pos >= len(ids) - 1:
                toks.append(int(lg.argmax()))
        outs.append((toks, torch.stack(logits)))
    assert outs[0][0] == outs[1][0]
    assert torch.allclose(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-4)


def test_q4_1_with_fp32_scales_keeps_two_roundings(lib) -> None:  # type: ignore[no-untyped-def]
    """One fma rebuilds a weight exactly only for fp16 scales (a GGUF's); other scales keep gguf's two roundings."""
    blocks = _q4(64, 96, 3)
    assert ExactBlocks(lib, blocks).f16
    blocks.scale = blocks.scale * (1 + 2**-20)  # no longer fp16 values: d * q is rounded
    lin = ExactBlocks(lib, blocks)
    assert not lin.f16
    dense = blocks.dequantize()
    for rows in (1, 5, EXACT_ROWS):
        cols = torch.randint(0, 96, (rows,))
        assert torch.equal(lin(F.one_hot(cols, 96).float()), dense[:, cols].t()), rows
