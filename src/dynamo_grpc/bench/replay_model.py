"""A long-context model directory for the mocker workers of a replay.

The default model's card says 8192 tokens of context, but the Mooncake traces carry prompts of up to
~126k tokens. The mocker runs no weights, so the replay writes a Hugging Face style directory with the
default model's tokenizer and chat template and a ``config.json`` whose ``max_position_embeddings`` is
the context the trace needs; workers load it with ``--model DIR`` and publish a card that says so, so
the frontend's context check agrees with the engine's.
"""

from __future__ import annotations

import json
from pathlib import Path

from dynamo_grpc.models.card import default_model_path, load_model_source


def write_long_context_model(dest: Path, context_length: int, source: Path | None = None) -> Path:
    """Write ``dest`` (a directory named like the served model) and return it."""
    if context_length <= 0:
        raise ValueError("context_length must be positive")
    card, tokenizer_json = load_model_source(source or default_model_path())
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.json").write_bytes(tokenizer_json)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": card.architecture or "llama",
        "max_position_embeddings": int(context_length),
        "vocab_size": int(card.vocab_size),
        "bos_token_id": card.bos_token_id,
        "eos_token_id": list(card.eos_token_ids),
    }
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    tcfg = {
        "bos_token": card.bos_token,
        "eos_token": card.eos_token,
        "pad_token": card.pad_token,
        "unk_token": card.unk_token,
        "chat_template": card.chat_template,
        "model_max_length": int(context_length),
    }
    (dest / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in tcfg.items() if v is not None}))
    return dest
