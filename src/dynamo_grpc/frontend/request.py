"""What a generation request asks for, independent of protocol: `LlmRequest` and the sampling rules.

Both protocols (KServe tensors/JSON in `kserve/parse.py`, OpenAI bodies in `openai/protocol.py`) feed
their options through one `SamplingBuilder`, so a value is coerced, range-checked and named the same way
everywhere (vLLM's "validate once at the edge"). Each vLLM `SamplingParams` key is either honoured
(`VLLM_KEYS`) or refused with `UnsupportedOption` naming it (`VLLM_REFUSED`): never accepted and ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dynamo_grpc.engines.base import SamplingParams
from dynamo_grpc.errors import InvalidArgument, UnsupportedOption

#: what a KServe request gets when it names no outputs
DEFAULT_OUTPUTS = ("text_output", "finish_reason", "num_input_tokens", "num_output_tokens", "cached_tokens")

#: vLLM SamplingParams keys the frontend honours: name -> value kind
VLLM_KEYS: dict[str, str] = {
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
    "bad_words": "strs",  # tokenised by the frontend, enforced by the worker's sampler
    "allowed_token_ids": "ints",
    "logit_bias": "bias",
    # honoured for the one value that is this server's behaviour; any other value is refused by name
    "n": "int",
    "best_of": "int",
    "detokenize": "bool",
    "spaces_between_special_tokens": "bool",
}
#: keys honoured only with this value (what the server always does)
ONLY_VALUE: dict[str, Any] = {"n": 1, "best_of": 1, "detokenize": True, "spaces_between_special_tokens": True}

#: vLLM SamplingParams keys that are refused, with the reason the client sees
VLLM_REFUSED: dict[str, str] = {
    "prompt_logprobs": "prompt logprobs are not computed",
    "logits_processors": "custom logits processors cannot run in a remote worker",
    "truncate_prompt_tokens": "prompts are never truncated; send a shorter prompt",
    "output_kind": "the output kind follows the protocol (streamed or unary)",
    "guided_decoding": "structured output is not implemented",
    "structured_outputs": "structured output is not implemented",
    "extra_args": "engine-specific extra_args are not passed to workers",
}
MAX_STOP_STRINGS = 32
MAX_STOP_LEN = 1024
MAX_BAD_WORDS = 256
LOGIT_BIAS_RANGE = (-100.0, 100.0)
#: the worker protocol's field widths (top_k int32; token ids, min_tokens uint32): a value past them is the
#: client's error, refused here rather than failing when the worker request is built
INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1
#: JSON nesting a request body or `sampling_parameters` may have (real ones are 2-3 deep)
MAX_JSON_DEPTH = 32


def _depth_ok(text: str | bytes, limit: int) -> bool:
    """Whether brackets nest at most `limit` deep, counted without parsing (strings skipped): O(n), no recursion."""
    data = text.encode() if isinstance(text, str) else text
    if data.count(b"[") + data.count(b"{") <= limit:
        return True
    depth = 0
    in_str = esc = False
    for c in data:
        if in_str:
            if esc:
                esc = False
            elif c == 0x5C:  # backslash
                esc = True
            elif c == 0x22:
                in_str = False
        elif c == 0x22:
            in_str = True
        elif c in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return False
        elif c in (0x5D, 0x7D):
            depth -= 1
    return True


def parse_json(where: str, text: str | bytes) -> Any:
    """JSON from a client, every failure (syntax, nesting bombs, 5000-digit numbers, bad UTF-8) InvalidArgument."""
    if not _depth_ok(text, MAX_JSON_DEPTH):
        raise InvalidArgument(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{where}: invalid JSON: {e.msg} at char {e.pos}") from None
    except (ValueError, RecursionError) as e:  # int digits limit, invalid UTF-8 in bytes
        raise InvalidArgument(f"{where}: invalid JSON: {e}") from None


@dataclass
class LlmRequest:
    """A parsed text generation request, independent of protobuf and HTTP."""

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
    bad_words: list[str] = field(default_factory=list)  # words never generated (tokenised in `prepare`)
    allowed_token_ids: list[int] = field(default_factory=list)  # when set, the only ids that may be sampled
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> additive logit bias
    timeout_s: float | None = None  # the client's own deadline (Triton's `timeout` parameter)
    add_generation_prompt: bool = True  # chat: end the rendered prompt with the assistant's turn
    empty_final_response: bool = False  # KServe stream: the final flag rides on an extra empty response


def coerce(where: str, kind: str, v: Any) -> Any:
    """A JSON (or parameter) value as the kind a sampling field needs; numeric strings are accepted."""
    if kind == "bool":
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        raise InvalidArgument(f"{where} must be a boolean, got {v!r}")
    if kind == "int":
        if isinstance(v, str):
            try:
                v = int(v)
            except ValueError:
                raise InvalidArgument(f"{where} must be an integer, got {v!r}") from None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidArgument(f"{where} must be an integer, got {v!r}")
        return v
    if kind == "float":
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise InvalidArgument(f"{where} must be a number, got {v!r}") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InvalidArgument(f"{where} must be a finite number, got {v!r}")
        return float(v)
    if kind == "strs":
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and all(isinstance(s, str) for s in v):
            return list(v)
        raise InvalidArgument(f"{where} must be a string or a list of strings, got {v!r}")
    if kind == "ints":
        if isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
            return list(v)
        raise InvalidArgument(f"{where} must be a list of non-negative integers, got {v!r}")
    if kind == "bias":
        # OpenAI sends {"<token id>": bias} (JSON keys are strings); vLLM takes {id: bias}
        if not isinstance(v, dict):
            raise InvalidArgument(f"{where} must be an object of token id -> bias, got {v!r}")
        out: dict[int, float] = {}
        for k, b in v.items():
            tid = coerce(f"{where} key {k!r}", "int", k)
            if tid < 0:
                raise InvalidArgument(f"{where}: token id {tid} must be >= 0")
            out[tid] = coerce(f"{where}[{k}]", "float", b)
        return out
    raise AssertionError(kind)


class SamplingBuilder:
    """Accumulates sampling settings from several sources, later sources overriding earlier ones."""

    def __init__(self) -> None:
        self.sampling = SamplingParams()
        self.stop: list[str] = []
        self.include_stop_str_in_output = False
        self.skip_special_tokens = True
        self.bad_words: list[str] = []
        self.allowed_token_ids: list[int] = []
        self.logit_bias: dict[int, float] = {}

    def apply(self, where: str, key: str, value: Any) -> None:
        """Set one vLLM key; `where` ("sampling_parameters", "body", ...) prefixes error messages."""
        if key in VLLM_REFUSED:
            raise UnsupportedOption(key, f"is not supported ({where}): {VLLM_REFUSED[key]}")
        kind = VLLM_KEYS.get(key)
        if kind is None:
            raise InvalidArgument(f"{where}: unknown sampling parameter '{key}'")
        v = coerce(f"{where}.{key}", kind, value)
        setter = _SETTERS.get(key)
        if key in ONLY_VALUE:
            if v != ONLY_VALUE[key]:
                raise UnsupportedOption(key, f"must be {ONLY_VALUE[key]!r} ({where}), got {v!r}")
        elif setter is not None:
            setter(self, v)
        else:
            setattr(self.sampling, key, v)

    def validate(self) -> None:
        s = self.sampling
        lo, hi = LOGIT_BIAS_RANGE
        # (rule holds, message if not): messages are built only for a failing rule (this runs per request)
        checks: tuple[tuple[bool, Callable[[], str]], ...] = (
            (s.max_tokens >= 1, lambda: f"max_tokens must be >= 1, got {s.max_tokens}"),
            (s.temperature >= 0, lambda: f"temperature must be >= 0, got {s.temperature}"),
            (0 < s.top_p <= 1, lambda: f"top_p must be in (0, 1], got {s.top_p}"),
            (
                s.top_k == -1 or 0 <= s.top_k <= INT32_MAX,
                lambda: f"top_k must be -1 (disabled) or in [0, {INT32_MAX}], got {s.top_k}",
            ),
            (0 <= s.min_p <= 1, lambda: f"min_p must be in [0, 1], got {s.min_p}"),
            (s.repetition_penalty > 0, lambda: f"repetition_penalty must be > 0, got {s.repetition_penalty}"),
            (
                -2 <= s.frequency_penalty <= 2,
                lambda: f"frequency_penalty must be in [-2, 2], got {s.frequency_penalty}",
            ),
            (-2 <= s.presence_penalty <= 2, lambda: f"presence_penalty must be in [-2, 2], got {s.presence_penalty}"),
            (0 <= s.min_tokens <= UINT32_MAX, lambda: f"min_tokens must be in [0, {UINT32_MAX}], got {s.min_tokens}"),
            (
                all(i <= UINT32_MAX for i in s.stop_token_ids),
                lambda: f"stop_token_ids must be token ids (<= {UINT32_MAX}), got {max(s.stop_token_ids)}",
            ),
            (
                all(i <= UINT32_MAX for i in self.allowed_token_ids),
                lambda: f"allowed_token_ids must be token ids (<= {UINT32_MAX}), got {max(self.allowed_token_ids)}",
            ),
            (
                s.min_tokens <= s.max_tokens,
                lambda: f"min_tokens ({s.min_tokens}) must be <= max_tokens ({s.max_tokens})",
            ),
            (s.seed is None or 0 <= s.seed < 2**64, lambda: f"seed must be in [0, 2^64), got {s.seed}"),
            (s.logprobs is None or 0 <= s.logprobs <= 20, lambda: f"logprobs must be in [0, 20], got {s.logprobs}"),
            (
                len(self.stop) <= MAX_STOP_STRINGS,
                lambda: f"stop has {len(self.stop)} strings, at most {MAX_STOP_STRINGS}",
            ),
            (all(0 < len(x) <= MAX_STOP_LEN for x in self.stop), lambda: "stop strings must be 1..1024 characters"),
            (
                len(self.bad_words) <= MAX_BAD_WORDS,
                lambda: f"bad_words has {len(self.bad_words)} words, at most {MAX_BAD_WORDS}",
            ),
            (
                all(0 < len(x) <= MAX_STOP_LEN for x in self.bad_words),
                lambda: "bad_words must be 1..1024 characters each",
            ),
            (
                all(lo <= b <= hi for b in self.logit_bias.values()),
                lambda: f"logit_bias values must be in [{lo:g}, {hi:g}], got {self.logit_bias}",
            ),
        )
        for ok, msg in checks:
            if not ok:
                raise InvalidArgument(f"sampling parameter {msg()}")
        if s.top_k == -1:
            s.top_k = 0

    def build(self, **kw: Any) -> LlmRequest:
        """The request, with this builder's sampling (validated) and the protocol's own fields."""
        self.validate()
        return LlmRequest(
            sampling=self.sampling,
            stop=self.stop,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            bad_words=self.bad_words,
            allowed_token_ids=self.allowed_token_ids,
            logit_bias=self.logit_bias,
            **kw,
        )


def _set(name: str) -> Callable[[SamplingBuilder, Any], None]:
    def setter(b: SamplingBuilder, v: Any) -> None:
        setattr(b, name, v)

    return setter


# keys that live on the builder (frontend-side or extra worker options) rather than on SamplingParams
_SETTERS: dict[str, Callable[[SamplingBuilder, Any], None]] = {
    k: _set(k)
    for k in (
        "stop",
        "include_stop_str_in_output",
        "skip_special_tokens",
        "bad_words",
        "allowed_token_ids",
        "logit_bias",
    )
}
