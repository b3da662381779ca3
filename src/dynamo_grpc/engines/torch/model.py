"""A Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU) that reads and writes a paged KV cache.

One forward pass runs a flattened batch: every scheduled token of every sequence in
one ``[T, hidden]`` matrix for the projections and MLP (the big matmuls), and
attention per group: single-token decodes batched in groups of similar length (whole
blocks gathered from their block tables, padded, masked), each prefill chunk on its own (causal, offset by the
tokens already cached). The arithmetic mirrors transformers' LlamaForCausalLM so
logits agree to fp32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .decode_step import DecodeStack
from .exact_gemv import ExactBlocks, kernels, status
from .kv_cache import KvCache
from .linear import Dense, Linear, Q4Blocks, Quantised, make_linear
from .paged_attention import decode_attention
from .paged_attention import supported as attention_supported
from .w4a8 import W4A8
from .weights import Checkpoint, UnsupportedModel, rope_inv_freq


@dataclass
class PrefillSegment:
    q_start: int  # first row in the flattened batch
    q_len: int
    start: int  # tokens of this sequence already in the cache
    #: the sequence's block table (None when start == 0: keys come from this chunk itself)
    blocks: torch.Tensor | None


@dataclass
class DecodeGroup:
    """Single-token decodes of similar length, attended together over their padded block tables."""

    q_start: int
    n: int
    tables: torch.Tensor  # [n, max_blocks] block ids (padding: block 0, masked)
    mask: torch.Tensor  # [n, 1, 1, max_blocks * block_size] True where attended
    #: [n] tokens each row attends to (its position + 1): the C kernel reads only those (paged_attention.py)
    lens: torch.Tensor | None = None


@dataclass
class AttnBatch:
    """How the flattened batch maps to sequences and cache blocks (built by ``runner.py``)."""

    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] where each token's K/V is written
    decodes: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillSegment] = field(default_factory=list)


class LlamaModel:
    """The decoder's weights and forward pass; ``weights`` is the matmul format (see ``linear.py``)."""

    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype = torch.float32, weights: str = "dense") -> None:
        cfg = ckpt.config
        self.cfg = cfg
        self.dtype = dtype
        self.weights = weights
        t = ckpt.tensors
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise UnsupportedModel("attention heads must be a multiple of KV heads")

        def get(name: str) -> torch.Tensor:
            if name not in t:
                raise UnsupportedModel(f"checkpoint lacks tensor {name}")
            return t[name].to(dtype).contiguous()

        def raw(name: str) -> torch.Tensor | Q4Blocks:
            if name in ckpt.q4:
                return ckpt.q4[name]
            if name not in t:
                raise UnsupportedModel(f"checkpoint lacks tensor {name}")
            return t[name]

        # fp32 from a GGUF's blocks: few-row matmuls read the blocks, same weights (exact_gemv.py)
        lib = kernels() if weights == "dense" and dtype == torch.float32 and (ckpt.q4 or ckpt.q8) else None
        if weights == "w4a8":  # llama.cpp's arithmetic on the same blocks (w4a8.py): the kernels or nothing
            lib = kernels()
            if lib is None or dtype != torch.float32:
                raise UnsupportedModel(f"weights=w4a8 needs the C kernels and float32 ({status()}, {dtype})")

        def fused(*names: str) -> Linear:
            """One matmul for several projections (q|k|v, gate|up): rows concatenated, blocks too."""
            parts = [raw(n) for n in names]
            if weights == "w4a8":  # the file's Q4_1 blocks, or min/max groups of 32 from other weights
                q4 = [x if isinstance(x, Q4Blocks) else Q4Blocks.quantize(x.float()) for x in parts]
                assert lib is not None
                return W4A8(
                    ExactBlocks(lib, Q4Blocks(*(torch.cat([getattr(b, f) for b in q4]) for f in ("q", "scale", "low"))))
                )
            if all(isinstance(x, Q4Blocks) for x in parts) and (weights == "int4" or lib is not None):
                qs = [x for x in parts if isinstance(x, Q4Blocks)]
                cat = Q4Blocks(*(torch.cat([getattr(b, f) for b in qs]) for f in ("q", "scale", "low")))
                return ExactBlocks(lib, cat) if lib is not None else make_linear(weights, None, cat, dtype)
            dense = [x.dequantize() if isinstance(x, Q4Blocks) else x.float() for x in parts]
            return make_linear(weights, torch.cat(dense), None, dtype)

        fp32_embed = weights in ("dense", "w4a8")
        embed = get("model.embed_tokens.weight") if fp32_embed else t["model.embed_tokens.weight"]
        tied = cfg.tie_word_embeddings or "lm_head.weight" not in t
        # the vocabulary matmul (a fifth of the fp32 bytes; Q8_0 in the default file, as llama.cpp keeps it):
        # int8 in both quantised modes; at 4 bits it cost int4 perplexity 13.41 -> 14.13 (fp32: 13.44)
        head = "dense" if fp32_embed else "int8"
        head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
        if lib is not None and head_name in ckpt.q8:
            self.lm_head: Linear = ExactBlocks(lib, ckpt.q8.pop(head_name), embed if tied else t[head_name])
            if weights == "w4a8":
                self.lm_head = W4A8(self.lm_head)
        else:
            self.lm_head = make_linear(head, embed if tied else t["lm_head.weight"], None, dtype)
        if tied and isinstance(self.lm_head, Quantised):
            self._embed_rows: Quantised | None = self.lm_head
            self.embed = torch.empty(0)
        else:
            self._embed_rows = None
            self.embed = embed.to(dtype).contiguous()
        self.norm = get("model.norm.weight")
        self.layers: list[dict[str, Any]] = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            self.layers.append(
                {
                    "in_norm": get(p + "input_layernorm.weight"),
                    "post_norm": get(p + "post_attention_layernorm.weight"),
                    "qkv": fused(
                        p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"
                    ),
                    "o": fused(p + "self_attn.o_proj.weight"),
                    "gate_up": fused(p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                    "down": fused(p + "mlp.down_proj.weight"),
                }
            )
            for k in list(t):
                if k.startswith(p):
                    del t[k]  # drop the unfused copies as we go to bound peak memory
            for k in list(ckpt.q4):
                if k.startswith(p):
                    del ckpt.q4[k]
        # decode attention reads the paged cache in place where the kernels are built (fp32 only)
        self.attn_lib = (
            lib
            if lib is not None
            and attention_supported(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, dtype)
            else None
        )
        # decode-only steps: every layer in one C call (decode_step.py) when all are Q4_1 blocks (few rows, or
        # any number when each has block-GEMM panels)
        self.stack = DecodeStack.build(self.attn_lib, self.layers, cfg)
        self.inv_freq = rope_inv_freq(cfg, ckpt.rope_freqs)
        self.scale = cfg.head_dim**-0.5
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        self._ensure_rope(cfg.max_position_embeddings)

    @property
    def nbytes(self) -> int:
        """Bytes of weights a decode step reads (embedding rows aside, when untied)."""
        n = self.norm.numel() * self.norm.element_size() + self.lm_head.nbytes
        for layer in self.layers:
            for v in layer.values():
                n += v.nbytes if isinstance(v, Linear) else v.numel() * v.element_size()
        shared = isinstance(self.lm_head, Dense | ExactBlocks | W4A8) and self.lm_head.w is self.embed
        if self._embed_rows is None and not shared:
            n += self.embed.numel() * self.embed.element_size()
        return n

    def embed_rows(self, ids: torch.Tensor) -> torch.Tensor:
        if self._embed_rows is not None:
            return self._embed_rows.rows(ids).to(self.dtype)
        return self.embed[ids]

    def _ensure_rope(self, n: int) -> None:
        if self._cos is not None and self._cos.shape[0] >= n:
            return
        pos = torch.arange(n, dtype=torch.float)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos = emb.cos().to(self.dtype)
        # rotate_half(x) * sin == roll(x, half) * [-sin | sin]: one roll instead of slice/neg/cat (same bits)
        sin = emb.sin()
        half = sin.shape[-1] // 2
        self._sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(self.dtype)

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # transformers' arithmetic, minus the no-op casts
            return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps))
        xf = x.to(torch.float32)
        var = xf.pow(2).mean(-1, keepdim=True)
        return w * (xf * torch.rsqrt(var + self.cfg.rms_norm_eps)).to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """HF's ``x·cos + rotate_half(x)·sin`` with the sign folded into the sine table."""
        return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, batch: AttnBatch, kv: KvCache, logits_rows: torch.Tensor
    ) -> torch.Tensor:
        """Run the batch, write its K/V into ``kv``, return logits ``[len(logits_rows), vocab]`` (fp32)."""
        cfg = self.cfg
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        g = nh // nkv
        T = input_ids.shape[0]
        self._ensure_rope(int(batch.positions.max()) + 1)
        assert self._cos is not None and self._sin is not None
        cos = self._cos[batch.positions].unsqueeze(1)
        sin = self._sin[batch.positions].unsqueeze(1)
        x = self.embed_rows(input_ids)
        attn_lib = self.attn_lib
        if attn_lib is not None:
            for dg in batch.decodes:  # the kernel trusts the tables: check them once per step, not per layer
                if dg.lens is None or not bool((dg.lens <= dg.tables.shape[1] * kv.block_size).all()):
                    attn_lib = None
        if self.stack is not None and attn_lib is not None and not batch.prefills and T <= self.stack.max_rows:
            tables, lens = _row_tables(batch.decodes, T)
            self.stack.run(
                x, cos[:, 0].contiguous(), sin[:, 0].contiguous(), batch.slot_mapping, tables, lens,
                kv.k, kv.v, kv.block_size, self.scale,
            )  # fmt: skip
            last = self._rms(x[logits_rows], self.norm)
            return self.lm_head(last).float()
        for li, w in enumerate(self.layers):
            h = self._rms(x, w["in_norm"])
            qkv = w["qkv"](h)
            # RoPE on q and k together: one set of elementwise ops per layer
            qk = self._rope(qkv[:, : (nh + nkv) * hd].view(T, nh + nkv, hd), cos, sin)
            q, k = qk[:, :nh], qk[:, nh:]
            v = qkv[:, (nh + nkv) * hd :].view(T, nkv, hd)
            kc, vc = kv.k[li], kv.v[li]
            kc.index_copy_(0, batch.slot_mapping, k)
            vc.index_copy_(0, batch.slot_mapping, v)
            # a decode-only step with one group (a single stream, most steps): attention writes the output itself
            only = len(batch.decodes) == 1 and not batch.prefills and attn_lib is None
            out = torch.empty(0) if only else torch.empty(T, nh, hd, dtype=x.dtype)
            # block-granular views: gathering whole blocks is a few memcpys, not one per token
            kb, vb = kc.view(kv.num_blocks, -1), vc.view(kv.num_blocks, -1)
            for dg in batch.decodes:
                rows = slice(dg.q_start, dg.q_start + dg.n)
                if attn_lib is not None:
                    assert dg.lens is not None
                    decode_attention(
                        attn_lib, q[rows], kc, vc, dg.tables, dg.lens, out[rows], kv.block_size, self.scale
                    )
                    continue
                # grouped-query trick: the g query heads sharing a KV head attend as one [g, L] block
                qd = q[rows].view(dg.n, nkv, g, hd)
                idx = dg.tables.view(-1)
                kd = kb.index_select(0, idx).view(dg.n, -1, nkv, hd).transpose(1, 2)
                vd = vb.index_select(0, idx).view(dg.n, -1, nkv, hd).transpose(1, 2)
                od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=dg.mask, scale=self.scale)
                if only:
                    out = od.reshape(dg.n, nh, hd)
                else:
                    out[rows] = od.reshape(dg.n, nh, hd)
            for seg in batch.prefills:
                rows = slice(seg.q_start, seg.q_start + seg.q_len)
                qs = q[rows].transpose(0, 1).unsqueeze(0)  # [1, nh, q, hd]
                if seg.blocks is None:
                    ks, vs = k[rows], v[rows]
                    mask = None
                else:
                    ctx = seg.start + seg.q_len
                    ks = kb.index_select(0, seg.blocks).view(-1, nkv, hd)[:ctx]
                    vs = vb.index_select(0, seg.blocks).view(-1, nkv, hd)[:ctx]
                    qpos = torch.arange(seg.start, ctx).unsqueeze(1)
                    mask = torch.arange(ctx).unsqueeze(0) <= qpos
                ks = ks.transpose(0, 1).unsqueeze(0)
                vs = vs.transpose(0, 1).unsqueeze(0)
                os_ = F.scaled_dot_product_attention(
                    qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=self.scale, enable_gqa=g > 1
                )
                out[rows] = os_[0].transpose(0, 1)
            x = x + w["o"](out.reshape(T, nh * hd))
            h = self._rms(x, w["post_norm"])
            gu = w["gate_up"](h)
            inter = gu.shape[-1] // 2
            x = x + w["down"](F.silu(gu[:, :inter]) * gu[:, inter:])
        last = self._rms(x[logits_rows], self.norm)
        return self.lm_head(last).float()


def _row_tables(groups: list[DecodeGroup], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One block table and length per decode row, across groups (padded to the widest)."""
    if len(groups) == 1:
        assert groups[0].lens is not None
        return groups[0].tables, groups[0].lens
    width = max(dg.tables.shape[1] for dg in groups)
    tables = torch.zeros(rows, width, dtype=torch.long)
    lens = torch.empty(rows, dtype=torch.long)
    for dg in groups:
        assert dg.lens is not None
        tables[dg.q_start : dg.q_start + dg.n, : dg.tables.shape[1]] = dg.tables
        lens[dg.q_start : dg.q_start + dg.n] = dg.lens
    return tables, lens
