"""Weight formats of the torch engine (``--torch-weights``): what each computes, and what it refuses."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from dynamo_grpc.engines.base import EngineRequest, SamplingParams
from dynamo_grpc.engines.torch import TorchEngine
from dynamo_grpc.engines.torch.linear import GEMV_ROWS, Dense, Int4, Int8, Q4Blocks, make_linear
from dynamo_grpc.engines.torch.weights import q4_1_blocks
from tests.helpers.tiny_llama import VOCAB, make_tiny_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama-w"))


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def test_q4_1_bytes_decode_like_gguf() -> None:
    """Our Q4_1 block split reproduces the gguf package's dequantisation exactly (on bytes it quantised)."""
    gguf = pytest.importorskip("gguf")
    w = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    raw = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_1)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1).reshape(8, 64)
    blocks = q4_1_blocks(raw, 8, 64)
    assert blocks.q.max() <= 15
    assert torch.equal(blocks.dequantize(), torch.from_numpy(np.ascontiguousarray(ref)))


def test_int4_and_int8_compute_the_weight_they_hold() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 64, generator=g)
    x = torch.randn(3, 64, generator=g).bfloat16()
    blocks = Q4Blocks.quantize(w)
    # min/max rounding: every weight within half a step of its group's scale
    step = blocks.scale.repeat_interleave(32, dim=1)
    assert bool(((blocks.dequantize() - w).abs() <= step / 2 + 1e-6).all())
    for lin, held in ((Int4(blocks), blocks.dequantize()), (Int8(w), w)):
        ref = x.float() @ held.t()
        few = lin(x)  # weight-only kernel
        many = lin(x.repeat(GEMV_ROWS, 1))[:3]  # dense bf16 copy of the same values
        assert few.dtype == torch.bfloat16
        assert _rel_err(few, ref) < 0.02 and _rel_err(many, ref) < 0.02
        assert _rel_err(few, many) < 0.02
    # bytes a decode step reads: int4 is ~1/7 of fp32, int8 ~1/4
    dense = Dense(w)
    assert Int4(blocks).nbytes < dense.nbytes / 6 and Int8(w).nbytes < dense.nbytes / 3.5


def test_make_linear_refuses_unknown_format() -> None:
    with pytest.raises(ValueError, match="int3"):
        make_linear("int3", torch.zeros(4, 32), None, torch.float32)
    with pytest.raises(ValueError, match="divisible by 32"):
        make_linear("int4", None, Q4Blocks(torch.zeros(4, 48, dtype=torch.uint8), torch.ones(4, 1), torch.zeros(4, 1)),
                    torch.bfloat16)  # fmt: skip


def _logits(eng: TorchEngine, ids: list[int]) -> torch.Tensor:
    from dynamo_grpc.engines.torch.model import AttnBatch, PrefillSegment

    n = len(ids)
    batch = AttnBatch(torch.arange(n), torch.arange(n), [], [PrefillSegment(0, n, 0, None)])
    return eng.model.forward(torch.tensor(ids), batch, eng.kv, torch.tensor([n - 1]))[0]


@pytest.fixture(scope="module")
def tiny_q4_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its layers' matmul weights replaced by their int4 (min/max, groups of 32) values."""
    from safetensors.torch import load_file, save_file

    out = make_tiny_model(tmp_path_factory.mktemp("tiny-llama-q4"))
    t = load_file(str(tiny_dir / "model.safetensors"))
    for k, v in t.items():
        if v.dim() == 2 and k.startswith("model.layers."):  # the vocabulary table stays 8-bit in int4 mode
            t[k] = Q4Blocks.quantize(v).dequantize()
    save_file(t, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
async def test_engine_modes_serve_and_compute_their_weights(tiny_dir: Path, tiny_q4_dir: Path, mode: str) -> None:
    """Each mode's logits match fp32 on the weights it holds (bf16 rounding aside); it serves requests."""
    # random Gaussian weights lose ~10% to 4 bits, so int4 is compared with fp32 on the int4 values
    ref = TorchEngine(tiny_q4_dir if mode == "int4" else tiny_dir, block_size=4, num_blocks=32, num_threads=1)
    eng = TorchEngine(tiny_dir, block_size=4, num_blocks=32, num_threads=1, weights=mode)
    assert eng.weights == mode and eng.kv.k[0].dtype == torch.bfloat16
    assert eng.stats()["weight_bytes"] < ref.stats()["weight_bytes"] / (1.9 if mode == "bf16" else 2.5)
    cos = torch.nn.functional.cosine_similarity
    for n in (3, 12):  # the weight-only kernels (few rows) and the dense bf16 copy (many)
        ids = [2 + (5 * k) % (VOCAB - 2) for k in range(n)]
        assert cos(_logits(ref, ids), _logits(eng, ids), dim=0) > (0.995 if mode == "int4" else 0.98)
    await eng.start()
    try:
        sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
        toks = [t async for o in eng.generate(EngineRequest("r", ids, sp)) for t in o.token_ids]
        assert len(toks) == 6 and all(0 <= t < VOCAB for t in toks)
    finally:
        await eng.stop()
    assert eng.load_metrics().active_blocks == 0


def test_engine_refuses_conflicting_or_unknown_weights(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match="weights must be one of"):
        TorchEngine(tiny_dir, num_blocks=8, weights="q2")
    with pytest.raises(ValueError, match="conflicts with dtype='float32'"):
        TorchEngine(tiny_dir, num_blocks=8, weights="int4", dtype="float32")
    # the default stays the exact fp32 path
    assert TorchEngine(tiny_dir, num_blocks=8).weights == "fp32"


def test_worker_refuses_torch_weights_for_the_mocker() -> None:
    from dynamo_grpc.worker.main import build_engine, build_parser

    args: argparse.Namespace = build_parser().parse_args(["--engine", "mocker", "--torch-weights", "int4"])
    with pytest.raises(ValueError, match="--torch-weights is a torch flag"):
        build_engine(args)


def test_worker_reads_torch_weights_from_its_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from dynamo_grpc.worker.main import build_parser

    monkeypatch.setenv("DYN_TORCH_WEIGHTS", "int4")
    assert build_parser().parse_args(["--engine", "torch"]).torch_weights == "int4"


def test_run_local_refuses_torch_weights_for_the_mocker(capsys: pytest.CaptureFixture[str]) -> None:
    from dynamo_grpc.launch.run_local import main

    with pytest.raises(SystemExit) as e:
        main(["--engine", "mocker", "--torch-weights", "int4"])
    assert e.value.code == 2 and "--torch-weights is a torch flag" in capsys.readouterr().err


def test_worker_torch_kernels_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """--torch-kernels off reaches the engine as block_kernels=False; the mocker refuses the flag by name."""
    from dynamo_grpc.worker.main import build_engine, build_parser

    assert build_parser().parse_args(["--engine", "torch"]).torch_kernels is None  # auto
    monkeypatch.setenv("DYN_TORCH_KERNELS", "off")
    assert build_parser().parse_args(["--engine", "torch"]).torch_kernels == "off"
    args = build_parser().parse_args(["--engine", "mocker", "--torch-kernels", "off"])
    with pytest.raises(ValueError, match="--torch-kernels is a torch flag"):
        build_engine(args)
