"""fp32 matmuls of many rows (big decode batches, prefill chunks) from a GGUF's blocks, bit-exact weights.

Above ``EXACT_ROWS`` rows the few-row kernels of ``exact_gemv.py`` would rebuild every weight once per
chunk of 4 rows, and the dense path streams the fp32 expansion (513 MiB for the default model) through
torch's BLAS GEMM (MKL: ~75-105 GFLOP/s on one core of this AMD EPYC, whose FMAs give ~2x that).
Here a panel of ``NC`` output columns (two vector registers wide) is rebuilt from its blocks once
per call, ``BG_SB`` blocks of k at a time into a buffer that stays in L1, with the same arithmetic as
``gguf.quants.dequantize`` (Q4_1 ``(d * q) + m`` or, with fp16 scales, one ``fma(q, d, m)``, which rounds
identically; Q8_0 ``q * d``), then applied to every row in register tiles of ``RB`` rows x ``NC`` columns
(``acc += w[k] · x[r, k]`` with one FMA rounding, k in order; the sums carried in ``y`` between slabs).
So the weights are bit-identical to the dense path's; only the
summation order differs (a sequential sum over k per output, the same for a row whatever else is in
the batch).

The panel-major copy of the blocks (``[N / NC, K / 32, 16 or 32, NC]``: for one k, the ``NC`` columns'
quants are adjacent, so rebuilding a panel is vector loads, no gathers) is made at load from the same
blocks; the C sits in the one library ``exact_gemv.py`` builds (same compiler, flags and fallback).
"""

from __future__ import annotations

import ctypes

import torch

SOURCE = r"""
/* ---- fp32 matmuls of many rows from panel-packed blocks (block_gemm.py) ---- */
#if defined(__AVX512F__)
#include <immintrin.h>
#define BG_VW 16
#define BG_RB 12
typedef float bg_vf __attribute__((vector_size(64)));
typedef int32_t bg_vi __attribute__((vector_size(64)));
INLINE bg_vf bg_fma(bg_vf a, bg_vf b, bg_vf c) { return (bg_vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
/* 16 bytes -> 16 int32 (gcc's generic vector conversion goes through scalar registers) */
INLINE bg_vi bg_u8(const uint8_t *p) { return (bg_vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
INLINE bg_vi bg_s8(const int8_t *p) { return (bg_vi)_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)); }
INLINE bg_vf bg_bcast(const float *p) { return (bg_vf)_mm512_set1_ps(*p); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BG_VW 8
#define BG_RB 6
typedef float bg_vf __attribute__((vector_size(32)));
typedef int32_t bg_vi __attribute__((vector_size(32)));
INLINE bg_vf bg_fma(bg_vf a, bg_vf b, bg_vf c) { return (bg_vf)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
INLINE bg_vi bg_u8(const uint8_t *p) { return (bg_vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
INLINE bg_vi bg_s8(const int8_t *p) { return (bg_vi)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
INLINE bg_vf bg_bcast(const float *p) { return (bg_vf)_mm256_broadcast_ss(p); }
#else
#define BG_VW 4
#define BG_RB 6
typedef float bg_vf __attribute__((vector_size(16)));
typedef int32_t bg_vi __attribute__((vector_size(16)));
INLINE bg_vf bg_fma(bg_vf a, bg_vf b, bg_vf c) {
    bg_vf r;
    for (int i = 0; i < BG_VW; i++) r[i] = fmaf(a[i], b[i], c[i]);
    return r;
}
INLINE bg_vi bg_u8(const uint8_t *p) { bg_vi r; for (int i = 0; i < BG_VW; i++) r[i] = p[i]; return r; }
INLINE bg_vi bg_s8(const int8_t *p) { bg_vi r; for (int i = 0; i < BG_VW; i++) r[i] = p[i]; return r; }
INLINE bg_vf bg_bcast(const float *p) { return (bg_vf){0} + *p; }
#endif
#define BG_NC (2 * BG_VW)
#ifndef BG_SB
#define BG_SB 4
#endif
#include <string.h>
int block_gemm_cols(void) { return BG_NC; }
INLINE bg_vf bg_load(const float *p) { bg_vf v; memcpy(&v, p, sizeof v); return v; }
INLINE void bg_store(float *p, bg_vf v) { memcpy(p, &v, sizeof v); }
/* one panel of Q4_1: qp [nb][16][NC] nibble pairs, d/m [nb][NC] -> wt [K][NC] (gguf's weights, bit for bit) */
static void bg_panel_q4(const uint8_t *qp, const float *d, const float *m, int64_t nb, int f16, float *wt) {
    for (int64_t b = 0; b < nb; b++)
        for (int v = 0; v < 2; v++) {
            bg_vf dd = bg_load(d + b * BG_NC + v * BG_VW), mm = bg_load(m + b * BG_NC + v * BG_VW);
            float *lo = wt + b * 32 * BG_NC + v * BG_VW, *hi = lo + 16 * BG_NC;
            const uint8_t *src = qp + b * 16 * BG_NC + v * BG_VW;
            /* f16 scales: d * q is exact, so one fma rounds as (d * q) + m does; else two roundings
               (the library is built with -ffp-contract=off, so the multiply-add is not fused) */
            if (f16)
                for (int j = 0; j < 16; j++) {
                    bg_vi q = bg_u8(src + j * BG_NC);
                    bg_store(lo + j * BG_NC, bg_fma(__builtin_convertvector(q & 15, bg_vf), dd, mm));
                    bg_store(hi + j * BG_NC, bg_fma(__builtin_convertvector(q >> 4, bg_vf), dd, mm));
                }
            else
                for (int j = 0; j < 16; j++) {
                    bg_vi q = bg_u8(src + j * BG_NC);
                    bg_store(lo + j * BG_NC, __builtin_convertvector(q & 15, bg_vf) * dd + mm);
                    bg_store(hi + j * BG_NC, __builtin_convertvector(q >> 4, bg_vf) * dd + mm);
                }
        }
}
/* one panel of Q8_0: qp [nb][32][NC] int8, d [nb][NC] -> wt [K][NC], w = q * d (one rounding, as gguf) */
static void bg_panel_q8(const int8_t *qp, const float *d, int64_t nb, float *wt) {
    for (int64_t b = 0; b < nb; b++)
        for (int v = 0; v < 2; v++) {
            bg_vf dd = bg_load(d + b * BG_NC + v * BG_VW);
            for (int j = 0; j < 32; j++) {
                bg_vf q = __builtin_convertvector(bg_s8(qp + (b * 32 + j) * BG_NC + v * BG_VW), bg_vf);
                bg_store(wt + (b * 32 + j) * BG_NC + v * BG_VW, q * dd);
            }
        }
}
/* y[r][n0 .. n0 + NC) for R rows over a k-slab of KS steps: acc += w[k] * x[r][k] in k order, one rounding per
   step; the sums are carried in y between slabs (first: start from 0), stored and reloaded exactly */
INLINE void bg_tile_slab(const float *wt, const float *x, float *y, int64_t N, int64_t K, int64_t KS, int first,
                         const int R) {
    bg_vf a0[BG_RB], a1[BG_RB];
    for (int r = 0; r < R; r++) {
        a0[r] = first ? (bg_vf){0} : bg_load(y + r * N);
        a1[r] = first ? (bg_vf){0} : bg_load(y + r * N + BG_VW);
    }
    for (int64_t k = 0; k < KS; k++) {
        bg_vf w0 = bg_load(wt + k * BG_NC), w1 = bg_load(wt + k * BG_NC + BG_VW);
        for (int r = 0; r < R; r++) {
            bg_vf xb = bg_bcast(x + r * K + k);
            a0[r] = bg_fma(w0, xb, a0[r]);
            a1[r] = bg_fma(w1, xb, a1[r]);
        }
    }
    for (int r = 0; r < R; r++) { bg_store(y + r * N, a0[r]); bg_store(y + r * N + BG_VW, a1[r]); }
}
static void bg_rows_slab(const float *wt, const float *x, float *y, int64_t N, int64_t K, int64_t KS, int first,
                         int64_t R) {
    for (int64_t r0 = 0; r0 < R; r0 += BG_RB) {
        const float *xr = x + r0 * K;
        float *yr = y + r0 * N;
        switch (R - r0 >= BG_RB ? BG_RB : R - r0) {
        case 1: bg_tile_slab(wt, xr, yr, N, K, KS, first, 1); break;
        case 2: bg_tile_slab(wt, xr, yr, N, K, KS, first, 2); break;
        case 3: bg_tile_slab(wt, xr, yr, N, K, KS, first, 3); break;
        case 4: bg_tile_slab(wt, xr, yr, N, K, KS, first, 4); break;
        case 5: bg_tile_slab(wt, xr, yr, N, K, KS, first, 5); break;
#if BG_RB > 6
        case 6: bg_tile_slab(wt, xr, yr, N, K, KS, first, 6); break;
        case 7: bg_tile_slab(wt, xr, yr, N, K, KS, first, 7); break;
        case 8: bg_tile_slab(wt, xr, yr, N, K, KS, first, 8); break;
        case 9: bg_tile_slab(wt, xr, yr, N, K, KS, first, 9); break;
        case 10: bg_tile_slab(wt, xr, yr, N, K, KS, first, 10); break;
        case 11: bg_tile_slab(wt, xr, yr, N, K, KS, first, 11); break;
#endif
        default: bg_tile_slab(wt, xr, yr, N, K, KS, first, BG_RB); break;
        }
    }
}
/* y [R, N] = x [R, K] @ w.T, w given as panels (N % NC == 0, K % 32 == 0). kind 0: Q4_1 (m used;
   f16 as above), 1: Q8_0. Returns -1 when out of memory (y untouched), else 0. */
int block_gemm(int kind, const void *qp, const float *d, const float *m, int f16, const float *x, float *y,
               int64_t N, int64_t K, int64_t R) {
    int64_t nb = K / 32, qb = kind == 0 ? 16 : 32;
    /* a panel is rebuilt BG_SB blocks of k at a time into a buffer that stays in L1 (BG_SB * 32 * BG_NC floats,
       16 KiB with AVX-512), and every row tile runs over that slab before the next is rebuilt */
    const int64_t sb = BG_SB;
    float *wt = aligned_alloc(64, sizeof(float) * (size_t)(sb * 32 * BG_NC));
    if (wt == NULL) return -1;
    for (int64_t p = 0; p < N / BG_NC; p++)
        for (int64_t b0 = 0; b0 < nb; b0 += sb) {
            int64_t n = nb - b0 < sb ? nb - b0 : sb;
            if (kind == 0)
                bg_panel_q4((const uint8_t *)qp + (p * nb + b0) * qb * BG_NC, d + (p * nb + b0) * BG_NC,
                            m + (p * nb + b0) * BG_NC, n, f16, wt);
            else
                bg_panel_q8((const int8_t *)qp + (p * nb + b0) * qb * BG_NC, d + (p * nb + b0) * BG_NC, n, wt);
            bg_rows_slab(wt, x + b0 * 32, y + p * BG_NC, N, K, n * 32, b0 == 0, R);
        }
    free(wt);
    return 0;
}
"""


def declare(lib: ctypes.CDLL) -> None:
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.block_gemm_cols.argtypes = []
    lib.block_gemm_cols.restype = ctypes.c_int
    lib.block_gemm.argtypes = [ctypes.c_int, p, p, p, ctypes.c_int, p, p, i, i, i]
    lib.block_gemm.restype = ctypes.c_int


def panels(t: torch.Tensor, cols: int) -> torch.Tensor:
    """``[N, nb, ...]`` per-row block data -> ``[N / cols, nb, ..., cols]``: one k's columns adjacent."""
    n = t.shape[0]
    v = t.reshape(n // cols, cols, *t.shape[1:])
    return v.permute(0, *range(2, v.dim()), 1).contiguous()


class PanelBlocks:
    """One weight's blocks in the panel layout the C side reads (Q4_1 nibble pairs or Q8_0 bytes)."""

    def __init__(
        self, lib: ctypes.CDLL, qs: torch.Tensor, scale: torch.Tensor, low: torch.Tensor | None, f16: bool
    ) -> None:
        """``qs``: ``[N, K/32, 16]`` nibble pairs (Q4_1) or ``[N, K]`` int8 (Q8_0); ``scale``, ``low``: per block."""
        self.lib = lib
        self.cols = int(lib.block_gemm_cols())
        n = qs.shape[0]
        nb = scale.shape[1]
        self.n, self.k = n, nb * 32
        if n % self.cols:
            raise ValueError(f"{n} output columns are not a multiple of the panel width {self.cols}")
        self.kind = 0 if low is not None else 1
        self.qp = panels(qs.reshape(n, nb, -1), self.cols)
        self.dp = panels(scale.float(), self.cols)
        self.mp = panels(low.float(), self.cols) if low is not None else torch.empty(0)
        self.f16 = int(f16)
        self.nbytes = sum(t.numel() * t.element_size() for t in (self.qp, self.dp, self.mp))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        rows = x.shape[0]
        y = torch.empty(rows, self.n, dtype=torch.float32)
        rc = self.lib.block_gemm(
            self.kind, self.qp.data_ptr(), self.dp.data_ptr(), self.mp.data_ptr(), self.f16, x.data_ptr(),
            y.data_ptr(), self.n, self.k, rows,
        )  # fmt: skip
        if rc:
            raise MemoryError("block_gemm: no memory for a panel buffer")
        return y
