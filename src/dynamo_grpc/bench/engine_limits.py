"""This machine's limits for the torch engine: memory bandwidth, and matmul speed on the model's shapes.

A decode step reads every weight once for a few rows, so its floor is weight bytes ÷ read bandwidth;
prefill (and a decode step of many rows) is matmul-bound, so its ceiling is the GEMM GFLOP/s at the model's
shapes. Each format of ``engines/torch/linear.py`` is timed on the same shapes, with the current thread
setting, and so is ``fp32-blocks``: the default fp32 path's block kernels (``exact_gemv.py``, ``block_gemm.py``)
on Q4_1 blocks of the same shape, where the C kernels can be built.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from dynamo_grpc.engines.torch.exact_gemv import ExactBlocks, kernels
from dynamo_grpc.engines.torch.linear import Dense, Int4, Int8, Linear, Q4Blocks


def _best(fn: Callable[[], object], reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def bandwidth(mib: int = 256, reps: int = 5) -> dict[str, float]:
    """GB/s of a large copy (bytes read + written) and of a read-only sum, best of ``reps``."""
    a = torch.ones(mib << 18, dtype=torch.float32)  # mib MiB
    b = torch.empty_like(a)
    n = a.numel() * 4
    return {
        "copy_gb_s": 2 * n / _best(lambda: b.copy_(a), reps) / 1e9,
        "read_gb_s": n / _best(lambda: a.sum(), reps) / 1e9,
        "buffer_mib": float(mib),
    }


def matmuls(
    shapes: dict[str, tuple[int, int]], rows: tuple[int, ...] = (1, 32, 256), reps: int = 3
) -> list[dict[str, Any]]:
    """GFLOP/s (and weight GB/s) of ``x[M,K] @ w[N,K].T`` per format, shape and row count."""
    g = torch.Generator().manual_seed(0)
    out: list[dict[str, Any]] = []
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, generator=g) * 0.05
        formats: dict[str, tuple[Linear, torch.dtype]] = {
            "fp32": (Dense(w), torch.float32),
            "bf16": (Dense(w.bfloat16()), torch.bfloat16),
            "int8": (Int8(w), torch.bfloat16),
            "int4": (Int4(Q4Blocks.quantize(w)), torch.bfloat16),
        }
        lib = kernels()
        if lib is not None:  # the fp32 default: Q4_1 blocks, weights rebuilt in fp32 (any rows)
            formats["fp32-blocks"] = (ExactBlocks(lib, Q4Blocks.quantize(w)), torch.float32)
        for fmt, (lin, dt) in formats.items():
            for m in rows:
                x = torch.randn(m, k, generator=g).to(dt)
                t = _best(lambda lin=lin, x=x: lin(x), reps)  # type: ignore[misc]
                out.append(
                    {
                        "shape": name, "n": n, "k": k, "rows": m, "format": fmt, "seconds": t,
                        "gflop_s": 2 * m * n * k / t / 1e9, "weight_gb_s": lin.nbytes / t / 1e9,
                    }
                )  # fmt: skip
    return out


def model_shapes(hidden: int, inter: int, q_out: int, kv_out: int, vocab: int) -> dict[str, tuple[int, int]]:
    """The fused matmuls of one layer, and the vocabulary projection."""
    return {
        "qkv": (q_out + 2 * kv_out, hidden),
        "o": (hidden, q_out),
        "gate_up": (2 * inter, hidden),
        "down": (hidden, inter),
        "lm_head": (vocab, hidden),
    }


@torch.inference_mode()
def measure(cfg: Any, with_matmuls: bool = True) -> dict[str, Any]:
    shapes = model_shapes(
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
        cfg.vocab_size,
    )
    res: dict[str, Any] = {"threads": torch.get_num_threads(), "bandwidth": bandwidth()}
    if with_matmuls:
        res["matmuls"] = matmuls(shapes)
    return res
