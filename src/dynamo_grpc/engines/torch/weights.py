"""Read a Llama-family checkpoint (GGUF file or HF safetensors directory) into torch tensors.

The result is one :class:`LlamaConfig` plus a dict of HF-named tensors
(``model.layers.{i}.self_attn.q_proj.weight`` ...), so ``model.py`` has one layout to
serve. GGUF quantised tensors are dequantised with ``gguf.quants.dequantize``; llama.cpp's
converter permutes the rows of the Q and K projections (its RoPE pairs adjacent
dimensions, HF's ``rotate_half`` pairs the two halves), and we undo that permutation here
so logits match ``transformers`` on the same file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .exact_gemv import Q8Blocks
from .linear import Q4Blocks


class UnsupportedModel(ValueError):
    """The checkpoint is not a Llama-family model this engine can run."""


@dataclass
class LlamaConfig:
    """Architecture hyper-parameters, named as in HF's LlamaConfig."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclass
class Checkpoint:
    config: LlamaConfig
    tensors: dict[str, torch.Tensor]
    #: rope frequency factors shipped in the file (llama3-style GGUF ``rope_freqs.weight``)
    rope_freqs: torch.Tensor | None = None
    #: GGUF Q4_1 weights as their blocks (``keep_q4=True``), instead of in ``tensors``
    q4: dict[str, Q4Blocks] = field(default_factory=dict)
    #: GGUF Q8_0 tables as their blocks (``keep_q8=True``), *besides* their fp32 values in ``tensors``
    q8: dict[str, Q8Blocks] = field(default_factory=dict)


_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LLAMA_ARCHS = {"llama", "mistral"}


def load_checkpoint(
    path: str | Path, dtype: torch.dtype = torch.float32, keep_q4: bool = False, keep_q8: bool = False
) -> Checkpoint:
    """Load a ``.gguf`` file or a directory holding ``config.json`` + ``*.safetensors``.

    ``keep_q4``: a GGUF's Q4_1 layer weights stay as blocks (``Checkpoint.q4``) for the int4 format and
    the fp32 block kernels; ``keep_q8``: its Q8_0 embedding/output tables are also kept as blocks.
    """
    p = Path(path)
    if p.is_dir():
        ggufs = sorted(p.glob("*.gguf"))
        if (p / "config.json").exists():
            return _load_safetensors_dir(p, dtype)
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], dtype, keep_q4, keep_q8)
        raise UnsupportedModel(f"{p}: no config.json + *.safetensors and not exactly one .gguf file")
    if p.suffix == ".gguf":
        return _load_gguf(p, dtype, keep_q4, keep_q8)
    raise UnsupportedModel(f"{p}: expected a .gguf file or a safetensors directory")


# ---------------------------------------------------------------------------------------- GGUF


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute`` for Q/K rows (interleaved RoPE -> rotate_half)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader: Any) -> LlamaConfig:
    """Architecture from GGUF metadata (``{arch}.*`` keys)."""
    arch = _field(reader, "general.architecture")
    if arch not in _LLAMA_ARCHS:
        raise UnsupportedModel(f"GGUF architecture {arch!r} is not Llama-family")
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // n_head))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size")
    if vocab is None:
        vocab = len(tokens.data) if tokens is not None else None
    if vocab is None:
        raise UnsupportedModel("GGUF has neither a vocab_size nor a token list")
    scaling: dict[str, Any] | None = None
    stype = _field(reader, f"{arch}.rope.scaling.type")
    factor = _field(reader, f"{arch}.rope.scaling.factor")
    if stype and stype != "none" and factor and float(factor) != 1.0:
        scaling = {"rope_type": stype, "factor": float(factor)}
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    eos_ids = [int(x) for x in (eos, eot) if x is not None]
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    names = {t.name for t in reader.tensors}
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_field(reader, f"{arch}.block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        eos_token_ids=list(dict.fromkeys(eos_ids)),
        bos_token_id=int(bos) if bos is not None else None,
    )


def q4_1_blocks(data: np.ndarray, rows: int, cols: int) -> Q4Blocks:
    """Split GGUF Q4_1 bytes (per block of 32: fp16 d, fp16 m, 16 bytes of nibbles) into q, d, m."""
    nb = cols // 32
    raw = np.ascontiguousarray(data).reshape(rows, nb, 20)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    m = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    qs = raw[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols)  # low nibbles are 0..15
    return Q4Blocks(torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(m))


def q8_0_blocks(data: np.ndarray, rows: int, cols: int) -> Q8Blocks:
    """Split GGUF Q8_0 bytes (per block of 32: fp16 d, 32 int8) into q and d."""
    raw = np.ascontiguousarray(data).reshape(rows, cols // 32, 34)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    q = raw[..., 2:].copy().view(np.int8).reshape(rows, cols)
    return Q8Blocks(torch.from_numpy(q), torch.from_numpy(d))


def _load_gguf(path: Path, dtype: torch.dtype, keep_q4: bool = False, keep_q8: bool = False) -> Checkpoint:
    import gguf  # the gguf package is light, but only GGUF users need it

    reader = gguf.GGUFReader(str(path))
    cfg = gguf_config(reader)
    tensors: dict[str, torch.Tensor] = {}
    q4: dict[str, Q4Blocks] = {}
    q8: dict[str, Q8Blocks] = {}
    rope_freqs: torch.Tensor | None = None
    for t in reader.tensors:
        shape = [int(x) for x in reversed(t.shape.tolist())]
        blocks = None
        if keep_q4 and t.tensor_type == gguf.GGMLQuantizationType.Q4_1 and t.name.startswith("blk."):
            blocks = q4_1_blocks(t.data, shape[0], shape[1])
            arr = np.empty(0, dtype=np.float32)  # the blocks stand in for it
        else:
            arr = gguf.quants.dequantize(t.data, t.tensor_type)
            arr = np.array(arr, dtype=np.float32).reshape(shape)
        name = t.name
        if name == "rope_freqs.weight":
            rope_freqs = torch.from_numpy(arr.copy())
            continue
        if name.startswith("blk."):
            _, idx, rest = name.split(".", 2)
            part, suffix = rest.rsplit(".", 1)
            hf = _GGUF_LAYER_NAMES.get(part)
            if hf is None:
                raise UnsupportedModel(f"unexpected GGUF tensor {name}")
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(part)
            if heads is not None and blocks is None:
                arr = _unpermute(arr, heads)
            elif heads is not None and blocks is not None:
                perm = _unpermute(np.arange(shape[0]), heads)
                blocks = Q4Blocks(blocks.q[perm], blocks.scale[perm], blocks.low[perm])
            key = f"model.layers.{idx}.{hf}.{suffix}"
        elif name in _GGUF_TOP_NAMES:
            key = _GGUF_TOP_NAMES[name]
        else:
            raise UnsupportedModel(f"unexpected GGUF tensor {name}")
        if blocks is not None:
            q4[key] = blocks
            continue
        if keep_q8 and t.tensor_type == gguf.GGMLQuantizationType.Q8_0 and not name.startswith("blk."):
            q8[key] = q8_0_blocks(t.data, shape[0], shape[1])
        tensors[key] = torch.from_numpy(np.ascontiguousarray(arr)).to(dtype)
    return Checkpoint(cfg, tensors, rope_freqs, q4, q8)


# -------------------------------------------------------------------------------- safetensors


def hf_config(raw: dict[str, Any]) -> LlamaConfig:
    """Architecture from an HF ``config.json``."""
    mt = raw.get("model_type")
    if mt not in _LLAMA_ARCHS:
        raise UnsupportedModel(f"model_type {mt!r} is not Llama-family")
    n_head = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    eos = raw.get("eos_token_id")
    eos_ids = [int(x) for x in (eos if isinstance(eos, list) else [eos]) if x is not None]
    rope_params = raw.get("rope_parameters") or {}
    theta = raw.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    scaling = raw.get("rope_scaling")
    if scaling is None and rope_params.get("rope_type", "default") != "default":
        scaling = dict(rope_params)
    return LlamaConfig(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=n_head,
        num_key_value_heads=int(raw.get("num_key_value_heads") or n_head),
        head_dim=int(raw.get("head_dim") or hidden // n_head),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        eos_token_ids=eos_ids,
        bos_token_id=raw.get("bos_token_id"),
    )


def _load_safetensors_dir(path: Path, dtype: torch.dtype) -> Checkpoint:
    from safetensors.torch import load_file

    cfg = hf_config(json.loads((path / "config.json").read_text()))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UnsupportedModel(f"{path}: no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        for k, v in load_file(str(f)).items():
            if k.endswith("rotary_emb.inv_freq"):
                continue
            tensors[k] = v.to(dtype)
    if "lm_head.weight" not in tensors:
        cfg.tie_word_embeddings = True
    return Checkpoint(cfg, tensors)


# ------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(cfg: LlamaConfig, rope_freqs: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse frequencies exactly as transformers computes them (fp32), with scaling applied."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim))
    if rope_freqs is not None:
        return inv / rope_freqs.to(torch.float)
    sc = cfg.rope_scaling
    if not sc:
        return inv
    kind = sc.get("rope_type") or sc.get("type")
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / float(sc["factor"])
    if kind == "llama3":
        factor = float(sc["factor"])
        low = float(sc.get("low_freq_factor", 1.0))
        high = float(sc.get("high_freq_factor", 4.0))
        old_ctx = float(sc.get("original_max_position_embeddings", 8192))
        low_wl, high_wl = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        out = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return torch.where(medium, smoothed, out)
    raise UnsupportedModel(f"RoPE scaling {kind!r} is not supported")
