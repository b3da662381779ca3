"""Nothing a client sends is accepted and ignored: every option table is walked here.

Each key of each table (vLLM sampling keys, KServe inputs and request parameters, OpenAI body keys) is
either honoured, with an entry below showing its effect, or refused with `UnsupportedOption` naming it.
A key added to a table without an entry here fails `test_*_tables_are_covered`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from dynamo_grpc import errors
from dynamo_grpc.frontend.kserve import schema
from dynamo_grpc.frontend.kserve.codec import Tensor, bytes_tensor, fixed_tensor
from dynamo_grpc.frontend.kserve.parse import parse_request
from dynamo_grpc.frontend.openai.protocol import OPENAI_KEYS, OPENAI_NEUTRAL, OPENAI_REFUSED, parse_openai
from dynamo_grpc.frontend.request import ONLY_VALUE, VLLM_KEYS, VLLM_REFUSED, LlmRequest

Check = Callable[[LlmRequest], bool]


def kserve(*tensors: Tensor, params: dict[str, Any] | None = None, outputs: list[str] | None = None) -> LlmRequest:
    ins = {t.name: t for t in tensors}
    ins.setdefault("text_input", bytes_tensor("text_input", ["Hello"]))
    return parse_request(ins, params or {}, outputs)


def sp(**kw: Any) -> LlmRequest:
    return kserve(bytes_tensor("sampling_parameters", [json.dumps(kw)]))


# --- vLLM sampling keys -------------------------------------------------------------------------------

#: key -> (value sent, what the parsed request shows)
VLLM_EFFECTS: dict[str, tuple[Any, Check]] = {
    "max_tokens": (7, lambda r: r.sampling.max_tokens == 7),
    "temperature": (0.25, lambda r: r.sampling.temperature == 0.25),
    "top_p": (0.5, lambda r: r.sampling.top_p == 0.5),
    "top_k": (4, lambda r: r.sampling.top_k == 4),
    "min_p": (0.1, lambda r: r.sampling.min_p == 0.1),
    "seed": (9, lambda r: r.sampling.seed == 9),
    "stop": (["END"], lambda r: r.stop == ["END"]),
    "stop_token_ids": ([2, 3], lambda r: r.sampling.stop_token_ids == [2, 3]),
    "ignore_eos": (True, lambda r: r.sampling.ignore_eos),
    "repetition_penalty": (1.2, lambda r: r.sampling.repetition_penalty == 1.2),
    "frequency_penalty": (0.5, lambda r: r.sampling.frequency_penalty == 0.5),
    "presence_penalty": (-0.5, lambda r: r.sampling.presence_penalty == -0.5),
    "min_tokens": (2, lambda r: r.sampling.min_tokens == 2),
    "logprobs": (3, lambda r: r.sampling.logprobs == 3),
    "include_stop_str_in_output": (True, lambda r: r.include_stop_str_in_output),
    "skip_special_tokens": (False, lambda r: r.skip_special_tokens is False),
    "bad_words": (["darn", "heck"], lambda r: r.bad_words == ["darn", "heck"]),
    "allowed_token_ids": ([5, 6], lambda r: r.allowed_token_ids == [5, 6]),
    "logit_bias": ({"17": 5.0}, lambda r: r.logit_bias == {17: 5.0}),
    # the one value that is this server's behaviour (others: test_only_value_keys_refuse_other_values)
    "n": (1, lambda r: True),
    "best_of": (1, lambda r: True),
    "detokenize": (True, lambda r: True),
    "spaces_between_special_tokens": (True, lambda r: True),
}


def test_vllm_tables_are_covered() -> None:
    assert set(VLLM_EFFECTS) == set(VLLM_KEYS), "a vLLM key was added without a test of its effect"
    assert not set(VLLM_KEYS) & set(VLLM_REFUSED)


@pytest.mark.parametrize("key", sorted(VLLM_EFFECTS))
def test_vllm_key_is_honoured_in_json_and_openai(key: str) -> None:
    value, check = VLLM_EFFECTS[key]
    assert check(sp(**{key: value}))
    body = {"model": "m", "prompt": "hi", key: value}
    if key == "logprobs":  # completions' own meaning of the same name: top alternatives per token
        body["logprobs"] = 3
    assert check(parse_openai(body, chat=False).req)


@pytest.mark.parametrize("key", sorted(ONLY_VALUE))
def test_only_value_keys_refuse_other_values(key: str) -> None:
    other = 2 if isinstance(ONLY_VALUE[key], int) and not isinstance(ONLY_VALUE[key], bool) else not ONLY_VALUE[key]
    with pytest.raises(errors.UnsupportedOption) as ei:
        sp(**{key: other})
    assert ei.value.option == key


@pytest.mark.parametrize("key", sorted(VLLM_REFUSED))
def test_vllm_refused_keys_name_the_option(key: str) -> None:
    for build in (
        lambda: sp(**{key: {"x": 1}}),
        lambda: kserve(params={key: "1"}),
        lambda: parse_openai({"model": "m", "prompt": "hi", key: {"x": 1}}, chat=False),
    ):
        with pytest.raises(errors.UnsupportedOption) as ei:
            build()
        assert ei.value.option == key and key in ei.value.message
        assert errors.to_http(ei.value)[0] == 400 and errors.openai_body(ei.value)["error"]["param"] == key


def test_logit_bias_range_and_keys() -> None:
    with pytest.raises(errors.InvalidArgument, match=r"logit_bias values must be in \[-100, 100\]"):
        sp(logit_bias={"1": 101})
    with pytest.raises(errors.InvalidArgument, match="logit_bias"):
        sp(logit_bias={"not-a-token": 1})
    with pytest.raises(errors.InvalidArgument, match="logit_bias"):
        parse_openai({"model": "m", "prompt": "hi", "logit_bias": [1, 2]}, chat=False)


# --- KServe inputs -------------------------------------------------------------------------------------

B = fixed_tensor
#: input -> (tensor sent, what the parsed request shows)
INPUT_EFFECTS: dict[str, tuple[Tensor, Check]] = {
    "text_input": (bytes_tensor("text_input", ["Hi there"]), lambda r: r.prompt == "Hi there"),
    "input_ids": (B("input_ids", "INT64", [4, 5]), lambda r: r.token_ids == [4, 5] and r.prompt is None),
    "messages": (
        bytes_tensor("messages", ['[{"role": "user", "content": "yo"}]']),
        lambda r: r.messages == [{"role": "user", "content": "yo"}],
    ),
    "stream": (B("stream", "BOOL", [True]), lambda r: r.stream),
    "sampling_parameters": (bytes_tensor("sampling_parameters", ['{"top_k": 3}']), lambda r: r.sampling.top_k == 3),
    "exclude_input_in_output": (B("exclude_input_in_output", "BOOL", [True]), lambda r: r.exclude_input_in_output),
    "stop": (bytes_tensor("stop", ["a", "b"]), lambda r: r.stop == ["a", "b"]),
    "stop_words": (bytes_tensor("stop_words", ["c"]), lambda r: r.stop == ["c"]),
    "stop_token_ids": (B("stop_token_ids", "INT32", [7]), lambda r: r.sampling.stop_token_ids == [7]),
    "bad_words": (bytes_tensor("bad_words", ["darn"]), lambda r: r.bad_words == ["darn"]),
    "allowed_token_ids": (B("allowed_token_ids", "INT32", [1, 2]), lambda r: r.allowed_token_ids == [1, 2]),
    "lora_name": (bytes_tensor("lora_name", ["sql"]), lambda r: r.lora == "sql"),
    "max_tokens": (B("max_tokens", "INT32", [5]), lambda r: r.sampling.max_tokens == 5),
    "temperature": (B("temperature", "FP32", [0.5]), lambda r: r.sampling.temperature == 0.5),
    "top_p": (B("top_p", "FP32", [0.5]), lambda r: r.sampling.top_p == 0.5),
    "runtime_top_p": (B("runtime_top_p", "FP32", [0.25]), lambda r: r.sampling.top_p == 0.25),
    "top_k": (B("top_k", "INT32", [3]), lambda r: r.sampling.top_k == 3),
    "runtime_top_k": (B("runtime_top_k", "INT32", [2]), lambda r: r.sampling.top_k == 2),
    "min_p": (B("min_p", "FP32", [0.5]), lambda r: r.sampling.min_p == 0.5),
    "seed": (B("seed", "UINT64", [11]), lambda r: r.sampling.seed == 11),
    "random_seed": (B("random_seed", "UINT64", [12]), lambda r: r.sampling.seed == 12),
    "repetition_penalty": (B("repetition_penalty", "FP32", [1.5]), lambda r: r.sampling.repetition_penalty == 1.5),
    "frequency_penalty": (B("frequency_penalty", "FP32", [0.5]), lambda r: r.sampling.frequency_penalty == 0.5),
    "presence_penalty": (B("presence_penalty", "FP32", [0.5]), lambda r: r.sampling.presence_penalty == 0.5),
    "min_tokens": (B("min_tokens", "INT32", [2]), lambda r: r.sampling.min_tokens == 2),
    "min_length": (B("min_length", "INT32", [3]), lambda r: r.sampling.min_tokens == 3),
    "ignore_eos": (B("ignore_eos", "BOOL", [True]), lambda r: r.sampling.ignore_eos),
    "return_logprobs": (B("return_logprobs", "BOOL", [True]), lambda r: "logprobs" in r.requested_outputs),
    "return_log_probs": (B("return_log_probs", "BOOL", [True]), lambda r: "logprobs" in r.requested_outputs),
    "return_cumulative_logprob": (
        B("return_cumulative_logprob", "BOOL", [True]),
        lambda r: "cumulative_logprob" in r.requested_outputs and r.sampling.logprobs == 0,
    ),
    # the TRT-LLM ensemble's return_* flags: false drops a default output
    "return_finish_reason": (
        B("return_finish_reason", "BOOL", [False]),
        lambda r: "finish_reason" not in r.requested_outputs,
    ),
    "return_num_input_tokens": (
        B("return_num_input_tokens", "BOOL", [False]),
        lambda r: "num_input_tokens" not in r.requested_outputs,
    ),
    "return_num_output_tokens": (
        B("return_num_output_tokens", "BOOL", [False]),
        lambda r: "num_output_tokens" not in r.requested_outputs,
    ),
    # the value that is this server's behaviour; other values are refused (test_only_value_inputs)
    "beam_width": (B("beam_width", "INT32", [1]), lambda r: True),
    "return_context_logits": (B("return_context_logits", "BOOL", [False]), lambda r: True),
    "return_generation_logits": (B("return_generation_logits", "BOOL", [False]), lambda r: True),
}
PARAMETER_EFFECTS: dict[str, tuple[Any, Check]] = {
    "chat_template": (True, lambda r: r.messages == [{"role": "user", "content": "Hello"}]),
    "stream": (True, lambda r: r.stream),
    "timeout": (250_000, lambda r: r.timeout_s == 0.25),  # microseconds, as Triton
    "triton_enable_empty_final_response": (True, lambda r: r.empty_final_response),
}


def test_kserve_tables_are_covered() -> None:
    assert set(INPUT_EFFECTS) == set(schema.INPUTS), "an input was added without a test of its effect"
    assert set(PARAMETER_EFFECTS) == set(schema.PARAMETERS)
    assert not set(schema.INPUTS) & set(schema.REFUSED_INPUTS)
    assert set(schema.ONLY_VALUE) <= set(schema.INPUTS)


@pytest.mark.parametrize("name", sorted(INPUT_EFFECTS))
def test_input_is_honoured(name: str) -> None:
    tensor, check = INPUT_EFFECTS[name]
    tensors = [tensor]
    if name in ("input_ids", "messages"):
        r = parse_request({name: tensor}, {})
    else:
        r = kserve(*tensors)
    assert check(r), name


@pytest.mark.parametrize("name", sorted(schema.ONLY_VALUE))
def test_only_value_inputs(name: str) -> None:
    v = schema.ONLY_VALUE[name]
    t = B(name, "BOOL", [not v]) if isinstance(v, bool) else B(name, "INT32", [4])
    with pytest.raises(errors.UnsupportedOption) as ei:
        kserve(t)
    assert ei.value.option == name


@pytest.mark.parametrize("name", [*sorted(schema.REFUSED_INPUTS), "some_future_input"])
def test_refused_and_unknown_inputs_name_the_input(name: str) -> None:
    with pytest.raises(errors.UnsupportedOption) as ei:
        kserve(B(name, "FP32", [1.0]))
    assert ei.value.option == name and errors.to_http(ei.value)[0] == 400


@pytest.mark.parametrize("key", sorted(PARAMETER_EFFECTS))
def test_parameter_is_honoured(key: str) -> None:
    value, check = PARAMETER_EFFECTS[key]
    assert check(kserve(params={key: value}))


@pytest.mark.parametrize("key", [*sorted(schema.REFUSED_PARAMETERS), "no_such_parameter"])
def test_refused_and_unknown_parameters_name_the_parameter(key: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=key):
        kserve(params={key: 1})


# --- OpenAI body keys ----------------------------------------------------------------------------------

MSGS = [{"role": "user", "content": "hi"}]
#: key -> (body, chat, what the parsed request shows)
OPENAI_EFFECTS: dict[str, tuple[dict[str, Any], bool, Callable[[Any], bool]]] = {
    "model": ({"model": "x", "prompt": "hi"}, False, lambda o: o.model == "x"),
    "prompt": ({"model": "m", "prompt": [1, 2]}, False, lambda o: o.req.token_ids == [1, 2]),
    "messages": ({"model": "m", "messages": MSGS}, True, lambda o: o.req.messages == MSGS),
    "stream": ({"model": "m", "prompt": "hi", "stream": True}, False, lambda o: o.req.stream),
    "stream_options": (
        {"model": "m", "prompt": "hi", "stream": True, "stream_options": {"include_usage": True}},
        False,
        lambda o: o.include_usage,
    ),
    "echo": ({"model": "m", "prompt": "hi", "echo": True}, False, lambda o: not o.req.exclude_input_in_output),
    "user": ({"model": "m", "prompt": "hi", "user": "u-7"}, False, lambda o: o.user == "u-7"),
    "max_completion_tokens": (
        {"model": "m", "prompt": "hi", "max_completion_tokens": 9},
        False,
        lambda o: o.req.sampling.max_tokens == 9,
    ),
    "logprobs": ({"model": "m", "messages": MSGS, "logprobs": True}, True, lambda o: o.req.sampling.logprobs == 0),
    "top_logprobs": (
        {"model": "m", "messages": MSGS, "logprobs": True, "top_logprobs": 2},
        True,
        lambda o: o.req.sampling.logprobs == 2,
    ),
    "add_generation_prompt": (
        {"model": "m", "messages": MSGS, "add_generation_prompt": False},
        True,
        lambda o: o.req.add_generation_prompt is False,
    ),
}


def test_openai_tables_are_covered() -> None:
    assert set(OPENAI_EFFECTS) == set(OPENAI_KEYS)
    assert not OPENAI_KEYS & set(OPENAI_REFUSED)
    assert OPENAI_KEYS & set(VLLM_KEYS) == {"logprobs"}  # chat and completions give it their own meanings
    assert set(OPENAI_NEUTRAL) <= set(OPENAI_REFUSED)


@pytest.mark.parametrize("key", sorted(OPENAI_EFFECTS))
def test_openai_key_is_honoured(key: str) -> None:
    body, chat, check = OPENAI_EFFECTS[key]
    assert check(parse_openai(body, chat))


@pytest.mark.parametrize("key", sorted(OPENAI_REFUSED))
def test_openai_refused_keys_name_the_option(key: str) -> None:
    with pytest.raises(errors.UnsupportedOption) as ei:
        parse_openai({"model": "m", "messages": MSGS, key: {"type": "json_object"}}, chat=True)
    assert ei.value.option == key
    status, _, body = errors.to_http(ei.value)
    assert status == 400 and body["error"]["param"] == key


@pytest.mark.parametrize("key", sorted(OPENAI_NEUTRAL))
def test_openai_neutral_values_are_accepted(key: str) -> None:
    parse_openai({"model": "m", "messages": MSGS, key: OPENAI_NEUTRAL[key]}, chat=True)


def test_openai_structured_output_and_tools_refused() -> None:
    schema_fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    for key, value in (
        ("response_format", {"type": "json_object"}),
        ("response_format", schema_fmt),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "auto"),
    ):
        with pytest.raises(errors.UnsupportedOption, match=key):
            parse_openai({"model": "m", "messages": MSGS, key: value}, chat=True)
    with pytest.raises(errors.UnsupportedOption, match=r"stream_options\.continuous_usage_stats"):
        parse_openai({"model": "m", "prompt": "x", "stream_options": {"continuous_usage_stats": True}}, chat=False)


def test_tensor_parameters_are_honoured_or_refused() -> None:
    from dynamo_grpc.frontend.kserve.parse import requested_outputs
    from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb

    assert set(schema.TENSOR_PARAMETERS) == {"binary_data", "binary_data_size"}  # gRPC tensors are binary anyway
    text = bytes_tensor("text_input", ["Hi"])
    text.parameters["binary_data"] = True
    assert parse_request({"text_input": text}, {}).prompt == "Hi"
    text.parameters["shared_memory_region"] = "r0"
    with pytest.raises(errors.Unimplemented, match="shared-memory"):
        parse_request({"text_input": text}, {})
    out = pb.ModelInferRequest.InferRequestedOutputTensor(name="text_output")
    assert requested_outputs([out]) == ["text_output"]
    out.parameters["classification"].int64_param = 3
    with pytest.raises(errors.UnsupportedOption) as ei:
        requested_outputs([out])
    assert ei.value.option == "output 'text_output'.parameters.classification"


def test_binary_data_size_is_checked() -> None:
    from dynamo_grpc.frontend.kserve.codec import TensorError, decode_inputs
    from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
    req.raw_input_contents.append(b"\x05\x00\x00\x00")
    t.parameters["binary_data_size"].int64_param = 4
    assert int(decode_inputs(req)["max_tokens"].data[0]) == 5
    t.parameters["binary_data_size"].int64_param = 8
    with pytest.raises(TensorError, match="binary_data_size is 8, raw data is 4 bytes"):
        decode_inputs(req)


def test_metadata_advertises_exactly_what_parsing_honours() -> None:
    from dynamo_grpc.frontend.kserve import metadata

    meta = metadata.llm_metadata("m")
    assert [t.name for t in meta.inputs] == list(schema.INPUTS)
    assert not {t.name for t in meta.inputs} & set(schema.REFUSED_INPUTS)  # e.g. nothing refused is advertised
    for t in meta.inputs:  # each advertised datatype is one parsing accepts
        assert t.datatype in schema.INPUTS[t.name].datatypes
    assert [t.name for t in meta.outputs] == list(schema.OUTPUTS)
