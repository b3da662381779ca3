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

import torch
import torch.nn.functional as F

from .kv_cache import KvCache
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


@dataclass
class AttnBatch:
    """How the flattened batch maps to sequences and cache blocks (built by ``runner.py``)."""

    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] where each token's K/V is written
    decodes: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillSegment] = field(default_factory=list)


class LlamaModel:
    def __init__(self, ckpt: Checkpoint, dtype: torch.dtype = torch.float32) -> None:
        cfg = ckpt.config
        self.cfg = cfg
        self.dtype = dtype
        t = ckpt.tensors
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise UnsupportedModel("attention heads must be a multiple of KV heads")

        def get(name: str) -> torch.Tensor:
            if name not in t:
                raise UnsupportedModel(f"checkpoint lacks tensor {name}")
            return t[name].to(dtype).contiguous()

        self.embed = get("model.embed_tokens.weight")
        self.lm_head = (
            self.embed if cfg.tie_word_embeddings or "lm_head.weight" not in t else get("lm_head.weight")
        )
        self.norm = get("model.norm.weight")
        self.layers: list[dict[str, torch.Tensor]] = []
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            self.layers.append(
                {
                    "in_norm": get(p + "input_layernorm.weight"),
                    "post_norm": get(p + "post_attention_layernorm.weight"),
                    # fused projections: one matmul for q|k|v and one for gate|up
                    "qkv": torch.cat(
                        [
                            get(p + "self_attn.q_proj.weight"),
                            get(p + "self_attn.k_proj.weight"),
                            get(p + "self_attn.v_proj.weight"),
                        ]
                    ).contiguous(),
                    "o": get(p + "self_attn.o_proj.weight"),
                    "gate_up": torch.cat(
                        [get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]
                    ).contiguous(),
                    "down": get(p + "mlp.down_proj.weight"),
                }
            )
            for k in list(t):
                if k.startswith(p):
                    del t[k]  # drop the unfused copies as we go to bound peak memory
        self.inv_freq = rope_inv_freq(cfg, ckpt.rope_freqs)
        self.scale = cfg.head_dim**-0.5
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        self._ensure_rope(cfg.max_position_embeddings)

    @property
    def nbytes(self) -> int:
        ts = [self.embed, self.norm] + [v for layer in self.layers for v in layer.values()]
        if self.lm_head is not self.embed:
            ts.append(self.lm_head)
        return sum(x.numel() * x.element_size() for x in ts)

    def _ensure_rope(self, n: int) -> None:
        if self._cos is not None and self._cos.shape[0] >= n:
            return
        pos = torch.arange(n, dtype=torch.float)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos, self._sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.float32)
        var = xf.pow(2).mean(-1, keepdim=True)
        return w * (xf * torch.rsqrt(var + self.cfg.rms_norm_eps)).to(x.dtype)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

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
        x = self.embed[input_ids]
        for li, w in enumerate(self.layers):
            h = self._rms(x, w["in_norm"])
            qkv = F.linear(h, w["qkv"])
            q = qkv[:, : nh * hd].view(T, nh, hd)
            k = qkv[:, nh * hd : (nh + nkv) * hd].view(T, nkv, hd)
            v = qkv[:, (nh + nkv) * hd :].view(T, nkv, hd)
            q = self._rope(q, cos, sin)
            k = self._rope(k, cos, sin)
            kc, vc = kv.k[li], kv.v[li]
            kc.index_copy_(0, batch.slot_mapping, k)
            vc.index_copy_(0, batch.slot_mapping, v)
            out = torch.empty(T, nh, hd, dtype=x.dtype)
            # block-granular views: gathering whole blocks is a few memcpys, not one per token
            kb, vb = kc.view(kv.num_blocks, -1), vc.view(kv.num_blocks, -1)
            for dg in batch.decodes:
                rows = slice(dg.q_start, dg.q_start + dg.n)
                # grouped-query trick: the g query heads sharing a KV head attend as one [g, L] block
                qd = q[rows].view(dg.n, nkv, g, hd)
                idx = dg.tables.view(-1)
                kd = kb.index_select(0, idx).view(dg.n, -1, nkv, hd).transpose(1, 2)
                vd = vb.index_select(0, idx).view(dg.n, -1, nkv, hd).transpose(1, 2)
                od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=dg.mask, scale=self.scale)
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
            x = x + F.linear(out.view(T, nh * hd), w["o"])
            h = self._rms(x, w["post_norm"])
            gu = F.linear(h, w["gate_up"])
            inter = gu.shape[-1] // 2
            x = x + F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], w["down"])
        last = self._rms(x[logits_rows], self.norm)
        return F.linear(last, self.lm_head).float()
