"""Streamed raw KServe responses are written as bytes (frontend/kserve/wire.py: the template's bytes plus each
response's outputs): decoded with the generated classes they must equal, field by field, the message the
message-building path gives for the same chunks, and a real grpc.aio server must deliver them as such."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from dynamo_grpc.engines.base import SamplingParams
from dynamo_grpc.frontend.kserve import wire
from dynamo_grpc.frontend.kserve.responses import FINAL, Responder
from dynamo_grpc.frontend.request import LlmRequest
from dynamo_grpc.frontend.token_stream import Chunk
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.v1 import common_pb2
from tests.unit.test_frontend_pipeline import MODEL, source  # noqa: F401  (fixture)


def _request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=MODEL, id="req-9")
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    request.raw_input_contents.append(len(b"Hi").to_bytes(4, "little") + b"Hi")  # raw in, raw out
    return request


def _chunks() -> list[Chunk]:
    lp = common_pb2.TokenLogprob(token_id=5, logprob=-0.5)
    return [
        Chunk("", 1, prompt_tokens=2, worker_id="w0", logprobs=[lp], cumulative_logprob=-0.5),  # no text yet
        Chunk(" d\u00e9j\u00e0 vu \u2014 " + "x" * 300, 2, prompt_tokens=2, cached_tokens=1, worker_id="w0",
              logprobs=[lp, lp], cumulative_logprob=-1.5),  # non-ASCII, and past 127 bytes (a 2-byte varint)
        Chunk(" two", 1, prompt_tokens=2, cached_tokens=1, worker_id="w0", cumulative_logprob=-1.5),
        Chunk(" three", 1, prompt_tokens=2, worker_id="w1", cumulative_logprob=-2.0),  # migrated: names w1
        Chunk("!", 1, "stop", 2, 6, 1, "w1", cumulative_logprob=-2.0),
    ]


@pytest.mark.parametrize("echo", [False, True])
@pytest.mark.parametrize("outputs", [
    None,  # the default outputs: the cached-bytes-around-the-text path
    ["num_output_tokens", "text_output", "cached_tokens"],  # text in the middle: the order must hold
    ["text_output", "num_output_tokens", "logprobs", "cumulative_logprob"],  # per-field path
])
def test_stream_bytes_decode_to_the_message_path(source, echo: bool, outputs: list[str] | None) -> None:  # noqa: F811
    _, tok = source
    req = LlmRequest(prompt="Hi", messages=None, stream=True, sampling=SamplingParams(),
                     exclude_input_in_output=not echo)
    if outputs:
        req.requested_outputs = outputs
    fast = Responder(_request(), req, tok, stream_rpc=True)
    slow = Responder(_request(), req, tok, stream_rpc=True)
    n_bytes = 0
    for c in _chunks():
        frame = fast.stream_frame(c)
        want = slow.chunk(c)
        if want is None:
            assert frame is None
            continue
        assert frame is not None
        if c.finish_reason is None:
            assert isinstance(frame, bytes)  # the non-final raw responses are the bytes path
            n_bytes += 1
            got = pb.ModelStreamInferResponse.FromString(frame)
        else:
            assert isinstance(frame, pb.ModelStreamInferResponse)
            got = pb.ModelStreamInferResponse.FromString(wire.serialize_stream_response(frame))
        expected = slow.wrapped(want)
        assert got == expected
        assert not got.error_message
        g, w = got.infer_response, expected.infer_response
        assert (g.model_name, g.model_version, g.id) == (w.model_name, w.model_version, w.id)
        assert dict(g.parameters) == dict(w.parameters)
        assert [(o.name, o.datatype, list(o.shape)) for o in g.outputs] == [
            (o.name, o.datatype, list(o.shape)) for o in w.outputs
        ]
        assert list(g.raw_output_contents) == list(w.raw_output_contents)
        assert g.parameters[FINAL].bool_param == (c.finish_reason is not None)
    assert n_bytes == (4 if echo else 3)  # with the prompt echoed, the first chunk has text too


def test_varint_matches_protobuf() -> None:
    assert wire.varint(0) == b"\x00"
    for n in (1, 127, 128, 300, 16383, 16384, 2**21 + 3):  # (proto3 leaves an empty string out)
        assert pb.ModelInferResponse(model_name="m" * n).SerializeToString() == b"\x0a" + wire.varint(n) + b"m" * n
    assert wire.varint(2**32 + 5) == bytes([0x85, 0x80, 0x80, 0x80, 0x10])


def test_a_server_with_the_bytes_serializer_delivers_bytes_and_messages() -> None:
    """ModelStreamInfer registered by `add_inference_service` writes pre-encoded bytes as they are and
    messages serialised; the other methods keep the generated serializers."""
    frame = wire.stream_response(pb.ModelInferResponse(model_name="m", id="a").SerializeToString(),
                                 [wire.raw_text_field("hello")])

    class Servicer(pb_grpc.GRPCInferenceServiceServicer):
        async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],  # type: ignore[override]
                                   context: grpc.aio.ServicerContext) -> None:
            async for _ in request_iterator:
                await context.write(frame)
                await context.write(pb.ModelStreamInferResponse(error_message="second"))

        async def ServerLive(self, request: pb.ServerLiveRequest, context: object) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

    async def main() -> list[pb.ModelStreamInferResponse]:
        server = grpc.aio.server()
        wire.add_inference_service(Servicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                assert (await stub.ServerLive(pb.ServerLiveRequest())).live

                async def one() -> AsyncIterator[pb.ModelInferRequest]:
                    yield pb.ModelInferRequest(model_name="m")

                return [m async for m in stub.ModelStreamInfer(one())]
        finally:
            await server.stop(None)

    got = asyncio.run(main())
    assert len(got) == 2
    assert got[0].infer_response.model_name == "m" and got[0].infer_response.id == "a"
    assert list(got[0].infer_response.raw_output_contents) == [len(b"hello").to_bytes(4, "little") + b"hello"]
    assert got[1].error_message == "second"
