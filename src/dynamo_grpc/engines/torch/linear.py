"""Weight formats for the model's matmuls: dense, int8 per channel, int4 in groups of 32.

A decode step on CPU reads every weight once for a handful of rows, so its time is bytes of
weights ÷ memory bandwidth; smaller weights are the lever. The quantised formats use torch's
weight-only CPU kernels (``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``), which are
fast with bfloat16 activations and for few rows only: above ``GEMV_ROWS`` rows (prefill chunks,
large decode batches) a dense bfloat16 copy of the *same* dequantised values runs instead, since
oneDNN's GEMM beats them there.

``int4`` takes a GGUF's Q4_1 blocks as they are (``w = d·q + m`` is ``(q − 8)·d + (m + 8d)``, the
kernel's form), so it computes with the file's own weights; other sources are quantised with a
per-group min/max. ``int8`` is symmetric per output channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: rows up to which the weight-only kernels beat a dense bf16 GEMM (measured, docs/torch-engine.md)
GEMV_ROWS = 8
#: int4 group size (GGUF Q4_0/Q4_1 blocks are 32 wide)
GROUP = 32


@dataclass
class Q4Blocks:
    """A weight as groups of 32 along its input dimension: ``w = scale · q + low`` (GGUF Q4_1)."""

    q: torch.Tensor  # [N, K] uint8 in 0..15
    scale: torch.Tensor  # [N, K // 32] float32
    low: torch.Tensor  # [N, K // 32] float32

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        q = self.q.view(n, k // GROUP, GROUP).float()
        return (q * self.scale.unsqueeze(-1) + self.low.unsqueeze(-1)).view(n, k)

    @staticmethod
    def quantize(w: torch.Tensor) -> Q4Blocks:
        """Min/max per group of 32 (what llama.cpp's Q4_1 quantiser does)."""
        n, k = w.shape
        g = w.float().view(n, k // GROUP, GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = (hi - lo) / 15
        inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
        q = ((g - lo.unsqueeze(-1)) * inv.unsqueeze(-1)).round().clamp(0, 15).to(torch.uint8)
        return Q4Blocks(q.view(n, k), scale, lo)


class Linear:
    """``y = x @ w.T`` for one weight in one format; ``nbytes`` is what a decode step reads."""

    nbytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Dense(Linear):
    def __init__(self, w: torch.Tensor) -> None:
        self.w = w.contiguous()
        self.nbytes = self.w.numel() * self.w.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w)


class Quantised(Linear):
    """Weight-only kernel for few rows, a dense bf16 copy of the same values for many."""

    def __init__(self, dense: torch.Tensor) -> None:
        self.dense = dense.to(torch.bfloat16).contiguous()

    def small(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= GEMV_ROWS:
            return self.small(x)
        return F.linear(x, self.dense)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantised rows: the embedding lookup on a table tied to this (vocabulary) matmul."""
        return self.dense[ids]


class Int8(Quantised):
    """Symmetric int8 per output channel (scale = absmax / 127)."""

    def __init__(self, w: torch.Tensor) -> None:
        wf = w.float()
        scale = wf.abs().amax(1).clamp_min(1e-12) / 127
        self.q = (wf / scale.unsqueeze(1)).round().clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)
        super().__init__(self.q.float() * scale.unsqueeze(1))
        self.nbytes = self.q.numel() + self.scale.numel() * 2

    def small(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)


class Int4(Quantised):
    """Asymmetric int4 in groups of 32 along the input dimension (GGUF Q4_1 layout)."""

    def __init__(self, blocks: Q4Blocks) -> None:
        k = blocks.q.shape[1]
        if k % GROUP:
            raise ValueError(f"int4 needs an input dimension divisible by {GROUP}, got {k}")
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(blocks.q.to(torch.int32).contiguous(), 1)
        # the kernel computes (q - 8) * scale + zero
        zero = blocks.low + 8 * blocks.scale
        self.scales_zeros = torch.stack([blocks.scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        super().__init__(self._kernel_values(blocks))
        self.nbytes = self.packed.numel() + self.scales_zeros.numel() * 2

    def _kernel_values(self, b: Q4Blocks) -> torch.Tensor:
        """The weights as the kernel sees them (scales and zeros rounded to bf16), for the dense path."""
        n, k = b.q.shape
        sz = self.scales_zeros.float()  # [K/32, N, 2]
        scale, zero = sz[..., 0].t().unsqueeze(-1), sz[..., 1].t().unsqueeze(-1)
        q = b.q.view(n, k // GROUP, GROUP).float()
        return ((q - 8) * scale + zero).view(n, k)

    def small(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros)


def make_linear(mode: str, w: torch.Tensor | None, blocks: Q4Blocks | None, dtype: torch.dtype) -> Linear:
    """The weight in ``mode`` (``dense`` in ``dtype``, ``int8``, ``int4``); ``blocks`` when the file has Q4_1."""
    if mode == "int4":
        if blocks is None:
            assert w is not None
            blocks = Q4Blocks.quantize(w)
        return Int4(blocks)
    if w is None:
        assert blocks is not None
        w = blocks.dequantize()
    if mode == "int8":
        return Int8(w)
    if mode == "dense":
        return Dense(w.to(dtype))
    raise ValueError(f"unknown weight format {mode!r}")
