"""``--torch-weights w4a8`` (``w4a8.py``): the file's blocks times int8 activations, llama.cpp's arithmetic."""

from __future__ import annotations

import pytest
import torch

from dynamo_grpc.engines.torch.exact_gemv import ExactBlocks, Q8Blocks
from dynamo_grpc.engines.torch.kv_cache import KvCache
from dynamo_grpc.engines.torch.linear import Q4Blocks
from dynamo_grpc.engines.torch.model import AttnBatch, LlamaModel, PrefillSegment
from dynamo_grpc.engines.torch.w4a8 import MAX_ROWS, W4A8
from dynamo_grpc.engines.torch.weights import UnsupportedModel
from tests.unit.test_torch_exact_gemv import _q4, _q8, _tiny_checkpoint
from tests.unit.test_torch_weights import _logits


def _reference(blocks: Q4Blocks | Q8Blocks, x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q8_1 activations (per 32: d = amax/127, q = round(x/d), s = d * sum q) and the block dot, in fp64."""
    r, k = x.shape
    g = x.view(r, k // 32, 32)
    dx = g.abs().amax(-1) / 127
    inv = torch.where(dx > 0, 1 / dx, torch.zeros_like(dx))
    qx = torch.round(g * inv.unsqueeze(-1))
    sx = dx * qx.sum(-1)
    n = blocks.q.shape[0]
    qw = blocks.q.view(n, k // 32, 32).double()
    dots = torch.einsum("nbj,rbj->rnb", qw, qx.double())  # exact integers
    y = (dots * blocks.scale.double().unsqueeze(0) * dx.double().unsqueeze(1)).sum(-1)
    if isinstance(blocks, Q4Blocks):
        y = y + (blocks.low.double().unsqueeze(0) * sx.double().unsqueeze(1)).sum(-1)
    return y.float()


@pytest.mark.parametrize("make", [_q4, _q8], ids=["q4_1", "q8_0"])
def test_kernel_computes_llama_cpp_q8_dot_products(lib, make) -> None:  # type: ignore[no-untyped-def]
    blocks = make(70, 160, 4)
    lin = W4A8(ExactBlocks(lib, blocks))
    x = torch.randn(MAX_ROWS, 160)
    x[0, :32] = 0  # an all-zero group quantises to zeros, not NaN
    for rows in (1, 2, 3, MAX_ROWS):
        got = lin(x[:rows])
        assert torch.allclose(got, _reference(blocks, x[:rows]), rtol=1e-4, atol=1e-4), rows
        assert torch.equal(got[0], lin(x[:1])[0])  # a row's result does not depend on its batch
    # many rows: the dense fp32 GEMM on the same (dequantised) weights
    many = torch.randn(MAX_ROWS + 1, 160)
    assert torch.equal(lin(many), torch.nn.functional.linear(many, blocks.dequantize()))
    # int8 activations are an approximation of the fp32 product, about 1 % here
    ref = torch.nn.functional.linear(x, blocks.dequantize())
    assert ((lin(x) - ref).norm() / ref.norm()) < 0.02


def test_model_in_w4a8_mode_stays_close_to_fp32(lib) -> None:  # type: ignore[no-untyped-def]
    w4 = LlamaModel(_tiny_checkpoint(), weights="w4a8")
    fp = LlamaModel(_tiny_checkpoint())
    assert isinstance(w4.layers[0]["gate_up"], W4A8) and isinstance(w4.lm_head, W4A8)
    assert w4.nbytes == fp.nbytes  # the same blocks are read; only the arithmetic differs
    logits = []
    for model in (w4, fp):
        kv = KvCache(model.cfg, 4, 16, torch.float32)
        out = []
        for pos, tok in enumerate([3, 17, 99, 42, 5, 7, 11]):
            batch = AttnBatch(
                torch.tensor([pos]), torch.tensor([pos]), [], [PrefillSegment(0, 1, pos, torch.tensor([0]))]
            )
            out.append(model.forward(torch.tensor([tok]), batch, kv, torch.tensor([0]))[0])
        logits.append(torch.stack(out))
    rel = (logits[0] - logits[1]).norm() / logits[1].norm()
    assert 0 < rel < 0.05


def test_w4a8_without_kernels_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dynamo_grpc.engines.torch.model.kernels", lambda: None)
    with pytest.raises(UnsupportedModel, match="w4a8"):
        LlamaModel(_tiny_checkpoint(), weights="w4a8")


async def test_engine_serves_w4a8_from_a_safetensors_model(lib, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """No blocks in the file: layers are quantised to groups of 32 (as int4 does), the KV cache stays fp32."""
    from safetensors.torch import load_file, save_file

    from dynamo_grpc.engines.base import EngineRequest, SamplingParams
    from dynamo_grpc.engines.torch import TorchEngine
    from tests.helpers.tiny_llama import make_tiny_model

    root = make_tiny_model(tmp_path / "fp32")
    # the reference: fp32 on the very weights w4a8 holds (its layers' min/max groups of 32)
    q4root = make_tiny_model(tmp_path / "q4")
    t = load_file(str(root / "model.safetensors"))
    for k, v in t.items():
        if v.dim() == 2 and k.startswith("model.layers."):
            t[k] = Q4Blocks.quantize(v).dequantize()
    save_file(t, str(q4root / "model.safetensors"))
    ref = TorchEngine(q4root, block_size=4, num_blocks=32, num_threads=1)
    eng = TorchEngine(root, block_size=4, num_blocks=32, num_threads=1, weights="w4a8")
    assert eng.weights == "w4a8" and eng.kv.k[0].dtype == torch.float32
    assert isinstance(eng.model.layers[0]["qkv"], W4A8)
    with pytest.raises(ValueError, match="w4a8"):
        TorchEngine(root, num_blocks=8, weights="w4a8", dtype="bfloat16")
    cos = torch.nn.functional.cosine_similarity
    for n in (3, 12):  # the int8-activation kernel (few rows) and the dense fp32 GEMM (many)
        ids = [2 + (5 * k) % 90 for k in range(n)]
        assert cos(_logits(ref, ids), _logits(eng, ids), dim=0) > (0.995 if n == 3 else 0.99999)
    await eng.start()
    try:
        sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        toks = [t async for o in eng.generate(EngineRequest("r", ids, sp)) for t in o.token_ids]
        assert len(toks) == 6 and all(0 <= t < 96 for t in toks)
    finally:
        await eng.stop()
    assert eng.load_metrics().active_blocks == 0
