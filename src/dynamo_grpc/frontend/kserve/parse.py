"""An `LlmRequest` from decoded KServe input tensors and request parameters, by `schema.py`'s tables.

Sources apply in order, later overriding earlier: request parameters, the `sampling_parameters` JSON,
then tensors. Every error is `InvalidArgument` (or `UnsupportedOption`) naming the tensor or field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from dynamo_grpc.errors import InvalidArgument, Unimplemented, UnsupportedOption
from dynamo_grpc.frontend.kserve import schema
from dynamo_grpc.frontend.kserve.codec import NO_VALUE, Tensor
from dynamo_grpc.frontend.request import (
    DEFAULT_OUTPUTS,
    UINT32_MAX,
    VLLM_KEYS,
    LlmRequest,
    SamplingBuilder,
    coerce,
    parse_json,
)


def _one(t: Tensor) -> Any:
    if t.one is not NO_VALUE:  # decoded without numpy (codec.decode_inputs)
        v = t.one
    else:
        data = t.data
        if data.size != 1:
            raise InvalidArgument(f"tensor '{t.name}': expected exactly one element, shape is {list(t.shape)}")
        v = data.item(0)  # a Python scalar (the element itself for BYTES)
    if t.datatype == "BF16":
        return float(np.array([int(v) << 16], dtype=np.uint32).view(np.float32)[0])
    return v


def _utf8(t: Tensor, v: Any) -> str:
    try:
        return bytes(v).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"tensor '{t.name}': not valid UTF-8 ({e.reason} at byte {e.start})") from e


def _check_tensor_parameters(where: str, params: Mapping[str, Any]) -> None:
    for key in params:
        if key.startswith("shared_memory"):
            raise Unimplemented(f"{where}: shared-memory tensors are not supported")
        if key not in schema.TENSOR_PARAMETERS:
            raise UnsupportedOption(f"{where}.parameters.{key}", "is not supported")


def requested_outputs(outputs: Iterable[Any]) -> list[str]:
    """The names of a request's `outputs`, whose parameters must be ones we honour."""
    names = []
    for o in outputs:
        _check_tensor_parameters(f"output '{o.name}'", o.parameters)
        names.append(o.name)
    return names


def _check(t: Tensor) -> schema.InputSpec:
    _check_tensor_parameters(f"tensor '{t.name}'", t.parameters)
    spec = schema.INPUTS.get(t.name)
    if spec is None:
        why = schema.REFUSED_INPUTS.get(t.name)
        if why is not None:
            raise UnsupportedOption(t.name, f"input is not supported: {why}")
        raise UnsupportedOption(t.name, "is not an input of this model (see ModelMetadata)")
    if t.datatype not in spec.datatypes:
        allowed = spec.datatypes[0] if len(spec.datatypes) == 1 else f"one of {sorted(spec.datatypes)}"
        raise InvalidArgument(f"tensor '{t.name}': datatype must be {allowed}, got {t.datatype}")
    return spec


def _text(t: Tensor) -> str:
    return _utf8(t, _one(t))


def _texts(t: Tensor) -> list[str]:
    return [_utf8(t, e) for e in t.data.reshape(-1)]


def _ids(t: Tensor) -> list[int]:
    flat = t.data.reshape(-1)
    if flat.size and int(flat.min()) < 0:
        raise InvalidArgument(f"tensor '{t.name}': token ids must be >= 0")
    if flat.size and int(flat.max()) > UINT32_MAX:  # before the int64 cast (UINT64 >= 2^63 would wrap)
        raise InvalidArgument(f"tensor '{t.name}': token id {int(flat.max())} is out of range (<= {UINT32_MAX})")
    return flat.astype(np.int64, copy=False).tolist()  # C speed: prompts can be 100k+ ids


def _parameters(b: SamplingBuilder, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """Apply sampling keys; return the Triton parameters (chat_template, stream, timeout, ...)."""
    own: dict[str, Any] = {}
    for key, value in parameters.items():
        if key in schema.PARAMETERS:
            own[key] = value
        elif key in schema.REFUSED_PARAMETERS:
            raise UnsupportedOption(key, f"parameter is not supported: {schema.REFUSED_PARAMETERS[key]}")
        else:  # a vLLM sampling key, or refused/unknown with its name
            b.apply("parameter", key, value)
    return own


def _sampling_json(b: SamplingBuilder, t: Tensor) -> None:
    raw = _text(t)
    obj = parse_json("tensor 'sampling_parameters'", raw) if raw.strip() else {}
    if not isinstance(obj, dict):
        raise InvalidArgument(f"tensor 'sampling_parameters': must be a JSON object, got {type(obj).__name__}")
    for key, value in obj.items():
        if value is not None:
            b.apply("sampling_parameters", key, value)


def _outputs(requested: list[str] | None, flags: dict[str, bool]) -> list[str]:
    outs = list(DEFAULT_OUTPUTS)
    if requested:
        unknown = [o for o in requested if o not in schema.OUTPUTS]
        if unknown:
            raise InvalidArgument(f"unknown requested output '{unknown[0]}' (outputs: {', '.join(schema.OUTPUTS)})")
        outs = list(dict.fromkeys(requested))
    for flag, on in flags.items():
        output = schema.RETURN_FLAGS[flag]
        if on and output not in outs:
            outs.append(output)
        elif not on and output in outs and not (requested and output in requested):
            outs.remove(output)
    return outs


def parse_request(
    inputs: Mapping[str, Tensor],
    parameters: Mapping[str, Any],
    requested_outputs: list[str] | None = None,
    *,
    stream_rpc: bool = False,
) -> LlmRequest:
    """Build an LlmRequest from decoded input tensors and request parameters.

    `stream_rpc` is true on ModelStreamInfer, where `stream` defaults to true (decoupled); on ModelInfer
    it defaults to false and `stream=true` is refused, since a unary call carries one response.
    """
    b = SamplingBuilder()
    own = _parameters(b, parameters)
    for t in inputs.values():
        _check(t)
    if "sampling_parameters" in inputs:
        _sampling_json(b, inputs["sampling_parameters"])
    flags: dict[str, bool] = {}
    for name, t in inputs.items():
        if name in schema.SCALAR_KEYS:
            key = schema.SCALAR_KEYS[name]
            v = _one(t)
            b.apply(f"tensor '{name}'", key, float(v) if VLLM_KEYS[key] == "float" else v)
        elif name in ("stop", "stop_words"):
            b.stop = [w for w in _texts(t) if w]
        elif name == "bad_words":
            b.bad_words = [w for w in _texts(t) if w]
        elif name in ("stop_token_ids", "allowed_token_ids"):
            b.apply(f"tensor '{name}'", name, _ids(t))
        elif name in schema.RETURN_FLAGS:
            flags[name] = bool(_one(t))
        elif name in schema.ONLY_VALUE:
            v = _one(t)
            if v != schema.ONLY_VALUE[name]:
                raise UnsupportedOption(name, f"must be {schema.ONLY_VALUE[name]!r}, got {v!r}")

    chat = bool(coerce("parameter chat_template", "bool", own.get("chat_template", False)))
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    token_ids: list[int] | None = None
    if "input_ids" in inputs:
        if "text_input" in inputs or "messages" in inputs:
            raise InvalidArgument("tensor 'input_ids': give either input_ids or text_input/messages, not both")
        token_ids = _ids(inputs["input_ids"])
        if not token_ids:
            raise InvalidArgument("tensor 'input_ids': prompt is empty")
    elif "messages" in inputs:
        messages = parse_messages("tensor 'messages'", _text(inputs["messages"]))
    elif "text_input" not in inputs:
        raise InvalidArgument("missing required input tensor 'text_input'")
    if "text_input" in inputs:
        text = _text(inputs["text_input"])
        if chat and messages is None:
            # a JSON list of messages, or plain text taken as one user turn
            if text.lstrip().startswith(("[", "{")):
                messages = parse_messages("tensor 'text_input'", text)
            else:
                messages = [{"role": "user", "content": text}]
        elif messages is None:
            prompt = text
    if prompt is not None and not prompt:
        raise InvalidArgument("tensor 'text_input': prompt is empty")

    stream = stream_rpc
    if "stream" in inputs:
        stream = bool(_one(inputs["stream"]))
    elif "stream" in own:
        stream = bool(coerce("parameter stream", "bool", own["stream"]))
    timeout_s = None
    if "timeout" in own:
        us = coerce("parameter timeout", "int", own["timeout"])
        if us <= 0:
            raise InvalidArgument(f"parameter timeout must be > 0 microseconds, got {us}")
        timeout_s = us / 1e6
    outs = _outputs(requested_outputs, flags)
    if ("logprobs" in outs or "cumulative_logprob" in outs) and b.sampling.logprobs is None:
        b.sampling.logprobs = 0  # the sampled tokens' own logprobs, no alternatives
    return b.build(
        prompt=prompt,
        messages=messages,
        stream=stream,
        exclude_input_in_output=bool(_one(inputs["exclude_input_in_output"]))
        if "exclude_input_in_output" in inputs
        else False,
        requested_outputs=outs,
        lora=_text(inputs["lora_name"]) if "lora_name" in inputs else "",
        token_ids=token_ids,
        timeout_s=timeout_s,
        empty_final_response=bool(
            coerce(
                "parameter triton_enable_empty_final_response",
                "bool",
                own.get("triton_enable_empty_final_response", False),
            )
        ),
    )


def parse_messages(where: str, text: str) -> list[dict[str, Any]]:
    """Chat messages from JSON: a list of {role, content}, or {"messages": [...]}."""
    obj = parse_json(f"{where}: chat messages", text)
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        obj = obj["messages"]
    if not isinstance(obj, list) or not obj:
        raise InvalidArgument(f"{where}: chat messages must be a non-empty JSON list of {{role, content}} objects")
    for i, m in enumerate(obj):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidArgument(f"{where}: messages[{i}] must be an object with a string 'role'")
    return obj
