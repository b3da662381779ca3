"""``--torch-weights w4a8``: llama.cpp's arithmetic for decode matmuls (4-bit weights x 8-bit activations).

The fp32 block kernels (``exact_gemv.py``) rebuild every weight in fp32 to stay exact, and that
rebuild, not memory, bounds a single stream (~21 G weights/s on one core). llama.cpp instead
quantises each activation row to int8 in groups of 32 (its Q8_1: ``dx = max|x| / 127``,
``qx = round(x / dx)``, ``sx = dx · Σ qx``) and takes integer dot products with the file's blocks:
``Σ w·x = d·dx·Σ q·qx + m·sx`` for Q4_1 (``w = d·q + m``), ``d·dx·Σ q·qx`` for Q8_0 — 32 products per
two AVX2 instructions. This mode does the same for up to ``EXACT_ROWS`` rows (decodes), on the
same blocks; prefill chunks and large batches run fp32 on the same weights (``block_gemm.py``), and
everything else (norms, RoPE, attention, the KV cache) stays fp32. The activation rounding changes
numerics (as in llama.cpp): the benchmark reports its agreement with fp32 and its perplexity.
Needs the C kernels (a compiler); without them the mode is refused rather than silently dense.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

from .linear import Linear

if TYPE_CHECKING:
    from .exact_gemv import ExactBlocks

SOURCE = r"""
/* ---- W4A8: Q4_1 / Q8_0 weights x int8 activations (w4a8.py) ---- */
/* llama.cpp's Q8_1 per group of 32: dx = amax / 127, qx = round(x / dx), sx = dx * sum(qx) */
static void quant_rows_q8(const float *x, int64_t R, int64_t K, int8_t *qx, float *dx, float *sx) {
    int64_t nb = K / G;
    for (int64_t i = 0; i < R * nb; i++) {
        const float *v = x + i * G;
        float amax = 0.0f;
        for (int j = 0; j < G; j++) amax = fmaxf(amax, fabsf(v[j]));
        float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < G; j++) { int q = (int)nearbyintf(v[j] * id); qx[i * G + j] = (int8_t)q; sum += q; }
        dx[i] = d;
        sx[i] = d * (float)sum;
    }
}
#ifdef __AVX2__
INLINE __m256 isum8(__m256i prod16) { return _mm256_cvtepi32_ps(_mm256_madd_epi16(prod16, _mm256_set1_epi16(1))); }
INLINE float hsum4x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    float a[8];
    _mm256_storeu_ps(a, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}
/* one block of Q4_1 nibbles as 32 unsigned bytes in element order (byte j: j low, j + 16 high) */
INLINE __m256i q4_bytes(const uint8_t *p) {
    const __m128i lo4 = _mm_set1_epi8(15);
    __m128i raw = _mm_loadu_si128((const __m128i *)p);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), lo4), _mm_and_si128(raw, lo4));
}
#endif
/* y[r][n] = sum_b d[n,b] dx[r,b] (q[n,b] . qx[r,b]) + m[n,b] sx[r,b], for RC <= 2 rows. Blocks go round-robin
   into 4 accumulators per row (FMA latency, not throughput, bounds one chain); every row is summed the same
   way whatever the batch. */
INLINE void w4a8_rows(const uint8_t *qs, const float *d, const float *m, const int8_t *qx, const float *dx,
                      const float *sx, float *y, int64_t N, int64_t K, const int RC) {
    int64_t nb = K / G;
    for (int64_t n = 0; n < N; n++) {
        float macc[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
        const uint8_t *qn = qs + n * nb * (G / 2);
        const float *dn = d + n * nb, *mn = m + n * nb;
#ifdef __AVX2__
        __m256 acc[2][4];
        for (int r = 0; r < RC; r++) for (int u = 0; u < 4; u++) acc[r][u] = _mm256_setzero_ps();
        for (int64_t b0 = 0; b0 < nb; b0 += 4) {
            for (int u = 0; u < 4; u++) {
                int64_t b = b0 + u;
                if (b >= nb) break;
                __m256i w = q4_bytes(qn + b * (G / 2));
                for (int r = 0; r < RC; r++) {
                    __m256i xq = _mm256_loadu_si256((const __m256i *)(qx + (r * nb + b) * G));
                    __m256 s = isum8(_mm256_maddubs_epi16(w, xq));
                    acc[r][u] = _mm256_fmadd_ps(s, _mm256_set1_ps(dn[b] * dx[r * nb + b]), acc[r][u]);
                    macc[r][u] += mn[b] * sx[r * nb + b];
                }
            }
        }
        for (int r = 0; r < RC; r++)
            y[r * N + n] = hsum4x8(acc[r][0], acc[r][1], acc[r][2], acc[r][3])
                           + ((macc[r][0] + macc[r][1]) + (macc[r][2] + macc[r][3]));
#else
        float acc[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *p = qn + b * (G / 2);
            for (int r = 0; r < RC; r++) {
                const int8_t *xq = qx + (r * nb + b) * G;
                int s = 0;
                for (int j = 0; j < G / 2; j++) s += (p[j] & 15) * xq[j] + (p[j] >> 4) * xq[j + G / 2];
                acc[r][b & 3] += (float)s * (dn[b] * dx[r * nb + b]);
                macc[r][b & 3] += mn[b] * sx[r * nb + b];
            }
        }
        for (int r = 0; r < RC; r++)
            y[r * N + n] = ((acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3]))
                           + ((macc[r][0] + macc[r][1]) + (macc[r][2] + macc[r][3]));
#endif
    }
}
INLINE void w8a8_rows(const int8_t *qs, const float *d, const int8_t *qx, const float *dx, float *y,
                      int64_t N, int64_t K, const int RC) {
    int64_t nb = K / G;
    for (int64_t n = 0; n < N; n++) {
        const int8_t *qn = qs + n * nb * G;
        const float *dn = d + n * nb;
#ifdef __AVX2__
        __m256 acc[2][4];
        for (int r = 0; r < RC; r++) for (int u = 0; u < 4; u++) acc[r][u] = _mm256_setzero_ps();
        for (int64_t b0 = 0; b0 < nb; b0 += 4) {
            for (int u = 0; u < 4; u++) {
                int64_t b = b0 + u;
                if (b >= nb) break;
                __m256i w = _mm256_loadu_si256((const __m256i *)(qn + b * G));
                __m256i aw = _mm256_sign_epi8(w, w); /* |w| and sign(w)·x: maddubs wants one unsigned side */
                for (int r = 0; r < RC; r++) {
                    __m256i xq = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(qx + (r * nb + b) * G)), w);
                    __m256 s = isum8(_mm256_maddubs_epi16(aw, xq));
                    acc[r][u] = _mm256_fmadd_ps(s, _mm256_set1_ps(dn[b] * dx[r * nb + b]), acc[r][u]);
                }
            }
        }
        for (int r = 0; r < RC; r++) y[r * N + n] = hsum4x8(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
#else
        float acc[2][4] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
        for (int64_t b = 0; b < nb; b++) {
            const int8_t *p = qn + b * G;
            for (int r = 0; r < RC; r++) {
                const int8_t *xq = qx + (r * nb + b) * G;
                int s = 0;
                for (int j = 0; j < G; j++) s += p[j] * xq[j];
                acc[r][b & 3] += (float)s * (dn[b] * dx[r * nb + b]);
            }
        }
        for (int r = 0; r < RC; r++) y[r * N + n] = (acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3]);
#endif
    }
}
/* both take fp32 x [R, K] (R <= 8), quantise it, and write y [R, N]; -1 when out of memory */
int q4_1_w4a8(const uint8_t *qs, const float *d, const float *m, const float *x, float *y,
              int64_t N, int64_t K, int64_t R) {
    int64_t nb = K / G;
    int8_t *qx = malloc((size_t)(R * K));
    float *dx = malloc(sizeof(float) * (size_t)(R * nb)), *sx = malloc(sizeof(float) * (size_t)(R * nb));
    if (!qx || !dx || !sx || R > 8) { free(qx); free(dx); free(sx); return -1; }
    quant_rows_q8(x, R, K, qx, dx, sx);
    for (int64_t r = 0; r < R; r += 2) { /* rows in pairs */
        if (R - r >= 2) w4a8_rows(qs, d, m, qx + r * K, dx + r * nb, sx + r * nb, y + r * N, N, K, 2);
        else w4a8_rows(qs, d, m, qx + r * K, dx + r * nb, sx + r * nb, y + r * N, N, K, 1);
    }
    free(qx); free(dx); free(sx);
    return 0;
}
int q8_0_w8a8(const int8_t *qs, const float *d, const float *x, float *y, int64_t N, int64_t K, int64_t R) {
    int64_t nb = K / G;
    int8_t *qx = malloc((size_t)(R * K));
    float *dx = malloc(sizeof(float) * (size_t)(R * nb)), *sx = malloc(sizeof(float) * (size_t)(R * nb));
    if (!qx || !dx || !sx || R > 8) { free(qx); free(dx); free(sx); return -1; }
    quant_rows_q8(x, R, K, qx, dx, sx);
    for (int64_t r = 0; r < R; r += 2) {
        if (R - r >= 2) w8a8_rows(qs, d, qx + r * K, dx + r * nb, y + r * N, N, K, 2);
        else w8a8_rows(qs, d, qx + r * K, dx + r * nb, y + r * N, N, K, 1);
    }
    free(qx); free(dx); free(sx);
    return 0;
}
"""

#: most rows per call (the kernel's per-row accumulators); above, fp32 on the same weights (block GEMM)
MAX_ROWS = 8


def declare(lib: ctypes.CDLL) -> None:
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.q4_1_w4a8.argtypes = [p, p, p, p, p, i, i, i]
    lib.q4_1_w4a8.restype = ctypes.c_int
    lib.q8_0_w8a8.argtypes = [p, p, p, p, i, i, i]
    lib.q8_0_w8a8.restype = ctypes.c_int


class W4A8(Linear):
    """A GGUF block weight (Q4_1, or Q8_0 for the vocabulary) with int8 activations for few rows."""

    def __init__(self, blocks: ExactBlocks) -> None:
        self.blocks = blocks
        self.n, self.k = blocks.n, blocks.k
        self.nbytes = blocks.nbytes

    @property
    def w(self) -> torch.Tensor:
        """The dense fp32 weight (built on first use, see ``ExactBlocks.w``)."""
        return self.blocks.w

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows > MAX_ROWS or x.dtype != torch.float32:
            return self.blocks(x)  # fp32 on the same weights: the block GEMM, or dense
        b = self.blocks
        x = x.contiguous()
        y = torch.empty(rows, self.n, dtype=torch.float32)
        if b.low is not None:
            rc = b.lib.q4_1_w4a8(
                b.qs.data_ptr(), b.scale.data_ptr(), b.low.data_ptr(), x.data_ptr(), y.data_ptr(), self.n, self.k, rows
            )
        else:
            rc = b.lib.q8_0_w8a8(b.qs.data_ptr(), b.scale.data_ptr(), x.data_ptr(), y.data_ptr(), self.n, self.k, rows)
        if rc:
            raise MemoryError(f"w4a8 matmul: no memory to quantise {rows} x {self.k} activations")
        return y
