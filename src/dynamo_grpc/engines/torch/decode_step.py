"""A whole decoder stack for a few decode rows in one C call: no per-layer Python or torch dispatch.

With the fp32 block kernels (``exact_gemv.py``) a single-stream step's matmuls take ~7 ms on one core
and the ~35 small torch ops per layer around them (RMSNorm, RoPE, slices, cache writes, residuals,
SiLU) another ~3 ms: a few microseconds of dispatch each, times 30 layers. For decode-only steps of up
to ``EXACT_ROWS`` rows over Q4_1 layers (of any number when every matmul has ``block_gemm.py``'s panels,
which then do the matmuls above 8 rows) this module runs every layer in C instead, with the same
arithmetic in the same order as ``model.py``: RMSNorm ``w · (x · (1/sqrt(mean(x²) + eps)))``, RoPE
``x·cos + roll(x)·signed_sin`` from the same tables, the block matmuls, attention read in place from
the paged cache (``paged_attention.py``), ``silu(g) · u`` with ``g / (1 + exp(-g))`` (8 lanes with the
attention's ``exp8``), residual adds.
Only summation orders (the mean of squares, the matmuls, attention) and the last bit of ``exp`` can
differ from torch's; the tests hold it to the torch path's logits and greedy tokens.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from .w4a8 import W4A8

#: most rows per call with the few-row kernels (their and w4a8's limit, ``exact_gemv.EXACT_ROWS``); a stack
#: whose weights all have block-GEMM panels (``block_gemm.py``) takes any number (``DecodeStack.max_rows``)
MAX_ROWS = 8

#: per layer, the pointers the C side reads (see ``decode_layers`` in SOURCE)
_FIELDS = 14

SOURCE = r"""
/* ---- all decoder layers for R <= 8 decode rows (decode_step.py) ---- */
int block_gemm(int kind, const void *qp, const float *d, const float *m, int f16, const float *x, float *y,
               int64_t N, int64_t K, int64_t R);
/* pp: the same weight's block-GEMM panels (qp, dp, mp, f16), or NULL; more than 8 rows need them (fp32 in every
   mode, as the layer-by-layer path computes them; f16: the weight's own rebuild rule, see block_gemm.py) */
static int mm_q4(int mode, const int64_t *p, const int64_t *pp, const float *x, float *y, int64_t N, int64_t K,
                 int64_t R) {
    const uint8_t *qs = (const uint8_t *)p[0];
    const float *d = (const float *)p[1], *m = (const float *)p[2];
    if (R > 8) {
        if (pp == NULL) return -2;
        return block_gemm(0, (const void *)pp[0], (const float *)pp[1], (const float *)pp[2], (int)pp[3], x, y, N, K,
                          R);
    }
    if (mode == 2) return q4_1_w4a8(qs, d, m, x, y, N, K, R);
    if (mode == 0) q4_1_gemv_f16(qs, d, m, x, y, N, K, R);
    else q4_1_gemv(qs, d, m, x, y, N, K, R);
    return 0;
}
/* a[i] = silu(g[i]) * u[i] as model.py computes it, g / (1 + exp(-g)) * u (8 lanes with exp8 where built) */
static void silu_mul(const float *g, const float *u, float *a, int64_t n) {
    int64_t i = 0;
#ifdef HAVE_EXP8
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 e = exp8(_mm256_sub_ps(zero, gv));
        _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
#endif
    for (; i < n; i++) a[i] = (g[i] / (1.0f + expf(-g[i]))) * u[i];
}
/* torch's fp32 RMSNorm as model.py writes it: w * (x * rsqrt(mean(x^2) + eps)) */
static void rms_rows(const float *x, const float *w, float *h, int64_t R, int64_t H, float eps) {
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + r * H;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 8 <= H; i += 8) for (int l = 0; l < 8; l++) acc[l] += xr[i + l] * xr[i + l];
        for (; i < H; i++) acc[0] += xr[i] * xr[i];
        float ss = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        float inv = 1.0f / sqrtf(ss / (float)H + eps);
        for (int64_t j = 0; j < H; j++) h[r * H + j] = w[j] * (xr[j] * inv);
    }
}
/* x [R, H] in place. lp: per layer in_norm, post_norm, then (qs, d, m) of qkv, o, gate_up, down; pp: NULL or per
   layer the block-GEMM panels (qp, dp, mp, f16) of qkv, o, gate_up, down (needed above 8 rows).
   kv: per layer k cache, v cache. cs/sn: [R, hd] cos and signed-sin rows of each row's position.
   mode: 0 fp32 blocks (one fma per weight), 1 fp32 blocks (two roundings), 2 w4a8. -1: out of memory. */
int decode_layers(int64_t nl, const int64_t *lp, const int64_t *pp, const int64_t *kvp, int mode, float *x, int64_t R,
                  const float *cs, const float *sn, const int64_t *slots, const int64_t *tables, int64_t t_stride,
                  const int64_t *lens, int64_t H, int64_t I, int64_t nh, int64_t nkv, int64_t hd, int64_t bs,
                  float eps, float scale) {
    int64_t nq = (nh + 2 * nkv) * hd, half = hd / 2, slot_w = nkv * hd;
    float *h = malloc(sizeof(float) * (size_t)(R * H)), *qkv = malloc(sizeof(float) * (size_t)(R * nq));
    float *att = malloc(sizeof(float) * (size_t)(R * nh * hd)), *t = malloc(sizeof(float) * (size_t)(R * H));
    float *gu = malloc(sizeof(float) * (size_t)(R * 2 * I)), *act = malloc(sizeof(float) * (size_t)(R * I));
    float *tmp = malloc(sizeof(float) * (size_t)hd);
    int rc = (h && qkv && att && t && gu && act && tmp) ? 0 : -1;
    if (R > 8 && pp == NULL) rc = -2; /* the few-row kernels' limit */
    for (int64_t l = 0; l < nl && rc == 0; l++) {
        const int64_t *p = lp + l * 14, *q = pp ? pp + l * 16 : NULL;
        float *kc = (float *)kvp[2 * l], *vc = (float *)kvp[2 * l + 1];
        rms_rows(x, (const float *)p[0], h, R, H, eps);
        if ((rc = mm_q4(mode, p + 2, q ? q : NULL, h, qkv, nq, H, R))) break;
        for (int64_t r = 0; r < R; r++) {
            float *row = qkv + r * nq;
            const float *c = cs + r * hd, *s = sn + r * hd;
            for (int64_t head = 0; head < nh + nkv; head++) { /* RoPE on q and k heads */
                float *v = row + head * hd;
                for (int64_t i = 0; i < half; i++) tmp[i] = v[i] * c[i] + v[i + half] * s[i];
                for (int64_t i = half; i < hd; i++) tmp[i] = v[i] * c[i] + v[i - half] * s[i];
                for (int64_t i = 0; i < hd; i++) v[i] = tmp[i];
            }
            float *kd = kc + slots[r] * slot_w, *vd = vc + slots[r] * slot_w;
            for (int64_t i = 0; i < slot_w; i++) { kd[i] = row[nh * hd + i]; vd[i] = row[(nh + nkv) * hd + i]; }
        }
        if ((rc = attn_decode(qkv, nq, kc, vc, tables, t_stride, lens, att, nh * hd, R, nh, nkv, hd, bs, scale))) break;
        if ((rc = mm_q4(mode, p + 5, q ? q + 4 : NULL, att, t, H, nh * hd, R))) break;
        for (int64_t i = 0; i < R * H; i++) x[i] = x[i] + t[i];
        rms_rows(x, (const float *)p[1], h, R, H, eps);
        if ((rc = mm_q4(mode, p + 8, q ? q + 8 : NULL, h, gu, 2 * I, H, R))) break;
        for (int64_t r = 0; r < R; r++) silu_mul(gu + r * 2 * I, gu + r * 2 * I + I, act + r * I, I);
        if ((rc = mm_q4(mode, p + 11, q ? q + 12 : NULL, act, t, H, I, R))) break;
        for (int64_t i = 0; i < R * H; i++) x[i] = x[i] + t[i];
    }
    free(h); free(qkv); free(att); free(t); free(gu); free(act); free(tmp);
    return rc;
}
"""


def declare(lib: ctypes.CDLL) -> None:
    p, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.decode_layers.argtypes = [i, p, p, p, ctypes.c_int, p, i, p, p, p, p, i, p, i, i, i, i, i, i, f, f]
    lib.decode_layers.restype = ctypes.c_int


class DecodeStack:
    """The layers of a model whose matmuls are all Q4_1 block weights, as one C call per decode step."""

    def __init__(self, lib: ctypes.CDLL, layers: list[dict[str, Any]], cfg: Any) -> None:
        self.lib = lib
        self.cfg = cfg
        rows = []
        self._keep: list[Any] = []  # the panels the pointers point into, alive as long as the stack
        panels: list[list[int]] | None = []
        modes = set()
        for w in layers:
            ptrs = [w["in_norm"].data_ptr(), w["post_norm"].data_ptr()]
            pan: list[int] = []
            for name in ("qkv", "o", "gate_up", "down"):
                lin = w[name]
                b = lin.blocks if isinstance(lin, W4A8) else lin  # an ExactBlocks (exact_gemv.py) or not
                low = getattr(b, "low", None)
                if low is None:
                    raise TypeError(f"{name}: not a Q4_1 block weight ({type(lin).__name__})")
                ptrs += [b.qs.data_ptr(), b.scale.data_ptr(), low.data_ptr()]
                modes.add(2 if isinstance(lin, W4A8) else 0 if b.f16 else 1)
                if b.panel is not None:
                    pan += [b.panel.qp.data_ptr(), b.panel.dp.data_ptr(), b.panel.mp.data_ptr(), b.panel.f16]
                    self._keep.append(b.panel)
            rows.append(ptrs)
            if panels is not None and len(pan) == 16:
                panels.append(pan)
            else:
                panels = None
        if len(modes) != 1:
            raise TypeError(f"mixed block kernels {sorted(modes)}")
        self.mode = modes.pop()
        self.layers = layers  # keeps the tensors the pointers point into alive
        self.ptrs = torch.tensor(rows, dtype=torch.int64)
        assert self.ptrs.shape[1] == _FIELDS
        # every matmul with block-GEMM panels: steps of any number of decode rows run here
        self.panels = torch.tensor(panels, dtype=torch.int64) if panels else None
        self.max_rows = MAX_ROWS if self.panels is None else 1 << 30

    @staticmethod
    def build(lib: ctypes.CDLL | None, layers: list[dict[str, Any]], cfg: Any) -> DecodeStack | None:
        """The stack when every layer qualifies (Q4_1 blocks, one kernel kind, fp32 norms), else None."""
        if lib is None or any(w["in_norm"].dtype != torch.float32 for w in layers):
            return None
        try:
            return DecodeStack(lib, layers, cfg)
        except TypeError:
            return None

    def run(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        tables: torch.Tensor,
        lens: torch.Tensor,
        k_cache: list[torch.Tensor],
        v_cache: list[torch.Tensor],
        block_size: int,
        scale: float,
    ) -> None:
        """Every layer on ``x`` ``[R, hidden]`` (in place), writing each row's K/V to ``slots``."""
        cfg = self.cfg
        R = x.shape[0]
        assert R <= self.max_rows and x.is_contiguous() and x.dtype == torch.float32
        assert cos.shape == (R, cfg.head_dim) and cos.is_contiguous() and sin.is_contiguous()
        kvp = torch.tensor(
            [t.data_ptr() for pair in zip(k_cache, v_cache, strict=True) for t in pair], dtype=torch.int64
        )
        panels = self.panels.data_ptr() if self.panels is not None else None
        rc = self.lib.decode_layers(
            len(self.layers), self.ptrs.data_ptr(), panels, kvp.data_ptr(), self.mode, x.data_ptr(), R,
            cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), tables.data_ptr(), tables.stride(0), lens.data_ptr(),
            cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            block_size, cfg.rms_norm_eps, scale,
        )  # fmt: skip
        if rc:
            raise MemoryError("decode step: out of memory for its buffers") if rc == -1 else ValueError(f"{R} rows")
