"""A tiny random Llama (config.json + model.safetensors + tokenizer.json) built offline, for engine tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 96
EOS = 1
CTX = 256
TINY = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": CTX,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": EOS,
}


def make_tiny_model(root: Path, seed: int = 0) -> Path:
    """A random Llama (config.json + model.safetensors + tokenizer.json), built offline."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    c = TINY
    g = torch.Generator().manual_seed(seed)
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    nh, nkv = c["num_attention_heads"], c["num_key_value_heads"]

    def w(*shape: int, std: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    t = {
        "model.embed_tokens.weight": w(VOCAB, h, std=1.0),
        "model.norm.weight": 1 + w(h, std=0.1),
        "lm_head.weight": w(VOCAB, h),
    }
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        t |= {
            p + "input_layernorm.weight": 1 + w(h, std=0.1),
            p + "post_attention_layernorm.weight": 1 + w(h, std=0.1),
            p + "self_attn.q_proj.weight": w(nh * hd, h),
            p + "self_attn.k_proj.weight": w(nkv * hd, h),
            p + "self_attn.v_proj.weight": w(nkv * hd, h),
            p + "self_attn.o_proj.weight": w(h, nh * hd),
            p + "mlp.gate_proj.weight": w(i, h),
            p + "mlp.up_proj.weight": w(i, h),
            p + "mlp.down_proj.weight": w(h, i),
        }
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in t.items()}, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps(c))
    vocab = {f"t{k}": k for k in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": "t1", "bos_token": "t0"}))
    return root
