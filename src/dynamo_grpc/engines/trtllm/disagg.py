"""Disaggregated prefill/decode: TensorRT-LLM's ``DisaggregatedParams`` carried as opaque bytes.

A prefill worker runs the prompt as a ``context_only`` request; TensorRT-LLM answers with the first
token and a ``DisaggregatedParams`` (``ctx_request_id``, ``first_gen_tokens``, ``opaque_state``:
what its cache transceiver needs to move the KV). We encode those as bytes for the ``KvHandle``'s
``opaque_params`` field; the decode worker decodes them and submits a ``generation_only`` request,
and TensorRT-LLM's transceiver pulls the KV (our KvTransfer.Pull is not used for this engine).
The encoding is versioned JSON so that both sides can check it (a worker refuses bytes it did not
write rather than guessing).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from dynamo_grpc import errors

#: the encoding's tag; bump it when the fields change
FORMAT = "trtllm-disagg/1"
_FIELDS = ("ctx_request_id", "first_gen_tokens", "opaque_state", "draft_tokens")


def encode_params(params: Any) -> bytes:
    """Bytes for ``KvHandle.opaque_params`` from a context-only result's ``DisaggregatedParams``."""
    doc: dict[str, Any] = {"format": FORMAT}
    for name in _FIELDS:
        value = getattr(params, name, None)
        if isinstance(value, bytes | bytearray):
            value = {"b64": base64.b64encode(bytes(value)).decode("ascii")}
        doc[name] = value
    if doc["ctx_request_id"] is None or not doc["first_gen_tokens"]:
        raise errors.Internal("TensorRT-LLM returned disaggregated params without ctx_request_id or first_gen_tokens")
    return json.dumps(doc, separators=(",", ":")).encode("utf-8")


def decode_params(data: bytes, disaggregated_params_cls: Any) -> Any:
    """A ``generation_only`` ``DisaggregatedParams`` from :func:`encode_params`' bytes (InvalidArgument if not ours)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise errors.InvalidArgument(f"kv_handle.opaque_params is not TensorRT-LLM disaggregated params: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise errors.InvalidArgument(
            f"kv_handle.opaque_params: expected format {FORMAT!r} from a trtllm prefill worker"
        )
    kw: dict[str, Any] = {"request_type": "generation_only"}
    for name in _FIELDS:
        value = doc.get(name)
        if isinstance(value, dict) and "b64" in value:
            value = base64.b64decode(value["b64"])
        if value is not None:
            kw[name] = value
    return disaggregated_params_cls(**kw)


def first_tokens(data: bytes) -> list[int]:
    """The tokens the prefill already returned (TensorRT-LLM repeats them in the generation-only output)."""
    doc = json.loads(data.decode("utf-8"))
    return [int(t) for t in doc.get("first_gen_tokens") or []]


def attach(handle: Any, opaque: bytes) -> None:
    """Put the bytes on a ``KvHandle`` (the field the disaggregation contract adds)."""
    if not hasattr(handle, "opaque_params"):
        raise errors.Unimplemented("this build's KvHandle has no opaque_params field; trtllm disaggregation needs it")
    handle.opaque_params = opaque
