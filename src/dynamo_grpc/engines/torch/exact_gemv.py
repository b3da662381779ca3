"""fp32 matmuls for few rows that read a GGUF's blocks instead of their fp32 expansion, bit-exactly.

A single-stream decode step reads every weight once; in fp32 that is 513 MiB for the default model,
while the file holds the same values as Q4_1 blocks (``w = d·q + m``, fp16 ``d``/``m``, 4-bit ``q``)
and a Q8_0 vocabulary table (``w = d·q``). transformers (and our dense path) compute with
``gguf.quants.dequantize``'s fp32 values; this kernel rebuilds each weight from its block *with the
same two fp32 roundings* (``(d * q) + m``, compiled with ``-ffp-contract=off``) and accumulates
``w * x`` in fp32. Weights are therefore identical; only the summation order differs from a BLAS
GEMV (as it differs between BLAS builds): ~5x fewer bytes per step for the same numbers.

The kernel is ~40 lines of C built once per machine with the system C compiler (``$CC``, else
``cc``) into a cache folder and called through ``ctypes`` (which drops the GIL). Without a compiler,
or with ``DYN_TORCH_KERNELS=off``, :func:`kernels` is ``None`` and the model uses dense fp32
matmuls (same tokens, slower); :func:`status` says which and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import block_gemm, decode_step, paged_attention, w4a8
from .linear import GROUP, Linear, Q4Blocks

log = logging.getLogger(__name__)

#: rows up to which the few-row kernel runs; above, the block GEMM (``block_gemm.py``)
EXACT_ROWS = 8

_SOURCE = r"""
/* y[r][n] = sum_k x[r][k] * w[n][k] for R <= RMAX rows, w rebuilt from its block as gguf does */
#include <stdint.h>
#include <math.h>
#define G 32
#define RMAX 8
#define INLINE static inline __attribute__((always_inline))
/* acc[r][j] += w[j] * x[r][off + j], one fma rounding (as a BLAS FMA) */
INLINE void acc_rows(const float *w, const float *x, int64_t K, const int R, int64_t off, float acc[][G]) {
    for (int r = 0; r < R; r++)
        for (int j = 0; j < G; j++) acc[r][j] = fmaf(w[j], x[r * K + off + j], acc[r][j]);
}
/* a fixed pairwise order (vectorisable; a sequential sum here was a third of the step) */
INLINE float hsum(float *a) {
    for (int s = G / 2; s > 0; s /= 2) for (int j = 0; j < s; j++) a[j] += a[j + s];
    return a[0];
}
/* Q4_1: per block, 16 bytes (byte j: element j in the low nibble, j + 16 in the high), d and m */
INLINE void q4_rows(const uint8_t *qs, const float *d, const float *m, const float *x, float *y,
                    int64_t N, int64_t K, const int R) {
    int64_t nb = K / G;
    for (int64_t n = 0; n < N; n++) {
        float acc[RMAX][G];
        for (int r = 0; r < R; r++) for (int j = 0; j < G; j++) acc[r][j] = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *p = qs + (n * nb + b) * (G / 2);
            float dd = d[n * nb + b], mm = m[n * nb + b], w[G];
            for (int j = 0; j < G / 2; j++) { w[j] = (float)(p[j] & 15); w[j + G / 2] = (float)(p[j] >> 4); }
            for (int j = 0; j < G; j++) w[j] = w[j] * dd + mm; /* two roundings (no contraction): gguf's (d*q)+m */
            acc_rows(w, x, K, R, b * G, acc);
        }
        for (int r = 0; r < R; r++) y[r * N + n] = hsum(acc[r]);
    }
}
void q4_1_gemv(const uint8_t *qs, const float *d, const float *m, const float *x, float *y,
               int64_t N, int64_t K, int64_t R) {
    switch (R) {
    case 1: q4_rows(qs, d, m, x, y, N, K, 1); break;
    case 2: q4_rows(qs, d, m, x, y, N, K, 2); break;
    case 3: q4_rows(qs, d, m, x, y, N, K, 3); break;
    case 4: q4_rows(qs, d, m, x, y, N, K, 4); break;
    default: q4_rows(qs, d, m, x, y, N, K, (int)R); break;
    }
}
/* Q4_1 with one rounding per weight: when d and m are fp16 values (a GGUF's), d * q (11 x 4 significant
   bits) is exact in fp32, so fma(q, d, m) rounds exactly once where gguf's (d * q) + m does: same weights,
   one operation fewer. Rows go in chunks of up to 4 with the same per-row lanes, so a row's result does not
   depend on how many rows share the call. */
INLINE void q4f_rows(const uint8_t *qs, const float *d, const float *m, const float *x, float *y,
                     int64_t N, int64_t K, const int R) {
    int64_t nb = K / G;
    for (int64_t n = 0; n < N; n++) {
        float acc[4][G];
        for (int r = 0; r < R; r++) for (int j = 0; j < G; j++) acc[r][j] = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *p = qs + (n * nb + b) * (G / 2);
            float dd = d[n * nb + b], mm = m[n * nb + b], w[G];
            for (int j = 0; j < G / 2; j++) { w[j] = (float)(p[j] & 15); w[j + G / 2] = (float)(p[j] >> 4); }
            for (int j = 0; j < G; j++) w[j] = fmaf(w[j], dd, mm);
            acc_rows(w, x, K, R, b * G, acc);
        }
        for (int r = 0; r < R; r++) y[r * N + n] = hsum(acc[r]);
    }
}
void q4_1_gemv_f16(const uint8_t *qs, const float *d, const float *m, const float *x, float *y,
                   int64_t N, int64_t K, int64_t R) {
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
        const float *xr = x + r0 * K;
        float *yr = y + r0 * N;
        switch (R - r0 >= 4 ? 4 : R - r0) {
        case 1: q4f_rows(qs, d, m, xr, yr, N, K, 1); break;
        case 2: q4f_rows(qs, d, m, xr, yr, N, K, 2); break;
        case 3: q4f_rows(qs, d, m, xr, yr, N, K, 3); break;
        default: q4f_rows(qs, d, m, xr, yr, N, K, 4); break;
        }
    }
}
#ifdef __AVX2__
#include <immintrin.h>
/* Q8_0: per block 32 int8 and d. x86: 8 int8 -> 8 fp32 (exact) -> * d (one rounding, gguf's x * d),
   fma into 4 accumulators per row (gcc does not vectorise the int8 conversion of the portable loop) */
INLINE void q8_rows(const int8_t *qs, const float *d, const float *x, float *y, int64_t N, int64_t K, const int R) {
    int64_t nb = K / G;
    for (int64_t n = 0; n < N; n++) {
        __m256 acc[RMAX][4];
        for (int r = 0; r < R; r++) for (int i = 0; i < 4; i++) acc[r][i] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const int8_t *p = qs + (n * nb + b) * G;
            __m256 dd = _mm256_set1_ps(d[n * nb + b]);
            for (int i = 0; i < 4; i++) {
                __m128i q8 = _mm_loadl_epi64((const __m128i *)(p + 8 * i));
                __m256 w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), dd);
                for (int r = 0; r < R; r++)
                    acc[r][i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + r * K + b * G + 8 * i), acc[r][i]);
            }
        }
        for (int r = 0; r < R; r++) {
            float a[8];
            __m256 s01 = _mm256_add_ps(acc[r][0], acc[r][1]), s23 = _mm256_add_ps(acc[r][2], acc[r][3]);
            _mm256_storeu_ps(a, _mm256_add_ps(s01, s23));
            y[r * N + n] = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
        }
    }
}
#else
INLINE void q8_rows(const int8_t *qs, const float *d, const float *x, float *y, int64_t N, int64_t K, const int R) {
    int64_t nb = K / G;
    for (int64_t n = 0; n < N; n++) {
        float acc[RMAX][G];
        for (int r = 0; r < R; r++) for (int j = 0; j < G; j++) acc[r][j] = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            const int8_t *p = qs + (n * nb + b) * G;
            float dd = d[n * nb + b], w[G];
            int32_t t[G];
            for (int j = 0; j < G; j++) t[j] = p[j];
            for (int j = 0; j < G; j++) w[j] = (float)t[j] * dd;
            acc_rows(w, x, K, R, b * G, acc);
        }
        for (int r = 0; r < R; r++) y[r * N + n] = hsum(acc[r]);
    }
}
#endif
void q8_0_gemv(const int8_t *qs, const float *d, const float *x, float *y, int64_t N, int64_t K, int64_t R) {
    switch (R) {
    case 1: q8_rows(qs, d, x, y, N, K, 1); break;
    case 2: q8_rows(qs, d, x, y, N, K, 2); break;
    case 4: q8_rows(qs, d, x, y, N, K, 4); break;
    default: q8_rows(qs, d, x, y, N, K, (int)R); break;
    }
}
"""
# decode attention over the paged cache, the w4a8 matmuls, whole decode steps and many-row block matmuls:
# one library, one build
_SOURCE += paged_attention.SOURCE + w4a8.SOURCE + decode_step.SOURCE + block_gemm.SOURCE
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC"]


@dataclass
class Q8Blocks:
    """A GGUF Q8_0 weight: ``w = d · q`` per group of 32 along the input dimension."""

    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N, K // 32] float32 (the file's fp16 values)

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        return (self.q.view(n, k // GROUP, GROUP).float() * self.scale.unsqueeze(-1)).view(n, k)


_lib: ctypes.CDLL | None = None
_status = "not loaded"
_tried = False


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dynamo-grpc" / "kernels"


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU model and its flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)


def _build(cc: str) -> Path:
    key = hashlib.sha256("\0".join([_SOURCE, *_FLAGS, cc, _cpu_id()]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"gemv-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "gemv.c"
        src.write_text(_SOURCE)
        so = Path(tmp) / "gemv.so"
        subprocess.run([cc, *_FLAGS, "-o", str(so), str(src)], check=True, capture_output=True, timeout=120)
        os.replace(so, out)  # atomic: concurrent workers building the same kernel both succeed
    return out


def kernels() -> ctypes.CDLL | None:
    """The compiled block kernels, built on first use; ``None`` when unavailable (see :func:`status`)."""
    global _lib, _status, _tried
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("DYN_TORCH_KERNELS", "").lower() in ("off", "0", "false", "no"):
        _status = "off (DYN_TORCH_KERNELS)"
        return None
    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc) is None:
        _status = f"no C compiler ({cc!r} not found): dense fp32 matmuls"
        log.warning("torch engine: %s", _status)
        return None
    try:
        lib = ctypes.CDLL(str(_build(cc)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        _status = f"kernel build failed ({e}; {detail.decode(errors='replace')[:200]}): dense fp32 matmuls"
        log.warning("torch engine: %s", _status)
        return None
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.q4_1_gemv.argtypes = [p, p, p, p, p, i, i, i]
    lib.q4_1_gemv.restype = None
    lib.q8_0_gemv.argtypes = [p, p, p, p, i, i, i]
    lib.q8_0_gemv.restype = None
    lib.q4_1_gemv_f16.argtypes = [p, p, p, p, p, i, i, i]
    lib.q4_1_gemv_f16.restype = None
    paged_attention.declare(lib)
    w4a8.declare(lib)
    decode_step.declare(lib)
    block_gemm.declare(lib)
    _lib = lib
    _status = "block kernels"
    return lib


def status() -> str:
    """``"block kernels"`` when fp32 few-row matmuls read the file's blocks, else why not."""
    return _status


class ExactBlocks(Linear):
    """An fp32 weight as the file's blocks: row-major for few rows, panel-major for more (``block_gemm``).

    The dense fp32 expansion (``w``) is built only when something the kernels do not take needs it (other
    dtypes, columns that fill no panel), or shared when given (a tied embedding table).
    """

    def __init__(self, lib: ctypes.CDLL, blocks: Q4Blocks | Q8Blocks, dense: torch.Tensor | None = None) -> None:
        """``dense``: the same weight in fp32 when already loaded (a tied embedding table), shared."""
        self.lib = lib
        self._w = dense.contiguous() if dense is not None else None
        self.n, self.k = blocks.q.shape
        if self.k % GROUP:
            raise ValueError(f"block weights need an input dimension divisible by {GROUP}, got {self.k}")
        if isinstance(blocks, Q4Blocks):
            q = blocks.q.view(self.n, self.k // GROUP, GROUP)
            self.qs = (q[..., : GROUP // 2] | (q[..., GROUP // 2 :] << 4)).contiguous()
            self.low: torch.Tensor | None = blocks.low.float().contiguous()
        else:
            self.qs = blocks.q.contiguous()
            self.low = None
        self.scale = blocks.scale.float().contiguous()
        # fp16 scales and mins (a GGUF's) make d * q exact, so one fma rebuilds the weight (see the C source)
        self.f16 = self.low is not None and all(bool((t.half().float() == t).all()) for t in (self.scale, self.low))
        self.nbytes = sum(t.numel() * t.element_size() for t in (self.qs, self.scale, self.low) if t is not None)
        # many rows: the same blocks panel-major (one k's columns adjacent), when the columns fill whole panels
        self.panel: block_gemm.PanelBlocks | None = None
        if self.n % int(lib.block_gemm_cols()) == 0:
            self.panel = block_gemm.PanelBlocks(lib, self.qs, self.scale, self.low, self.f16)

    @property
    def w(self) -> torch.Tensor:
        """The dense fp32 weight: exactly ``blocks.dequantize()`` (same operations, tested), built on first use."""
        if self._w is None:  # the blocks' own dequantize, over the kept (packed) codes
            if self.low is not None:  # Q4_1: low nibbles are elements 0..15 of a block, high nibbles 16..31
                q = torch.cat((self.qs & 15, self.qs >> 4), dim=-1).view(self.n, self.k)
                self._w = Q4Blocks(q, self.scale, self.low).dequantize()
            else:
                self._w = Q8Blocks(self.qs, self.scale).dequantize()
        return self._w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if x.dtype != torch.float32:
            return F.linear(x, self.w)
        if rows > EXACT_ROWS:
            return self.panel(x) if self.panel is not None else F.linear(x, self.w)
        x = x.contiguous()
        y = torch.empty(rows, self.n, dtype=torch.float32)
        if self.low is not None:
            gemv = self.lib.q4_1_gemv_f16 if self.f16 else self.lib.q4_1_gemv
            gemv(
                self.qs.data_ptr(), self.scale.data_ptr(), self.low.data_ptr(), x.data_ptr(), y.data_ptr(),
                self.n, self.k, rows,
            )  # fmt: skip
        else:
            self.lib.q8_0_gemv(
                self.qs.data_ptr(), self.scale.data_ptr(), x.data_ptr(), y.data_ptr(), self.n, self.k, rows
            )
        return y
