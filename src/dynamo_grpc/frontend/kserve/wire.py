"""Streamed KServe responses as bytes: what stays the same per request is encoded once, each response appends
what changed.

A streamed raw response shares its ids, its outputs' metadata and its parameters (`worker_id`,
`triton_final_response` false) with every other response of its request. Those are serialised once (the
template's bytes) and each response is those bytes followed by its `raw_output_contents` fields, inside the
`ModelStreamInferResponse` that carries it. Concatenating encodings is valid protobuf: a parser appends
repeated fields in the order it reads them and merges the fields of a message (the protobuf encoding guide,
"Concatenated messages"), so the bytes decode to the message the generated classes would build.

The KServe service registers ModelStreamInfer with `serialize_stream_response`, which passes such bytes
through and serialises a message as before (errors, final responses, typed-contents responses).
"""

from __future__ import annotations

import struct
from typing import Any

import grpc

from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc

#: field tags (field number << 3 | wire type 2, length-delimited) of the fields written here
INFER_RESPONSE_TAG = b"\x12"  # ModelStreamInferResponse.infer_response = 2
RAW_OUTPUT_TAG = b"\x32"  # ModelInferResponse.raw_output_contents = 6
_LEN = struct.Struct("<I")
_SMALL = [bytes([n]) for n in range(128)]


def varint(n: int) -> bytes:
    """Protobuf's base-128 varint of a non-negative int."""
    if n < 128:
        return _SMALL[n]
    out = bytearray()
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def raw_output_field(raw: bytes) -> bytes:
    """One `raw_output_contents` entry, encoded as a field of ModelInferResponse."""
    return RAW_OUTPUT_TAG + varint(len(raw)) + raw


def raw_text_field(text: str) -> bytes:
    """A one-element BYTES output's `raw_output_contents` field: length prefix (u32 LE) + UTF-8."""
    b = text.encode("utf-8")
    return RAW_OUTPUT_TAG + varint(len(b) + 4) + _LEN.pack(len(b)) + b


def stream_response(prefix: bytes, fields: list[bytes]) -> bytes:
    """A ModelStreamInferResponse whose infer_response is ``prefix`` (a serialised ModelInferResponse)
    followed by ``fields`` (encoded ModelInferResponse fields)."""
    n = len(prefix)
    for f in fields:
        n += len(f)
    return b"".join((INFER_RESPONSE_TAG, varint(n), prefix, *fields))


def serialize_stream_response(msg: pb.ModelStreamInferResponse | bytes) -> bytes:
    """ModelStreamInfer's response serializer: bytes built here pass through, a message is serialised."""
    return msg if type(msg) is bytes else msg.SerializeToString()  # type: ignore[union-attr]


class _Capture:
    """Takes the generated method table on its way to the server, so one serializer can be swapped."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:  # the generated code's first call: ignored
        pass

    def add_registered_method_handlers(self, service: str, methods: dict[str, Any]) -> None:
        stream = methods["ModelStreamInfer"]
        methods = {
            **methods,
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                stream.stream_stream,
                request_deserializer=stream.request_deserializer,
                response_serializer=serialize_stream_response,
            ),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, methods),))
        self.server.add_registered_method_handlers(service, methods)


def add_inference_service(servicer: pb_grpc.GRPCInferenceServiceServicer, server: Any) -> None:
    """`add_GRPCInferenceServiceServicer_to_server`, with ModelStreamInfer taking pre-encoded bytes too."""
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, _Capture(server))
