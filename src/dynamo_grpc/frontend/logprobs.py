"""Token logprobs from the worker, in the shapes clients already parse.

- KServe `logprobs` output: Triton vLLM backend's JSON, per new token `{token_id: {logprob, rank, decoded_token}}`
  (the sampled token and its top alternatives; `rank` is null where the engine did not compute it).
- OpenAI completions: `{tokens, token_logprobs, top_logprobs, text_offset}`.
- OpenAI chat: `{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from dynamo_grpc.tokens.tokenizer import Tokenizer
from dynamo_grpc.v1 import common_pb2


def _token(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def triton_json(lps: Sequence[common_pb2.TokenLogprob], tokenizer: Tokenizer) -> str:
    out: list[dict[str, dict[str, Any]]] = []
    for lp in lps:
        entry = {
            str(lp.token_id): {
                "logprob": lp.logprob,
                "rank": lp.rank or None,
                "decoded_token": _token(tokenizer, lp.token_id),
            }
        }
        for i, alt in enumerate(lp.top):
            entry.setdefault(
                str(alt.token_id),
                {"logprob": alt.logprob, "rank": i + 1, "decoded_token": _token(tokenizer, alt.token_id)},
            )
        out.append(entry)
    return json.dumps(out)


def openai_completion(
    lps: Sequence[common_pb2.TokenLogprob], tokenizer: Tokenizer, text_offset: int = 0
) -> dict[str, Any]:
    tokens: list[str] = []
    offsets: list[int] = []
    top: list[dict[str, float]] = []
    for lp in lps:
        t = _token(tokenizer, lp.token_id)
        tokens.append(t)
        offsets.append(text_offset)
        text_offset += len(t)
        top.append({_token(tokenizer, a.token_id): a.logprob for a in lp.top})
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": top,
        "text_offset": offsets,
    }


def openai_chat(lps: Sequence[common_pb2.TokenLogprob], tokenizer: Tokenizer) -> dict[str, Any]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        t = _token(tokenizer, token_id)
        return {"token": t, "logprob": logprob, "bytes": list(t.encode("utf-8"))}

    return {
        "content": [
            {**item(lp.token_id, lp.logprob), "top_logprobs": [item(a.token_id, a.logprob) for a in lp.top]}
            for lp in lps
        ]
    }
