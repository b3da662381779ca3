"""Malformed requests get the right status and a message naming the field; the server keeps serving.

Uses our generated `inference` stubs in this process (no third-party client needed for raw protobuf).
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.mesh import Mesh
from tests.conformance.conftest import MODEL, start_mesh

pytestmark = pytest.mark.slow


def bytes_input(req: pb.ModelInferRequest, name: str, value: bytes, shape: list[int] | None = None) -> None:
    req.inputs.add(name=name, datatype="BYTES", shape=shape or [1])
    req.raw_input_contents.append(struct.pack("<I", len(value)) + value)


def good(prompt: str = "hello", **sampling: object) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL, id="ok")
    bytes_input(req, "text_input", prompt.encode())
    bytes_input(req, "sampling_parameters", json.dumps({"max_tokens": 4, "seed": 1, **sampling}).encode())
    return req


async def assert_still_serving(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert (await stub.ServerLive(pb.ServerLiveRequest())).live
    resp = await stub.ModelInfer(good(), timeout=30)
    assert resp.outputs[0].name == "text_output"


def wrong_dtype() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="text_input", datatype="INT32", shape=[1])
    req.raw_input_contents.append(b"\x01\x00\x00\x00")
    return req


def wrong_shape() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="text_input", datatype="BYTES", shape=[2])
    req.raw_input_contents.append(struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b")
    return req


def size_mismatch() -> pb.ModelInferRequest:
    req = good()
    req.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
    req.raw_input_contents.append(b"\x01\x00")
    return req


def missing_text() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL)
    bytes_input(req, "sampling_parameters", b"{}")
    return req


def bad_json() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL)
    bytes_input(req, "text_input", b"hi")
    bytes_input(req, "sampling_parameters", b'{"max_tokens": 4,')
    return req


def unknown_model() -> pb.ModelInferRequest:
    req = good()
    req.model_name = "no-such-model"
    return req


def logprobs_from_mocker() -> pb.ModelInferRequest:
    req = good()
    req.inputs.add(name="return_logprobs", datatype="BOOL", shape=[1])
    req.raw_input_contents.append(b"\x01")
    return req


def unknown_input() -> pb.ModelInferRequest:
    req = good()
    req.inputs.add(name="end_id", datatype="INT32", shape=[1])
    req.raw_input_contents.append(b"\x02\x00\x00\x00")
    return req


def priority_parameter() -> pb.ModelInferRequest:
    req = good()
    req.parameters["priority"].int64_param = 2
    return req


def bad_json_of(raw: bytes) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL)
    bytes_input(req, "text_input", b"hello")
    bytes_input(req, "sampling_parameters", raw)
    return req


def declared_huge() -> pb.ModelInferRequest:
    """58 bytes on the wire that declare 2^27 BYTES elements (the probe's 1 GiB allocation)."""
    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="text_input", datatype="BYTES", shape=[134217728])
    req.raw_input_contents.append(struct.pack("<I", 5) + b"hello")
    return req


def long_id() -> pb.ModelInferRequest:
    req = good()
    req.id = "i" * 100_000
    return req


CASES = [
    ("wrong_dtype", wrong_dtype, grpc.StatusCode.INVALID_ARGUMENT, "text_input"),
    ("wrong_shape", wrong_shape, grpc.StatusCode.INVALID_ARGUMENT, "text_input"),
    ("raw_size_mismatch", size_mismatch, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ("missing_text_input", missing_text, grpc.StatusCode.INVALID_ARGUMENT, "text_input"),
    ("bad_json", bad_json, grpc.StatusCode.INVALID_ARGUMENT, "sampling_parameters"),
    ("bad_value", lambda: good(temperature=-1), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ("unknown_model", unknown_model, grpc.StatusCode.NOT_FOUND, "no-such-model"),
    ("over_context", lambda: good(" hello" * 9000), grpc.StatusCode.RESOURCE_EXHAUSTED, "context length"),
    # the mocker runs no model: asking it for logprobs is refused by name (unsupported_option), not made up
    ("logprobs_from_mocker", logprobs_from_mocker, grpc.StatusCode.INVALID_ARGUMENT, "logprobs"),
    # options that are not honoured are refused by name, never accepted and ignored
    (
        "structured_output",
        lambda: good(guided_decoding={"json": {}}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "guided_decoding",
    ),
    ("refused_input", unknown_input, grpc.StatusCode.INVALID_ARGUMENT, "end_id"),
    ("refused_parameter", priority_parameter, grpc.StatusCode.INVALID_ARGUMENT, "priority"),
    # hostile inputs: refused before any allocation or routing, never INTERNAL
    ("declared_huge_shape", declared_huge, grpc.StatusCode.INVALID_ARGUMENT, "text_input"),
    ("top_k_past_int32", lambda: good(top_k=2**31), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
    ("sampling_json_bomb", lambda: bad_json_of(b"[" * 100000), grpc.StatusCode.INVALID_ARGUMENT, "nested"),
]


@pytest.mark.parametrize(("name", "build", "code", "needle"), CASES, ids=[c[0] for c in CASES])
async def test_unary_errors(mesh: Mesh, name: str, build, code: grpc.StatusCode, needle: str) -> None:
    async with grpc.aio.insecure_channel(mesh.frontend_grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.ModelInfer(build(), timeout=30)
        assert ei.value.code() == code, ei.value.details()
        assert needle in (ei.value.details() or "")
        await assert_still_serving(stub)


async def test_stream_errors_keep_stream_open(mesh: Mesh) -> None:
    """Every bad request on one stream gets an error_message response; good ones around them still work."""
    reqs = [good()]
    for _, build, code, _needle in CASES:
        r = build()
        r.id = f"bad-{code.name}"
        reqs.append(r)
    last = good()
    last.id = "last"
    reqs.append(last)

    async def gen() -> AsyncIterator[pb.ModelInferRequest]:
        for r in reqs:
            yield r
            await asyncio.sleep(0.01)

    async with grpc.aio.insecure_channel(mesh.frontend_grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        errors, finals = [], set()
        async for resp in stub.ModelStreamInfer(gen(), timeout=60):
            if resp.error_message:
                errors.append(resp.error_message)
            elif resp.infer_response.parameters["triton_final_response"].bool_param:
                finals.add(resp.infer_response.id)
        assert len(errors) == len(CASES)
        assert finals == {"ok", "last"}
        assert any("text_input" in e for e in errors) and any("NOT_FOUND" in e for e in errors)


async def test_long_client_id_is_refused_not_echoed(mesh: Mesh) -> None:
    """A 100 kB request id would be echoed in every response: refused by name, on both RPCs."""
    async with grpc.aio.insecure_channel(mesh.frontend_grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.ModelInfer(long_id(), timeout=30)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'id' is 100000 bytes" in ei.value.details()
        answers = [r async for r in stub.ModelStreamInfer(iter([long_id()]), timeout=30)]
        assert len(answers) == 1 and "[INVALID_ARGUMENT] 'id' is 100000 bytes" in answers[0].error_message
        assert answers[0].infer_response.id == ""  # the refused id is not echoed back
        await assert_still_serving(stub)


async def test_unary_stream_true_is_refused(mesh: Mesh) -> None:
    req = good()
    req.inputs.add(name="stream", datatype="BOOL", shape=[1])
    req.raw_input_contents.append(b"\x01")
    async with grpc.aio.insecure_channel(mesh.frontend_grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.ModelInfer(req, timeout=30)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ModelStreamInfer" in ei.value.details()


@pytest.fixture(scope="module")
def real_time_mesh() -> Iterator[Mesh]:
    """A mocker at real speed: 8,000 tokens take seconds, so a 0.3 s deadline always fires mid-generation.

    The shared mesh runs at 1000x, where a fast machine finishes 8,000 tokens inside 0.3 s.
    """
    m = start_mesh(workers=1, speedup_ratio=1.0)
    try:
        yield m
    finally:
        m.stop()


async def test_client_cancel_and_deadline(real_time_mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(real_time_mesh.frontend_grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        req = good(max_tokens=5000, ignore_eos=True)
        req.inputs.add(name="stream", datatype="BOOL", shape=[1])
        req.raw_input_contents.append(b"\x01")

        async def one() -> AsyncIterator[pb.ModelInferRequest]:
            yield req
            await asyncio.sleep(3600)

        call = stub.ModelStreamInfer(one())
        got = 0
        async for _ in call:
            got += 1
            if got == 2:
                break
        call.cancel()
        assert got == 2
        # A deadline shorter than the generation.
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.ModelInfer(good(max_tokens=8000, ignore_eos=True), timeout=0.3)
        assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # Triton's `timeout` request parameter (microseconds) is a deadline too
        req = good(max_tokens=8000, ignore_eos=True)
        req.parameters["timeout"].int64_param = 300_000
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.ModelInfer(req, timeout=30)
        assert ei.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await assert_still_serving(stub)
        stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL))
        assert stats.model_stats[0].inference_count >= 1
