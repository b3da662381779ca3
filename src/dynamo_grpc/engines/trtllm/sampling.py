"""Our SamplingParams as TensorRT-LLM's: one mapping table, and a refusal naming what it cannot honour.

| ours | TensorRT-LLM ``SamplingParams`` |
|---|---|
| max_tokens, min_tokens, seed, min_p | same names |
| temperature 0 | ``top_k=1`` (its greedy decoding; ``temperature`` left unset) |
| temperature > 0, top_p, top_k > 0 | same names (top_k 0/-1: unset, i.e. all logits) |
| repetition/frequency/presence_penalty | same names |
| stop_token_ids, ignore_eos | same names; ``end_id``/``pad_id``: the card's first EOS; its other EOS ids: stop ids |
| logprobs | ``logprobs`` (top-k per generated token) |
| bad_words of one token each | ``bad_token_ids`` |

Refused with ``UnsupportedOption``: multi-token ``bad_words`` (the LLM API takes strings or single ids),
``allowed_token_ids`` and ``logit_bias`` (no per-request field; ``embedding_bias`` is a tensor of the
TensorRT backend only), and a LoRA adapter (the worker registers none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dynamo_grpc import errors
from dynamo_grpc.engines.base import EngineRequest

#: the words of every refusal, naming the engine
REFUSAL = "is not supported by the trtllm engine (TensorRT-LLM's LLM API has no per-request equivalent)"


def check_supported(request: EngineRequest) -> None:
    """Raise ``UnsupportedOption`` for the first option TensorRT-LLM cannot honour."""
    sp = request.sampling
    if sp.allowed_token_ids is not None:
        raise errors.UnsupportedOption("allowed_token_ids", REFUSAL)
    if sp.logit_bias:
        raise errors.UnsupportedOption("logit_bias", REFUSAL)
    if any(len(w) > 1 for w in sp.bad_words):
        raise errors.UnsupportedOption(
            "bad_words",
            "with a sequence longer than one token " + REFUSAL + "; single-token words map to bad_token_ids",
        )
    if request.lora:
        raise errors.FailedPrecondition(f"LoRA adapter {request.lora!r}: the trtllm worker serves no LoRA adapters")


def to_trtllm_kwargs(request: EngineRequest, eos_token_ids: Sequence[int]) -> dict[str, Any]:
    """Keyword arguments for ``tensorrt_llm.SamplingParams`` (call :func:`check_supported` first).

    The LLM runs without its tokenizer, so ``end_id`` must be given: the card's first EOS id; a model with
    several (Llama 3's ``<|eot_id|>`` and ``<|end_of_text|>``) stops on the others through ``stop_token_ids``.
    """
    sp = request.sampling
    kw: dict[str, Any] = {
        "max_tokens": sp.max_tokens,
        "ignore_eos": sp.ignore_eos,
        "detokenize": False,  # token space: the frontend detokenizes
        "end_id": eos_token_ids[0],
        "pad_id": eos_token_ids[0],
    }
    stops = list(sp.stop_token_ids)
    if not sp.ignore_eos:
        stops += [t for t in eos_token_ids[1:] if t not in stops]
    if sp.temperature == 0:
        kw["top_k"] = 1
    else:
        kw["temperature"] = sp.temperature
        kw["top_p"] = sp.top_p
        if sp.top_k > 0:
            kw["top_k"] = sp.top_k
    optional: dict[str, Any] = {
        "min_tokens": sp.min_tokens or None,
        "seed": sp.seed,
        "min_p": sp.min_p or None,
        "repetition_penalty": None if sp.repetition_penalty == 1.0 else sp.repetition_penalty,
        "frequency_penalty": sp.frequency_penalty or None,
        "presence_penalty": sp.presence_penalty or None,
        "stop_token_ids": stops or None,
        # its logprobs=0 means none; ours means the sampled token's only (outputs trim the top list)
        "logprobs": None if sp.logprobs is None else max(sp.logprobs, 1),
        "bad_token_ids": [w[0] for w in sp.bad_words] or None,
    }
    kw.update({k: v for k, v in optional.items() if v is not None})
    return kw
