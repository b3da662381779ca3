"""Decode attention straight from the paged KV cache, in C: no gathered copy of the blocks.

A decode row (one new token) attends to every cached token of its sequence. The torch path gathers
the row's whole blocks into a padded buffer (``index_select``) and runs a masked SDPA; at 32 rows that
was ~30 % of a default-model step (the gather alone copies each block twice per layer). This kernel
reads each key and value where it sits (``slot = table[t // block_size] * block_size + t % block_size``),
for all query heads sharing a KV head at once (GQA), and only the row's own length (no padding, no mask).

At 32 rows x 200 tokens the step reads ~300 MiB of K/V: keys are read in token order with every KV head
of a slot together (one stream; slots prefetched ahead), and with AVX-512's 32 vector registers each key
and value row is loaded once for the 2-3 query heads that share it (GQA).

Numerics: fp32 throughout, ``softmax(scale · q·k) · v`` with max subtraction; ``exp`` runs 8 lanes at a time
(Cephes' expf, ~1 ulp like torch's vectorised exp) where AVX2 is built. Against SDPA only the summation
order and the last bits of ``exp`` may differ (logits agree to ~1e-5, tested). The source is
compiled into the same library as the block matmuls (``exact_gemv.py``: same compiler, flags and
fallback); without it the torch path runs.
"""

from __future__ import annotations

import ctypes

import torch

#: most query heads per KV head the kernel takes (its per-head state lives on the stack)
MAX_GROUP = 16

SOURCE = r"""
/* ---- decode attention over the paged cache (paged_attention.py) ---- */
#include <stdlib.h>
#define GMAX 16
/* a dot product in 8 fixed lanes, summed pairwise (vectorisable; same order for every row) */
INLINE float dot8(const float *a, const float *b, int64_t n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] = fmaf(a[i + l], b[i + l], acc[l]);
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}
#ifdef __AVX2__
#include <immintrin.h>
/* s[i] = q . k_i for 8 keys at once: 8 independent FMA chains (one per key), then one transposing reduction */
INLINE void dot8x8(const float *q, const float *const *k, int64_t hd, float *s) {
    __m256 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) {
        __m256 qv = _mm256_loadu_ps(q + d);
        for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[i] + d), a[i]);
    }
    __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
    __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
    __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
    __m256 lo = _mm256_permute2f128_ps(h0123, h4567, 0x20), hi = _mm256_permute2f128_ps(h0123, h4567, 0x31);
    _mm256_storeu_ps(s, _mm256_add_ps(lo, hi));
}
#define HAVE_DOT8X8 1
/* exp of 8 floats (Cephes' expf: n = round(x log2 e), x - n ln2 in two fmas, degree-6 polynomial, 2^n in the
   exponent bits): within ~1 ulp of expf (torch's vectorised exp is ~1 ulp too); 0 below -87.3 */
INLINE __m256 exp8(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365447504f);
    __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(under, y);
}
#define HAVE_EXP8 1
/* keys this many tokens ahead are fetched while the current ones are used (the cache is read once per row) */
#define PF_AHEAD 16
INLINE void prefetch_slot(const float *p, int64_t sw) {
    for (int64_t i = 0; i < sw; i += 16) _mm_prefetch((const char *)(p + i), _MM_HINT_T0);
}
/* o[0:64] = sum_t p[t] * v_t[0:64], the 64 outputs held in 8 registers across all keys; pf (or NULL): the
   keys' whole cache slots (sw floats), fetched PF_AHEAD keys ahead so the first pass over a row streams */
INLINE void pv64(const float *p, const float *const *v, int64_t L, float *o, const float *const *pf, int64_t sw) {
    __m256 a[8];
    for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
    for (int64_t t = 0; t < L; t++) {
        if (pf && t + PF_AHEAD < L) prefetch_slot(pf[t + PF_AHEAD], sw);
        __m256 pt = _mm256_set1_ps(p[t]);
        for (int i = 0; i < 8; i++) a[i] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(v[t] + 8 * i), a[i]);
    }
    for (int i = 0; i < 8; i++) _mm256_storeu_ps(o + 8 * i, a[i]);
}
#if defined(__AVX512F__) && defined(__AVX512VL__)
/* 32 vector registers: up to GQ query heads of one KV head share every key/value load (ng x 8 accumulators);
   each head's sums run in the same order as dot8x8 / pv64 (same bits, fewer loads) */
#define GQ 3
/* s[j * L + i] = q_j . k_i for 8 keys and the ng query heads q_j = q + j * hd */
INLINE void dotg8x8(const float *q, int ng, const float *const *k, int64_t hd, float *s, int64_t L) {
    __m256 a[GQ][8];
    for (int j = 0; j < ng; j++)
        for (int i = 0; i < 8; i++) a[j][i] = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) {
        __m256 qv[GQ];
        for (int j = 0; j < ng; j++) qv[j] = _mm256_loadu_ps(q + j * hd + d);
        for (int i = 0; i < 8; i++) {
            __m256 kv = _mm256_loadu_ps(k[i] + d);
            for (int j = 0; j < ng; j++) a[j][i] = _mm256_fmadd_ps(qv[j], kv, a[j][i]);
        }
    }
    for (int j = 0; j < ng; j++) {
        __m256 h01 = _mm256_hadd_ps(a[j][0], a[j][1]), h23 = _mm256_hadd_ps(a[j][2], a[j][3]);
        __m256 h45 = _mm256_hadd_ps(a[j][4], a[j][5]), h67 = _mm256_hadd_ps(a[j][6], a[j][7]);
        __m256 h0123 = _mm256_hadd_ps(h01, h23), h4567 = _mm256_hadd_ps(h45, h67);
        __m256 lo = _mm256_permute2f128_ps(h0123, h4567, 0x20), hi = _mm256_permute2f128_ps(h0123, h4567, 0x31);
        _mm256_storeu_ps(s + j * L, _mm256_add_ps(lo, hi));
    }
}
/* o_j[0:64] = sum_t p_j[t] * v_t[0:64] for ng heads (p_j = p + j * L, o_j = o + j * hd), each value row loaded once */
INLINE void pvg64(const float *p, int ng, int64_t L, const float *const *v, float *o, int64_t hd,
                  const float *const *pf, int64_t sw) {
    __m256 a[GQ][8];
    for (int j = 0; j < ng; j++)
        for (int i = 0; i < 8; i++) a[j][i] = _mm256_setzero_ps();
    for (int64_t t = 0; t < L; t++) {
        if (pf && t + PF_AHEAD < L) prefetch_slot(pf[t + PF_AHEAD], sw);
        __m256 pt[GQ];
        for (int j = 0; j < ng; j++) pt[j] = _mm256_set1_ps(p[j * L + t]);
        for (int i = 0; i < 8; i++) {
            __m256 vv = _mm256_loadu_ps(v[t] + 8 * i);
            for (int j = 0; j < ng; j++) a[j][i] = _mm256_fmadd_ps(pt[j], vv, a[j][i]);
        }
    }
    for (int j = 0; j < ng; j++)
        for (int i = 0; i < 8; i++) _mm256_storeu_ps(o + j * hd + 8 * i, a[j][i]);
}
#define HAVE_GQ 1
#endif
#endif
/* out[r, h*g + j, :] = softmax_t(scale * q[r, h*g + j] . K[t, h]) V[t, h] over t < lens[r], K/V rows found
   through row r's block table; q rows are q_stride floats apart, out rows o_stride */
int attn_decode(const float *q, int64_t q_stride, const float *kc, const float *vc, const int64_t *tables,
                 int64_t t_stride, const int64_t *lens, float *out, int64_t o_stride, int64_t n, int64_t nh,
                 int64_t nkv, int64_t hd, int64_t bs, float scale) {
    int64_t g = nh / nkv, slot_stride = nkv * hd;
    for (int64_t r = 0; r < n; r++) {
        int64_t L = lens[r];
        const int64_t *tab = tables + r * t_stride;
        float *s = malloc(sizeof(float) * (size_t)(nh * L));
        const float **krow = malloc(sizeof(float *) * (size_t)(4 * L));
        if (!s || !krow) { free(s); free(krow); return -1; }
        /* the row's key and value slots (all KV heads of a token), and per-head value rows and columns */
        const float **vbase = krow + L, **vrow = krow + 2 * L, **vcol = krow + 3 * L;
        for (int64_t t = 0; t < L; t++) {
            int64_t slot = tab[t / bs] * bs + t % bs;
            krow[t] = kc + slot * slot_stride;
            vbase[t] = vc + slot * slot_stride;
        }
        /* scores for every head: keys in token order, each slot's KV heads together (one sequential stream) */
        int64_t t8 = 0;
#ifdef HAVE_DOT8X8
        for (; t8 + 8 <= L; t8 += 8) {
            for (int64_t i = t8 + PF_AHEAD; i < t8 + PF_AHEAD + 8 && i < L; i++) prefetch_slot(krow[i], slot_stride);
            for (int64_t h = 0; h < nkv; h++) {
                const float *k8[8];
                for (int i = 0; i < 8; i++) k8[i] = krow[t8 + i] + h * hd;
                const float *qh = q + r * q_stride + h * g * hd;
                float *sh = s + h * g * L + t8;
#ifdef HAVE_GQ
                if (g == 3) { dotg8x8(qh, 3, k8, hd, sh, L); continue; }
                if (g == 2) { dotg8x8(qh, 2, k8, hd, sh, L); continue; }
#endif
                for (int64_t j = 0; j < g; j++) dot8x8(qh + j * hd, k8, hd, sh + j * L);
            }
        }
#endif
        for (int64_t h = 0; h < nkv; h++) {
            const float *qh = q + r * q_stride + h * g * hd;
            float *sh = s + h * g * L;
            float mx[GMAX], sum[GMAX];
            for (int64_t j = 0; j < g; j++) { mx[j] = -INFINITY; sum[j] = 0.0f; }
            int64_t t = t8;
            for (; t < L; t++) {
                const float *k = krow[t] + h * hd;
                for (int64_t j = 0; j < g; j++) sh[j * L + t] = dot8(qh + j * hd, k, hd);
            }
            for (int64_t j = 0; j < g; j++)
                for (int64_t i = 0; i < L; i++) {
                    float v = sh[j * L + i] * scale;
                    sh[j * L + i] = v;
                    if (v > mx[j]) mx[j] = v;
                }
            for (int64_t j = 0; j < g; j++) {
                float *sj = sh + j * L;
                int64_t t = 0;
#ifdef HAVE_EXP8
                __m256 m8 = _mm256_set1_ps(mx[j]), acc = _mm256_setzero_ps();
                for (; t + 8 <= L; t += 8) {
                    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sj + t), m8));
                    _mm256_storeu_ps(sj + t, e);
                    acc = _mm256_add_ps(acc, e);
                }
                float lanes[8];
                _mm256_storeu_ps(lanes, acc);
                sum[j] = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                         + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
#endif
                for (; t < L; t++) { float e = expf(sj[t] - mx[j]); sj[t] = e; sum[j] += e; }
            }
            float *o = out + r * o_stride + h * g * hd;
#ifdef HAVE_DOT8X8
            if (hd % 64 == 0) {
                for (int64_t t = 0; t < L; t++) vrow[t] = vbase[t] + h * hd;
#ifdef HAVE_GQ
                if (hd == 64 && g <= GQ) {
                    pvg64(sh, (int)g, L, vrow, o, hd, h == 0 ? vbase : NULL, slot_stride);
                    goto normalise;
                }
#endif
                for (int64_t j = 0; j < g; j++)
                    for (int64_t d = 0; d < hd; d += 64) {
                        for (int64_t t = 0; t < L; t++) vcol[t] = vrow[t] + d;
                        pv64(sh + j * L, vcol, L, o + j * hd + d, h == 0 && j == 0 && d == 0 ? vbase : NULL,
                             slot_stride);
                    }
            } else
#endif
            {
                for (int64_t i = 0; i < g * hd; i++) o[i] = 0.0f;
                for (int64_t t = 0; t < L; t++) {
                    const float *v = vbase[t] + h * hd;
                    for (int64_t j = 0; j < g; j++) {
                        float p = sh[j * L + t];
                        for (int64_t d = 0; d < hd; d++) o[j * hd + d] = fmaf(p, v[d], o[j * hd + d]);
                    }
                }
            }
#ifdef HAVE_GQ
        normalise:
#endif
            for (int64_t j = 0; j < g; j++)
                for (int64_t d = 0; d < hd; d++) o[j * hd + d] /= sum[j];
        }
        free(s); free(krow);
    }
    return 0;
}
"""


def declare(lib: ctypes.CDLL) -> None:
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.attn_decode.argtypes = [p, i, p, p, p, i, p, p, i, i, i, i, i, i, ctypes.c_float]
    lib.attn_decode.restype = ctypes.c_int


def supported(nh: int, nkv: int, hd: int, dtype: torch.dtype) -> bool:
    """The shapes the kernel handles: fp32, head_dim a multiple of 8, at most ``MAX_GROUP`` heads per KV head."""
    return dtype == torch.float32 and hd % 8 == 0 and nh % nkv == 0 and nh // nkv <= MAX_GROUP


def decode_attention(
    lib: ctypes.CDLL,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    out: torch.Tensor,
    block_size: int,
    scale: float,
) -> None:
    """``out[r] = attention(q[r], the first lens[r] tokens of row r's table)``, written in place.

    ``q``: ``[n, nh, hd]`` fp32 with unit-stride heads (rows may be strided); ``k_cache``/``v_cache``:
    ``[slots, nkv, hd]`` contiguous; ``tables``: ``[n, width]`` int64 block ids; ``lens``: ``[n]`` int64;
    ``out``: ``[n, nh, hd]`` with unit-stride heads.
    """
    n, nh, hd = q.shape
    nkv = k_cache.shape[1]
    assert q.stride(2) == 1 and q.stride(1) == hd and out.stride(2) == 1 and out.stride(1) == hd
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert tables.dtype == torch.int64 and tables.is_contiguous() and lens.dtype == torch.int64 and lens.is_contiguous()
    rc = lib.attn_decode(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), tables.stride(0),
        lens.data_ptr(), out.data_ptr(), out.stride(0), n, nh, nkv, hd, block_size, scale,
    )  # fmt: skip
    if rc:
        raise MemoryError(f"decode attention: no memory for the scores of {int(lens.max())} tokens")
