"""Decode attention read in place from the paged cache (``paged_attention.py``) against torch's gather + SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynamo_grpc.engines.torch.kv_cache import KvCache
from dynamo_grpc.engines.torch.model import AttnBatch, DecodeGroup, LlamaModel, PrefillSegment
from dynamo_grpc.engines.torch.paged_attention import decode_attention, supported


def _sdpa(q, kc, vc, tables, lens, bs):  # type: ignore[no-untyped-def]
    """The torch path of model.py: gather whole blocks, mask past each row's length."""
    n, nh, hd = q.shape
    nkv = kc.shape[1]
    kb, vb = kc.view(-1, bs * nkv * hd), vc.view(-1, bs * nkv * hd)
    kd = kb.index_select(0, tables.view(-1)).view(n, -1, nkv, hd).transpose(1, 2)
    vd = vb.index_select(0, tables.view(-1)).view(n, -1, nkv, hd).transpose(1, 2)
    mask = (torch.arange(tables.shape[1] * bs).unsqueeze(0) < lens.unsqueeze(1)).view(n, 1, 1, -1)
    out = F.scaled_dot_product_attention(q.view(n, nkv, nh // nkv, hd), kd, vd, attn_mask=mask, scale=hd**-0.5)
    return out.reshape(n, nh, hd)


@pytest.mark.parametrize(("nh", "nkv", "hd"), [(9, 3, 64), (4, 2, 64), (4, 4, 16), (8, 2, 128)])
def test_kernel_attends_like_sdpa_over_scattered_blocks(lib, nh: int, nkv: int, hd: int) -> None:  # type: ignore[no-untyped-def]
    """Rows of different lengths (1 token, under 8, across block edges), blocks scattered in the cache; groups of
    3 and 2 query heads per KV head take the shared-load kernels where AVX-512 is built, 1 and 4 the per-head ones."""
    g = torch.Generator().manual_seed(0)
    bs, nblocks = 16, 40
    kc, vc = torch.randn(nblocks * bs, nkv, hd, generator=g), torch.randn(nblocks * bs, nkv, hd, generator=g)
    lens = torch.tensor([1, 5, 16, 17, 40, 64])
    width = 4
    tables = torch.randperm(nblocks, generator=g)[: len(lens) * width].view(len(lens), width).contiguous()
    # q as model.py hands it over: the first nh heads of a [T, nh + nkv, hd] RoPE output (strided rows)
    q = torch.randn(len(lens), nh + nkv, hd, generator=g)[:, :nh]
    out = torch.full((len(lens), nh, hd), float("nan"))
    decode_attention(lib, q, kc, vc, tables, lens, out, bs, hd**-0.5)
    ref = _sdpa(q.contiguous(), kc, vc, tables, lens, bs)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
    # a row's answer does not depend on the rows beside it
    solo = torch.empty(1, nh, hd)
    decode_attention(lib, q[3:4], kc, vc, tables[3:4].contiguous(), lens[3:4].contiguous(), solo, bs, hd**-0.5)
    assert torch.equal(solo[0], out[3])


def test_kernel_shapes_it_refuses() -> None:
    assert supported(9, 3, 64, torch.float32)
    assert not supported(9, 3, 64, torch.bfloat16)  # bf16 caches keep the torch path
    assert not supported(9, 3, 60, torch.float32)  # head_dim not a multiple of 8
    assert not supported(34, 2, 64, torch.float32)  # 17 query heads per KV head


def test_model_decodes_with_the_kernel_like_with_sdpa(lib) -> None:  # type: ignore[no-untyped-def]
    """Two sequences decoded together through model.forward: the kernel path and the SDPA path (lens=None)."""
    from tests.unit.test_torch_exact_gemv import _tiny_checkpoint

    model = LlamaModel(_tiny_checkpoint())
    assert model.attn_lib is not None
    bs = 16
    kv = KvCache(model.cfg, 6, bs, torch.float32)
    prompts = [[3, 17, 99, 42, 5], list(range(20, 40))]  # the second spans two blocks
    tables = [[0, 1], [2, 3]]
    for p, t in zip(prompts, tables, strict=True):
        batch = AttnBatch(
            torch.arange(len(p)), torch.arange(len(p)) + t[0] * bs, [], [PrefillSegment(0, len(p), 0, None)]
        )
        model.forward(torch.tensor(p), batch, kv, torch.tensor([len(p) - 1]))
    snapshot = ([k.clone() for k in kv.k], [v.clone() for v in kv.v])
    results = []
    for with_lens in (True, False):
        kv.k, kv.v = [k.clone() for k in snapshot[0]], [v.clone() for v in snapshot[1]]
        toks = [[7], [8]]
        logits = []
        for step in range(6):
            pos = [len(p) + step for p in prompts]
            slots = [t[q // bs] * bs + q % bs for t, q in zip(tables, pos, strict=True)]
            lens = torch.tensor(pos) + 1
            tab = torch.tensor(tables)
            mask = (torch.arange(2 * bs).unsqueeze(0) < lens.unsqueeze(1)).view(2, 1, 1, -1)
            dg = DecodeGroup(0, 2, tab, mask, lens if with_lens else None)
            batch = AttnBatch(torch.tensor(pos), torch.tensor(slots), [dg], [])
            lg = model.forward(torch.tensor([toks[0][-1], toks[1][-1]]), batch, kv, torch.tensor([0, 1]))
            logits.append(lg)
            for i in range(2):
                toks[i].append(int(lg[i].argmax()))
        results.append((toks, torch.stack(logits)))
    assert results[0][0] == results[1][0]
    assert torch.allclose(results[0][1], results[1][1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weights", ["dense", "w4a8"])
def test_whole_decode_step_in_c_matches_the_layer_by_layer_path(lib, weights: str) -> None:  # type: ignore[no-untyped-def]
    """decode_step.py runs every layer in one C call; the torch path (stack off) is the reference."""
    from tests.unit.test_torch_exact_gemv import _tiny_checkpoint

    model = LlamaModel(_tiny_checkpoint(), weights=weights)
    assert model.stack is not None and model.stack.mode == (2 if weights == "w4a8" else 0)
    stack = model.stack
    bs = 16
    prompts = [[3, 17, 99, 42, 5], list(range(20, 40)), [9]]
    tables = [[0, 1], [2, 3], [4, 5]]
    runs = []
    for use_stack in (True, False):
        model.stack = stack if use_stack else None
        kv = KvCache(model.cfg, 6, bs, torch.float32)
        for p, t in zip(prompts, tables, strict=True):
            seg = PrefillSegment(0, len(p), 0, None)
            model.forward(
                torch.tensor(p),
                AttnBatch(torch.arange(len(p)), torch.arange(len(p)) + t[0] * bs, [], [seg]),
                kv,
                torch.tensor([0]),
            )
        toks = [[7], [8], [9]]
        logits = []
        for step in range(8):
            pos = [len(p) + step for p in prompts]
            lens = torch.tensor(pos) + 1
            # two groups, as the runner splits decodes by length: the stack joins their tables
            groups = [
                DecodeGroup(0, 2, torch.tensor(tables[:2]), torch.ones(2, 1, 1, 2 * bs, dtype=torch.bool), lens[:2]),
                DecodeGroup(2, 1, torch.tensor([tables[2][:1]]), torch.ones(1, 1, 1, bs, dtype=torch.bool), lens[2:]),
            ]
            slots = [t[q // bs] * bs + q % bs for t, q in zip(tables, pos, strict=True)]
            batch = AttnBatch(torch.tensor(pos), torch.tensor(slots), groups, [])
            lg = model.forward(torch.tensor([t[-1] for t in toks]), batch, kv, torch.arange(3))
            logits.append(lg)
            for i in range(3):
                toks[i].append(int(lg[i].argmax()))
        runs.append((toks, torch.stack(logits), [k.clone() for k in kv.k]))
    assert runs[0][0] == runs[1][0]
    a, b = runs[0][1], runs[1][1]
    if weights == "dense":
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)
    else:  # int8 activations: a last-bit difference can move one value to the next quantisation step
        assert (a - b).norm() / b.norm() < 1e-2
    # the stack wrote the same keys into the same slots
    for ka, kb in zip(runs[0][2], runs[1][2], strict=True):
        assert (ka - kb).norm() <= 1e-2 * kb.norm() and torch.equal(ka == 0, kb == 0)
