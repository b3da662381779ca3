"""The OpenAI protocol: /v1/completions and /v1/chat/completions bodies in, response objects out.

Every body key is consumed here (`OPENAI_KEYS`), is a vLLM sampling key (`request.VLLM_KEYS`, as vLLM's
server accepts them: top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids, min_tokens, bad_words,
allowed_token_ids, logit_bias, ...), or is refused with `UnsupportedOption` naming it (`OPENAI_REFUSED`,
except for the one value that asks for what this server does anyway, `OPENAI_NEUTRAL`).
Logprobs: completions take `logprobs: N` (top alternatives per token, 0-20); chat takes `logprobs: true`
and optionally `top_logprobs: N`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dynamo_grpc.errors import InvalidArgument, UnsupportedOption
from dynamo_grpc.frontend import logprobs
from dynamo_grpc.frontend.request import LlmRequest, SamplingBuilder, coerce
from dynamo_grpc.frontend.token_stream import Chunk
from dynamo_grpc.tokens.tokenizer import Tokenizer
from dynamo_grpc.v1 import common_pb2

#: keys the protocol itself consumes
OPENAI_KEYS = frozenset(
    [
        "model",
        "prompt",
        "messages",
        "stream",
        "stream_options",
        "echo",
        "user",
        "max_completion_tokens",
        "logprobs",
        "top_logprobs",
        "add_generation_prompt",
    ]
)
#: keys refused (unless sent with their neutral value), with the reason the client sees
OPENAI_REFUSED: dict[str, str] = {
    "suffix": "fill-in-the-middle (suffix) is not supported",
    "response_format": "structured output (json_object, json_schema) is not implemented",
    "tools": "tool calling is not implemented",
    "tool_choice": "tool calling is not implemented",
    "parallel_tool_calls": "tool calling is not implemented",
    "functions": "function calling is not implemented",
    "function_call": "function calling is not implemented",
    "service_tier": "there are no service tiers",
    "store": "stored completions are not supported",
    "metadata": "stored completions are not supported",
    "chat_template_kwargs": "extra chat template arguments are not supported",
    "modalities": "only text output is supported",
    "audio": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "reasoning models are not supported",
}
#: a refused key sent with this value asks for the default behaviour and is accepted
OPENAI_NEUTRAL: dict[str, Any] = {
    "suffix": "",
    "response_format": {"type": "text"},
    "tools": [],
    "tool_choice": "none",
    "store": False,
    "modalities": ["text"],
}


@dataclass
class OpenAiRequest:
    model: str
    req: LlmRequest
    include_usage: bool
    user: str


def _refuse_unless_neutral(key: str, value: Any) -> None:
    if key in OPENAI_NEUTRAL and value == OPENAI_NEUTRAL[key]:
        return
    raise UnsupportedOption(key, f"is not supported: {OPENAI_REFUSED[key]}")


def parse_openai(body: Any, chat: bool) -> OpenAiRequest:
    """An OpenAI completions (chat=False) or chat completions body as an `OpenAiRequest`."""
    if not isinstance(body, dict):
        raise InvalidArgument("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidArgument("'model' must be a non-empty string")
    b = SamplingBuilder()
    for key, value in body.items():
        if value is None or key in OPENAI_KEYS:
            continue
        if key in OPENAI_REFUSED:
            _refuse_unless_neutral(key, value)
        else:
            b.apply("body", key, value)
    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if chat:
        if lp is not None and not isinstance(lp, bool):
            raise InvalidArgument("'logprobs' must be a boolean for chat completions")
        if top is not None and not lp:
            raise InvalidArgument("'top_logprobs' needs 'logprobs': true")
        if lp:
            b.apply("body", "logprobs", 0 if top is None else top)
    elif lp is not None:
        if top is not None:
            raise InvalidArgument("'top_logprobs' is a chat completions field; completions take 'logprobs': N")
        b.apply("body", "logprobs", lp)
    if body.get("max_completion_tokens") is not None:
        b.apply("body", "max_tokens", body["max_completion_tokens"])
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InvalidArgument("'stream' must be a boolean")
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise InvalidArgument("'stream_options' must be an object")
        for k in opts:
            if k != "include_usage":
                raise UnsupportedOption(f"stream_options.{k}", "is not supported (only include_usage)")
        include_usage = bool(coerce("stream_options.include_usage", "bool", opts.get("include_usage", False)))
    user = body.get("user") or ""
    if not isinstance(user, str):
        raise InvalidArgument("'user' must be a string")
    echo = bool(coerce("echo", "bool", body.get("echo") or False))
    add_gen = coerce("add_generation_prompt", "bool", body.get("add_generation_prompt", True))
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    token_ids: list[int] | None = None
    if chat:
        if echo:
            raise UnsupportedOption("echo", "is not supported for chat completions")
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise InvalidArgument("'messages' must be a non-empty list of {role, content} objects")
        messages = msgs
    else:
        if "add_generation_prompt" in body:
            raise UnsupportedOption("add_generation_prompt", "is a chat completions field")
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str) and p:
            prompt = p
        elif isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in p):
            token_ids = list(p)
        else:
            raise InvalidArgument("'prompt' must be a non-empty string or list of token ids (one prompt per request)")
    req = b.build(
        prompt=prompt,
        messages=messages,
        stream=stream,
        exclude_input_in_output=not echo,
        token_ids=token_ids,
        add_generation_prompt=add_gen,
    )
    return OpenAiRequest(model, req, include_usage, user)


class Choices:
    """The `choices[0]` objects of one response (unary) or its chunks (streamed)."""

    def __init__(self, req: LlmRequest, tokenizer: Tokenizer, chat: bool, echo: str) -> None:
        self.chat = chat
        self.tokenizer = tokenizer
        self.want_lp = req.sampling.logprobs is not None
        self.text_offset = len(echo)

    def choice(self, text: str, finish: str | None, delta: bool, lps: list[common_pb2.TokenLogprob]) -> dict[str, Any]:
        out: dict[str, Any]
        if self.chat:
            key = "delta" if delta else "message"
            out = {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}
            out["logprobs"] = logprobs.openai_chat(lps, self.tokenizer) if self.want_lp else None
            return out
        out = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        if self.want_lp:
            out["logprobs"] = logprobs.openai_completion(lps, self.tokenizer, self.text_offset)
            self.text_offset += sum(len(t) for t in out["logprobs"]["tokens"])
        return out


def usage(c: Chunk) -> dict[str, Any]:
    return {
        "prompt_tokens": c.prompt_tokens,
        "completion_tokens": c.completion_tokens,
        "total_tokens": c.prompt_tokens + c.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": c.cached_tokens},
    }
