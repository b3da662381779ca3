"""Parsing LLM requests from KServe tensors: vLLM and TRT-LLM vocabularies, and every error names its field."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dynamo_grpc.errors import InvalidArgument as RequestError
from dynamo_grpc.frontend.kserve.codec import Tensor, bytes_tensor, fixed_tensor
from dynamo_grpc.frontend.kserve.parse import parse_request
from dynamo_grpc.frontend.openai.protocol import parse_openai
from dynamo_grpc.frontend.request import DEFAULT_OUTPUTS


def inputs(*tensors: Tensor) -> dict[str, Tensor]:
    return {t.name: t for t in tensors}


def text(s: str = "Hello") -> Tensor:
    return bytes_tensor("text_input", [s])


def sp(obj: object) -> Tensor:
    return bytes_tensor("sampling_parameters", [obj if isinstance(obj, str) else json.dumps(obj)])


def test_minimal_defaults() -> None:
    r = parse_request(inputs(text()), {})
    assert r.prompt == "Hello" and r.messages is None
    assert r.stream is False and r.sampling.max_tokens == 16 and r.sampling.temperature == 1.0
    assert r.requested_outputs == list(DEFAULT_OUTPUTS)
    assert r.sampling.logprobs is None


def test_return_logprobs_flags_add_outputs_and_ask_the_worker() -> None:
    flags = [fixed_tensor("return_logprobs", "BOOL", [True]), fixed_tensor("return_cumulative_logprob", "BOOL", [True])]
    r = parse_request(inputs(text(), *flags), {})
    assert r.requested_outputs[-2:] == ["logprobs", "cumulative_logprob"]
    assert r.sampling.logprobs == 0  # the sampled token's own logprob
    r = parse_request(inputs(text(), sp({"logprobs": 3}), flags[0]), {})
    assert "logprobs" in r.requested_outputs and r.sampling.logprobs == 3
    off = parse_request(inputs(text(), fixed_tensor("return_logprobs", "BOOL", [False])), {})
    assert "logprobs" not in off.requested_outputs and off.sampling.logprobs is None
    with pytest.raises(RequestError, match="return_logprobs"):
        parse_request(inputs(text(), fixed_tensor("return_logprobs", "INT32", [1])), {})


def test_stream_defaults_true_on_stream_rpc() -> None:
    assert parse_request(inputs(text()), {}, stream_rpc=True).stream is True
    off = fixed_tensor("stream", "BOOL", [False])
    assert parse_request(inputs(text(), off), {}, stream_rpc=True).stream is False


def test_vllm_sampling_parameters() -> None:
    params = {
        "max_tokens": 7,
        "temperature": 0,
        "top_p": 0.9,
        "top_k": 5,
        "min_p": 0.1,
        "seed": 42,
        "stop": ["\n", "END"],
        "stop_token_ids": [2],
        "ignore_eos": True,
        "repetition_penalty": 1.1,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "min_tokens": 3,
        "logprobs": 2,
        "include_stop_str_in_output": True,
    }
    r = parse_request(inputs(text(), sp(params)), {})
    s = r.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.min_p, s.seed) == (7, 0.0, 0.9, 5, 0.1, 42)
    assert s.stop_token_ids == [2] and s.ignore_eos and s.min_tokens == 3 and s.logprobs == 2
    assert (s.repetition_penalty, s.frequency_penalty, s.presence_penalty) == (1.1, 0.5, -0.5)
    assert r.stop == ["\n", "END"] and r.include_stop_str_in_output


def test_numeric_strings_accepted_like_triton_vllm_backend() -> None:
    r = parse_request(inputs(text(), sp({"max_tokens": "5", "temperature": "0.5", "ignore_eos": "true"})), {})
    assert r.sampling.max_tokens == 5 and r.sampling.temperature == 0.5 and r.sampling.ignore_eos


def test_trtllm_tensors() -> None:
    r = parse_request(
        inputs(
            text(),
            fixed_tensor("max_tokens", "INT32", [9], [1, 1]),
            fixed_tensor("temperature", "FP32", [0.0]),
            fixed_tensor("top_p", "FP32", [0.5]),
            fixed_tensor("top_k", "INT32", [3]),
            fixed_tensor("seed", "UINT64", [7]),
            bytes_tensor("stop", ["x", "yy"]),
            bytes_tensor("bad_words", ["zz"]),
            fixed_tensor("beam_width", "INT32", [1]),
        ),
        {},
    )
    s = r.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed) == (9, 0.0, 0.5, 3, 7)
    assert r.stop == ["x", "yy"] and r.bad_words == ["zz"]


def test_tensor_overrides_json_overrides_parameters() -> None:
    r = parse_request(
        inputs(text(), sp({"max_tokens": 5}), fixed_tensor("max_tokens", "INT32", [6])), {"max_tokens": 4}
    )
    assert r.sampling.max_tokens == 6
    assert parse_request(inputs(text(), sp({"max_tokens": 5})), {"max_tokens": 4}).sampling.max_tokens == 5
    assert parse_request(inputs(text()), {"max_tokens": 4}).sampling.max_tokens == 4


@pytest.mark.parametrize(
    ("tensors", "params", "match"),
    [
        ((), {}, "missing required input tensor 'text_input'"),
        ((fixed_tensor("text_input", "INT32", [1]),), {}, "'text_input': datatype must be BYTES, got INT32"),
        ((bytes_tensor("text_input", ["a", "b"]),), {}, r"'text_input': expected exactly one element, shape is \[2\]"),
        ((bytes_tensor("text_input", [b"\xff\xfe"]),), {}, "'text_input': not valid UTF-8"),
        ((text(""),), {}, "'text_input': prompt is empty"),
        ((text(), sp("{not json")), {}, "'sampling_parameters': invalid JSON"),
        ((text(), sp("[1, 2]")), {}, "'sampling_parameters': must be a JSON object, got list"),
        ((text(), sp({"temprature": 1})), {}, "unknown sampling parameter 'temprature'"),
        ((text(), sp({"max_tokens": "many"})), {}, "sampling_parameters.max_tokens must be an integer"),
        ((text(), sp({"max_tokens": 0})), {}, "max_tokens must be >= 1"),
        ((text(), sp({"temperature": -1})), {}, "temperature must be >= 0"),
        ((text(), sp({"temperature": True})), {}, "sampling_parameters.temperature must be a finite number"),
        ((text(), sp({"top_p": 0})), {}, r"top_p must be in \(0, 1\]"),
        ((text(), sp({"top_k": -2})), {}, "top_k must be -1"),
        ((text(), sp({"stop": [1]})), {}, "sampling_parameters.stop must be a string or a list of strings"),
        ((text(), sp({"stop_token_ids": [-1]})), {}, "stop_token_ids must be a list of non-negative integers"),
        ((text(), sp({"n": 2})), {}, r"'n' must be 1 \(sampling_parameters\), got 2"),
        ((text(), sp({"min_tokens": 5, "max_tokens": 2})), {}, r"min_tokens \(5\) must be <= max_tokens \(2\)"),
        ((text(), sp({"seed": -1})), {}, "seed must be in"),
        ((text(), fixed_tensor("stream", "INT32", [1])), {}, "'stream': datatype must be BOOL, got INT32"),
        ((text(), fixed_tensor("stream", "BOOL", [True, False])), {}, "'stream': expected exactly one element"),
        ((text(), fixed_tensor("max_tokens", "FP32", [3.0])), {}, "'max_tokens': datatype must be one of"),
        ((text(), fixed_tensor("temperature", "BOOL", [True])), {}, "'temperature': datatype must be one of"),
        ((text(), fixed_tensor("bad_words", "INT32", [1])), {}, "'bad_words': datatype must be BYTES, got INT32"),
        ((text(), fixed_tensor("exclude_input_in_output", "INT8", [1])), {}, "'exclude_input_in_output'"),
        ((text(), bytes_tensor("stop", [b"\xff"])), {}, "'stop': not valid UTF-8"),
        ((text(),), {"temperature": "hot"}, "parameter.temperature must be a number"),
        ((text(),), {"chat_template": "maybe"}, "parameter chat_template must be a boolean"),
        ((text("[not a list"),), {"chat_template": True}, "'text_input': chat messages: invalid JSON"),
        ((text("[]"),), {"chat_template": True}, "must be a non-empty JSON list"),
        ((text('[{"content": "x"}]'),), {"chat_template": True}, r"messages\[0\] must be an object with a string"),
        ((bytes_tensor("messages", ['{"a": 1}']),), {}, "'messages': chat messages must be a non-empty JSON list"),
        # values past the worker protocol's field widths: refused by name, never INTERNAL "Value out of range"
        ((text(), sp({"top_k": 2**31})), {}, r"top_k must be -1 \(disabled\) or in \[0, 2147483647\]"),
        ((text(), fixed_tensor("top_k", "INT64", [2**40])), {}, "top_k must be"),
        ((text(), sp({"min_tokens": 2**32, "max_tokens": 2**40})), {}, r"min_tokens must be in \[0, 4294967295\]"),
        ((text(), sp({"stop_token_ids": [2**32]})), {}, "stop_token_ids must be token ids"),
        ((text(), sp({"allowed_token_ids": [2**33]})), {}, "allowed_token_ids must be token ids"),
        (
            (text(), fixed_tensor("stop_token_ids", "UINT64", [2**63 + 5])),
            {},
            "'stop_token_ids': token id .* out of range",
        ),
        ((fixed_tensor("input_ids", "UINT64", [1, 2**63]),), {}, "'input_ids': token id 9223372036854775808 is out"),
        ((fixed_tensor("input_ids", "INT64", [1, 2**32]),), {}, "'input_ids': token id 4294967296 is out of range"),
        # JSON bombs: nesting and 5000-digit numbers are the client's error
        ((text(), sp("[" * 100000 + "]" * 100000)), {}, "'sampling_parameters': JSON nested deeper than 32"),
        ((text(), sp('{"a": ' + "[" * 40 + "]" * 40 + "}")), {}, "nested deeper than 32"),
        ((text(), sp('{"seed": ' + "9" * 5000 + "}")), {}, "'sampling_parameters': invalid JSON: Exceeds the limit"),
        ((text(), sp({"max_tokens": "9" * 5000})), {}, "sampling_parameters.max_tokens must be an integer"),
    ],
)
def test_errors_name_the_field(tensors: tuple[Tensor, ...], params: dict[str, object], match: str) -> None:
    with pytest.raises(RequestError, match=match):
        parse_request(inputs(*tensors), params)


def test_brackets_inside_json_strings_are_not_nesting() -> None:
    stop = "[" * 40 + '\\"' + "{" * 40
    r = parse_request(inputs(text(), sp({"stop": [stop]})), {})
    assert r.stop == [stop]


def test_unknown_requested_output() -> None:
    with pytest.raises(RequestError, match="unknown requested output 'logits'"):
        parse_request(inputs(text()), {}, ["text_output", "logits"])
    r = parse_request(inputs(text()), {}, ["finish_reason", "text_output", "finish_reason"])
    assert r.requested_outputs == ["finish_reason", "text_output"]


def test_chat_forms() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    r = parse_request(inputs(text(json.dumps(msgs))), {"chat_template": True})
    assert r.messages == msgs and r.prompt is None
    r = parse_request(inputs(bytes_tensor("messages", [json.dumps({"messages": msgs})])), {})
    assert r.messages == msgs
    # Plain text with the parameter is one user turn.
    r = parse_request(inputs(text("What is the capital of France?")), {"chat_template": True})
    assert r.messages == [{"role": "user", "content": "What is the capital of France?"}]
    # Without the parameter a JSON-looking text is just a prompt.
    assert parse_request(inputs(text(json.dumps(msgs))), {}).prompt == json.dumps(msgs)


def test_batch_dim_shape_and_bf16() -> None:
    t = Tensor("text_input", "BYTES", (1, 1), np.array([[b"hey"]], dtype=object), {})
    bf = Tensor("temperature", "BF16", (1,), np.array([0x3F00], dtype=np.uint16), {})  # 0.5
    r = parse_request(inputs(t, bf), {})
    assert r.prompt == "hey" and r.sampling.temperature == 0.5


def test_top_k_minus_one_means_disabled() -> None:
    assert parse_request(inputs(text(), sp({"top_k": -1})), {}).sampling.top_k == 0


def test_openai_logprobs_fields() -> None:
    req = parse_openai({"model": "m", "prompt": "hi", "logprobs": 2}, chat=False).req
    assert req.sampling.logprobs == 2
    req = parse_openai({"model": "m", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, True).req
    assert req.sampling.logprobs == 0
    msgs = [{"role": "user", "content": "hi"}]
    req = parse_openai({"model": "m", "messages": msgs, "logprobs": True, "top_logprobs": 4}, chat=True).req
    assert req.sampling.logprobs == 4
    req = parse_openai({"model": "m", "messages": msgs}, chat=True).req
    assert req.sampling.logprobs is None
    with pytest.raises(RequestError, match="top_logprobs"):
        parse_openai({"model": "m", "messages": msgs, "top_logprobs": 4}, chat=True)
    with pytest.raises(RequestError, match="logprobs"):
        parse_openai({"model": "m", "prompt": "hi", "logprobs": 99}, chat=False)
