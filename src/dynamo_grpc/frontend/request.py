"""What an LLM inference request asks for, parsed from KServe v2 tensors and parameters.

Two tensor vocabularies are accepted, as Triton's LLM backends define them:
- vLLM backend: `text_input` BYTES[1], `stream` BOOL, `sampling_parameters` BYTES (JSON with vLLM
  SamplingParams keys), `exclude_input_in_output` BOOL;
- TensorRT-LLM ensemble: `text_input`, `max_tokens` INT32, `temperature` FP32, `top_p`, `top_k`, `seed`,
  `stop` / `stop_words` BYTES, ... (known inputs we do not implement, such as `bad_words`, are checked for
  dtype and otherwise ignored).
A chat form renders `text_input` (a JSON list of messages) or a `messages` input with the model's chat
template. Every error is a `RequestError` whose message names the tensor or field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dynamo_grpc.engines.base import SamplingParams
from dynamo_grpc.frontend.tensors import Tensor

#: Outputs an LLM model produces, with datatype.
OUTPUTS: dict[str, str] = {
    "text_output": "BYTES",
    "finish_reason": "BYTES",
    "num_input_tokens": "INT32",
    "num_output_tokens": "INT32",
    "cached_tokens": "INT32",
    # only when asked for (Triton vLLM backend's return_logprobs / return_cumulative_logprob, or by name):
    # per new token {token_id: {logprob, rank, decoded_token}} as JSON, and the sum over all generated tokens
    "logprobs": "BYTES",
    "cumulative_logprob": "FP32",
}
#: what a request gets when it names no outputs
DEFAULT_OUTPUTS = ("text_output", "finish_reason", "num_input_tokens", "num_output_tokens", "cached_tokens")
#: boolean inputs that add an optional output
_RETURN_FLAGS = {"return_logprobs": "logprobs", "return_cumulative_logprob": "cumulative_logprob"}

_INT_TYPES = frozenset(["INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"])
_FLOAT_TYPES = frozenset(["FP16", "FP32", "FP64", "BF16"])

# TRT-LLM-ensemble style scalar inputs: name -> (SamplingParams field, accepted datatypes).
_SCALAR_INPUTS: dict[str, tuple[str, frozenset[str]]] = {
    "max_tokens": ("max_tokens", _INT_TYPES),
    "temperature": ("temperature", _FLOAT_TYPES),
    "top_p": ("top_p", _FLOAT_TYPES),
    "runtime_top_p": ("top_p", _FLOAT_TYPES),
    "top_k": ("top_k", _INT_TYPES),
    "runtime_top_k": ("top_k", _INT_TYPES),
    "min_p": ("min_p", _FLOAT_TYPES),
    "seed": ("seed", _INT_TYPES),
    "random_seed": ("seed", _INT_TYPES),
    "repetition_penalty": ("repetition_penalty", _FLOAT_TYPES),
    "frequency_penalty": ("frequency_penalty", _FLOAT_TYPES),
    "presence_penalty": ("presence_penalty", _FLOAT_TYPES),
    "min_tokens": ("min_tokens", _INT_TYPES),
    "min_length": ("min_tokens", _INT_TYPES),
    "ignore_eos": ("ignore_eos", frozenset(["BOOL"])),
}
# Inputs of Triton's LLM backends that we accept but do not act on; only their dtype is checked.
_IGNORED_INPUTS: dict[str, frozenset[str]] = {
    "bad_words": frozenset(["BYTES"]),
    "embedding_bias_words": frozenset(["BYTES"]),
    "embedding_bias_weights": _FLOAT_TYPES,
    "beam_width": _INT_TYPES,
    "length_penalty": _FLOAT_TYPES,
    "return_log_probs": frozenset(["BOOL"]),
    "return_context_logits": frozenset(["BOOL"]),
    "return_generation_logits": frozenset(["BOOL"]),
    "end_id": _INT_TYPES,
    "pad_id": _INT_TYPES,
    "return_finish_reason": frozenset(["BOOL"]),
    "return_num_input_tokens": frozenset(["BOOL"]),
    "return_num_output_tokens": frozenset(["BOOL"]),
    "lora_name": frozenset(["BYTES"]),
}

# vLLM SamplingParams keys: name -> kind. "ignored" keys are accepted for compatibility and have no effect.
_VLLM_KEYS: dict[str, str] = {
    "max_tokens": "int",
    "temperature": "float",
    "top_p": "float",
    "top_k": "int",
    "min_p": "float",
    "seed": "int",
    "stop": "strs",
    "stop_token_ids": "ints",
    "ignore_eos": "bool",
    "repetition_penalty": "float",
    "frequency_penalty": "float",
    "presence_penalty": "float",
    "min_tokens": "int",
    "logprobs": "int",
    "include_stop_str_in_output": "bool",
    "skip_special_tokens": "bool",
    "n": "int",
    "best_of": "int",
    "spaces_between_special_tokens": "bool",
    "detokenize": "bool",
    "prompt_logprobs": "ignored",
    "logits_processors": "ignored",
    "truncate_prompt_tokens": "ignored",
    "output_kind": "ignored",
    "bad_words": "ignored",
    "allowed_token_ids": "ignored",
    "guided_decoding": "ignored",
    "structured_outputs": "ignored",
    "extra_args": "ignored",
}
MAX_STOP_STRINGS = 32
MAX_STOP_LEN = 1024


class RequestError(ValueError):
    """The request is malformed (INVALID_ARGUMENT); the message names the tensor or field."""


@dataclass
class LlmRequest:
    """A parsed text generation request, independent of protobuf."""

    prompt: str | None
    messages: list[dict[str, Any]] | None
    stream: bool
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    exclude_input_in_output: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    requested_outputs: list[str] = field(default_factory=lambda: list(DEFAULT_OUTPUTS))
    lora: str = ""
    token_ids: list[int] | None = None  # pre-tokenised prompt (`input_ids`): no template, no tokeniser


def _one(t: Tensor) -> Any:
    if t.size != 1:
        raise RequestError(f"tensor '{t.name}': expected exactly one element, shape is {list(t.shape)}")
    return t.data.reshape(-1)[0]


def _text(t: Tensor) -> str:
    if t.datatype != "BYTES":
        raise RequestError(f"tensor '{t.name}': datatype must be BYTES, got {t.datatype}")
    v = _one(t)
    try:
        return bytes(v).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"tensor '{t.name}': not valid UTF-8 ({e.reason} at byte {e.start})") from e


def _bool(t: Tensor) -> bool:
    if t.datatype != "BOOL":
        raise RequestError(f"tensor '{t.name}': datatype must be BOOL, got {t.datatype}")
    return bool(_one(t))


def _check_dtype(t: Tensor, allowed: frozenset[str]) -> None:
    if t.datatype not in allowed:
        raise RequestError(f"tensor '{t.name}': datatype must be one of {sorted(allowed)}, got {t.datatype}")


def _coerce(where: str, kind: str, v: Any) -> Any:
    """A JSON (or parameter) value as the kind a sampling field needs; numeric strings are accepted."""
    if kind == "ignored":
        return None
    if kind == "bool":
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        raise RequestError(f"{where} must be a boolean, got {v!r}")
    if kind == "int":
        if isinstance(v, str):
            try:
                v = int(v)
            except ValueError:
                raise RequestError(f"{where} must be an integer, got {v!r}") from None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise RequestError(f"{where} must be an integer, got {v!r}")
        return v
    if kind == "float":
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise RequestError(f"{where} must be a number, got {v!r}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise RequestError(f"{where} must be a finite number, got {v!r}")
        return float(v)
    if kind == "strs":
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and all(isinstance(s, str) for s in v):
            return list(v)
        raise RequestError(f"{where} must be a string or a list of strings, got {v!r}")
    if kind == "ints":
        if isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
            return list(v)
        raise RequestError(f"{where} must be a list of non-negative integers, got {v!r}")
    raise AssertionError(kind)


class _Builder:
    """Accumulates sampling settings from the three sources, later sources overriding earlier ones."""

    def __init__(self) -> None:
        self.sampling = SamplingParams()
        self.stop: list[str] = []
        self.include_stop_str_in_output = False
        self.skip_special_tokens = True

    def apply(self, where: str, key: str, value: Any) -> None:
        kind = _VLLM_KEYS.get(key)
        if kind is None:
            raise RequestError(f"{where}: unknown sampling parameter '{key}'")
        v = _coerce(f"{where}.{key}", kind, value)
        if v is None:
            return
        if key == "stop":
            self.stop = v
        elif key == "include_stop_str_in_output":
            self.include_stop_str_in_output = v
        elif key == "skip_special_tokens":
            self.skip_special_tokens = v
        elif key in ("n", "best_of"):
            if v != 1:
                raise RequestError(f"{where}.{key} must be 1 (one sequence per request), got {v}")
        elif key in ("spaces_between_special_tokens", "detokenize"):
            if key == "detokenize" and not v:
                raise RequestError(f"{where}.detokenize=false is not supported (text is always returned)")
        else:
            setattr(self.sampling, key, v)

    def validate(self) -> None:
        s = self.sampling
        checks: list[tuple[bool, str]] = [
            (s.max_tokens >= 1, f"max_tokens must be >= 1, got {s.max_tokens}"),
            (s.temperature >= 0, f"temperature must be >= 0, got {s.temperature}"),
            (0 < s.top_p <= 1, f"top_p must be in (0, 1], got {s.top_p}"),
            (s.top_k == -1 or s.top_k >= 0, f"top_k must be -1 (disabled) or >= 0, got {s.top_k}"),
            (0 <= s.min_p <= 1, f"min_p must be in [0, 1], got {s.min_p}"),
            (s.repetition_penalty > 0, f"repetition_penalty must be > 0, got {s.repetition_penalty}"),
            (-2 <= s.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {s.frequency_penalty}"),
            (-2 <= s.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {s.presence_penalty}"),
            (s.min_tokens >= 0, f"min_tokens must be >= 0, got {s.min_tokens}"),
            (s.min_tokens <= s.max_tokens, f"min_tokens ({s.min_tokens}) must be <= max_tokens ({s.max_tokens})"),
            (s.seed is None or 0 <= s.seed < 2**64, f"seed must be in [0, 2^64), got {s.seed}"),
            (s.logprobs is None or 0 <= s.logprobs <= 20, f"logprobs must be in [0, 20], got {s.logprobs}"),
            (len(self.stop) <= MAX_STOP_STRINGS, f"stop has {len(self.stop)} strings, at most {MAX_STOP_STRINGS}"),
            (all(0 < len(x) <= MAX_STOP_LEN for x in self.stop), "stop strings must be 1..1024 characters"),
        ]
        for ok, msg in checks:
            if not ok:
                raise RequestError(f"sampling parameter {msg}")
        if s.top_k == -1:
            s.top_k = 0


def _scalar_value(t: Tensor) -> Any:
    v = _one(t)
    if t.datatype == "BF16":
        return float(np.array([int(v) << 16], dtype=np.uint32).view(np.float32)[0])
    return v.item() if isinstance(v, np.generic) else v


def parse_request(
    inputs: Mapping[str, Tensor],
    parameters: Mapping[str, bool | int | float | str],
    requested_outputs: list[str] | None = None,
    *,
    stream_rpc: bool = False,
) -> LlmRequest:
    """Build an LlmRequest from decoded input tensors and request parameters.

    `stream_rpc` is true on ModelStreamInfer, where `stream` defaults to true (decoupled); on ModelInfer
    it defaults to false and `stream=true` is refused, since a unary call carries one response.
    """
    b = _Builder()
    chat_param = False
    for key, value in parameters.items():
        if key == "chat_template":
            chat_param = bool(_coerce("parameter chat_template", "bool", value))
        elif key in _VLLM_KEYS and key != "stop":
            b.apply("parameter", key, value)
        elif key == "stop" and isinstance(value, str):
            b.stop = [value]
        # Other parameters (priority, timeout, sequence_id, headers, ...) are Triton's own: ignore them.

    if "sampling_parameters" in inputs:
        raw = _text(inputs["sampling_parameters"])
        try:
            obj = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as e:
            raise RequestError(f"tensor 'sampling_parameters': invalid JSON: {e.msg} at char {e.pos}") from e
        if not isinstance(obj, dict):
            raise RequestError(f"tensor 'sampling_parameters': must be a JSON object, got {type(obj).__name__}")
        for key, value in obj.items():
            if value is None:
                continue
            b.apply("sampling_parameters", key, value)

    for name, t in inputs.items():
        if name in _SCALAR_INPUTS:
            key, allowed = _SCALAR_INPUTS[name]
            _check_dtype(t, allowed)
            v = _scalar_value(t)
            kind = _VLLM_KEYS[key]
            b.apply(f"tensor '{name}'", key, v if kind != "float" else float(v))
        elif name in ("stop", "stop_words"):
            _check_dtype(t, frozenset(["BYTES"]))
            words: list[str] = []
            for elem in t.data.reshape(-1):
                try:
                    words.append(bytes(elem).decode("utf-8"))
                except UnicodeDecodeError:
                    raise RequestError(f"tensor '{name}': not valid UTF-8") from None
            b.stop = [w for w in words if w]
        elif name == "stop_token_ids":
            _check_dtype(t, _INT_TYPES)
            b.apply(f"tensor '{name}'", "stop_token_ids", [int(x) for x in t.data.reshape(-1)])
        elif name in _IGNORED_INPUTS:
            _check_dtype(t, _IGNORED_INPUTS[name])
    b.validate()

    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    token_ids: list[int] | None = None
    if "input_ids" in inputs:
        t = inputs["input_ids"]
        _check_dtype(t, _INT_TYPES)
        if "text_input" in inputs or "messages" in inputs:
            raise RequestError("tensor 'input_ids': give either input_ids or text_input/messages, not both")
        if t.size == 0:
            raise RequestError("tensor 'input_ids': prompt is empty")
        flat = t.data.reshape(-1)
        if int(flat.min()) < 0:
            raise RequestError("tensor 'input_ids': token ids must be >= 0")
        token_ids = flat.astype(np.int64, copy=False).tolist()  # C speed: prompts can be 100k+ ids
    elif "messages" in inputs:
        messages = _parse_messages("tensor 'messages'", _text(inputs["messages"]))
    elif "text_input" not in inputs:
        raise RequestError("missing required input tensor 'text_input'")
    if "text_input" in inputs:
        text = _text(inputs["text_input"])
        if chat_param and messages is None:
            # a JSON list of messages, or plain text taken as one user turn
            stripped = text.lstrip()
            if stripped.startswith(("[", "{")):
                messages = _parse_messages("tensor 'text_input'", text)
            else:
                messages = [{"role": "user", "content": text}]
        elif messages is None:
            prompt = text
    if prompt is not None and not prompt:
        raise RequestError("tensor 'text_input': prompt is empty")

    stream = stream_rpc
    if "stream" in inputs:
        stream = _bool(inputs["stream"])
    elif "stream" in parameters:
        stream = bool(_coerce("parameter stream", "bool", parameters["stream"]))
    exclude = False
    if "exclude_input_in_output" in inputs:
        exclude = _bool(inputs["exclude_input_in_output"])

    outs = list(DEFAULT_OUTPUTS)
    if requested_outputs:
        unknown = [o for o in requested_outputs if o not in OUTPUTS]
        if unknown:
            raise RequestError(f"unknown requested output '{unknown[0]}' (outputs: {', '.join(OUTPUTS)})")
        outs = list(dict.fromkeys(requested_outputs))
    for flag, output in _RETURN_FLAGS.items():
        if flag in inputs:
            if _bool(inputs[flag]) and output not in outs:
                outs.append(output)
    if ("logprobs" in outs or "cumulative_logprob" in outs) and b.sampling.logprobs is None:
        b.sampling.logprobs = 0  # the sampled tokens' own logprobs, no alternatives
    lora = ""
    if "lora_name" in inputs:
        lora = _text(inputs["lora_name"])
    return LlmRequest(
        prompt=prompt,
        messages=messages,
        stream=stream,
        sampling=b.sampling,
        stop=b.stop,
        exclude_input_in_output=exclude,
        include_stop_str_in_output=b.include_stop_str_in_output,
        skip_special_tokens=b.skip_special_tokens,
        requested_outputs=outs,
        lora=lora,
        token_ids=token_ids,
    )


def _parse_messages(where: str, text: str) -> list[dict[str, Any]]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"{where}: chat messages are not valid JSON: {e.msg} at char {e.pos}") from e
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        obj = obj["messages"]
    if not isinstance(obj, list) or not obj:
        raise RequestError(f"{where}: chat messages must be a non-empty JSON list of {{role, content}} objects")
    for i, m in enumerate(obj):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"{where}: messages[{i}] must be an object with a string 'role'")
    return obj


_OPENAI_DROP = frozenset(
    [
        "model",
        "prompt",
        "messages",
        "stream",
        "stream_options",
        "echo",
        "user",
        "suffix",
        "max_completion_tokens",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "logit_bias",
        "service_tier",
        "metadata",
        "store",
        "chat_template_kwargs",
        "add_generation_prompt",
    ]
)


def parse_openai(body: Any, chat: bool) -> tuple[str, LlmRequest, bool]:
    """An OpenAI /v1/completions or /v1/chat/completions body as (model, LlmRequest, include_usage).

    vLLM's extra sampling keys (top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids, min_tokens) are
    accepted as vLLM's server accepts them. Logprobs: completions take `logprobs: N` (top alternatives per
    token, 0-20); chat takes `logprobs: true` and optionally `top_logprobs: N`.
    """
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' must be a non-empty string")
    b = _Builder()
    for key, value in body.items():
        if key in _OPENAI_DROP or value is None:
            continue
        if key in ("logprobs", "top_logprobs"):
            continue
        b.apply("body", key, value)
    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if chat:
        if lp is not None and not isinstance(lp, bool):
            raise RequestError("'logprobs' must be a boolean for chat completions")
        if top is not None and not lp:
            raise RequestError("'top_logprobs' needs 'logprobs': true")
        if lp:
            b.apply("body", "logprobs", 0 if top is None else top)
    elif lp is not None:
        if top is not None:
            raise RequestError("'top_logprobs' is a chat completions field; completions take 'logprobs': N")
        b.apply("body", "logprobs", lp)
    mct = body.get("max_completion_tokens")
    if mct is not None:
        b.apply("body", "max_tokens", mct)
    b.validate()
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean")
    opts = body.get("stream_options") or {}
    include_usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    token_ids: list[int] | None = None
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise RequestError("'messages' must be a non-empty list of {role, content} objects")
        messages = msgs
    else:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str) and p:
            prompt = p
        elif isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in p):
            token_ids = list(p)
        else:
            raise RequestError("'prompt' must be a non-empty string or list of token ids (one prompt per request)")
    req = LlmRequest(
        prompt=prompt,
        messages=messages,
        stream=stream,
        sampling=b.sampling,
        stop=b.stop,
        exclude_input_in_output=not bool(body.get("echo", False)),
        include_stop_str_in_output=b.include_stop_str_in_output,
        skip_special_tokens=b.skip_special_tokens,
        token_ids=token_ids,
    )
    return model, req, include_usage
