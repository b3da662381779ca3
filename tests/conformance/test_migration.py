"""Request migration: kill -9 the worker serving a stream; the client still gets the whole output once.

The mocker's tokens are a function of (seed, position), so a run without the kill is the reference.
Afterwards, with every worker dead, requests fail with UNAVAILABLE and the frontend keeps serving.
"""

from __future__ import annotations

import json
import os
import signal
import struct
from collections.abc import Iterator

import grpc
import pytest

from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.mesh import Mesh
from tests.conformance.conftest import MODEL, start_mesh

pytestmark = pytest.mark.slow
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def slow_mesh() -> Iterator[Mesh]:
    # Slow enough (about 10 ms a token) that a stream is still running when we kill its worker.
    m = start_mesh(speedup_ratio=2.0, frontend_args=[])
    try:
        yield m
    finally:
        m.stop()


def stream_request(request_id: str) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL, id=request_id)
    for name, value in (
        ("text_input", b"Migrate this request, please"),
        ("sampling_parameters", json.dumps({"max_tokens": MAX_TOKENS, "seed": 5, "ignore_eos": True}).encode()),
    ):
        req.inputs.add(name=name, datatype="BYTES", shape=[1])
        req.raw_input_contents.append(struct.pack("<I", len(value)) + value)
    for name in ("stream", "exclude_input_in_output"):
        req.inputs.add(name=name, datatype="BOOL", shape=[1])
        req.raw_input_contents.append(b"\x01")
    return req


def decode_text(resp: pb.ModelInferResponse) -> str:
    i = [o.name for o in resp.outputs].index("text_output")
    raw = resp.raw_output_contents[i]
    (n,) = struct.unpack_from("<I", raw)
    return raw[4 : 4 + n].decode()


def num_tokens(resp: pb.ModelInferResponse) -> int:
    i = [o.name for o in resp.outputs].index("num_output_tokens")
    return int(struct.unpack("<i", resp.raw_output_contents[i])[0])


def pid_of(worker_id: str) -> int:
    # worker-<host>-<pid>-<4 hex>
    return int(worker_id.rsplit("-", 2)[1])


def run_stream(address: str, request_id: str, kill_after: int | None) -> tuple[str, int, list[str], str]:
    with grpc.insecure_channel(address) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        text, tokens, workers, finish = [], 0, [], ""
        for i, msg in enumerate(stub.ModelStreamInfer(iter([stream_request(request_id)]), timeout=120)):
            assert not msg.error_message, msg.error_message
            resp = msg.infer_response
            text.append(decode_text(resp))
            tokens += num_tokens(resp)
            wid = resp.parameters["worker_id"].string_param
            if not workers or workers[-1] != wid:
                workers.append(wid)
            if kill_after is not None and i == kill_after:
                os.kill(pid_of(wid), signal.SIGKILL)
            if resp.parameters["triton_final_response"].bool_param:
                i = [o.name for o in resp.outputs].index("finish_reason")
                finish = resp.raw_output_contents[i][4:].decode()
                break
        return "".join(text), tokens, workers, finish


def test_kill_worker_mid_stream(slow_mesh: Mesh) -> None:
    ref_text, ref_tokens, ref_workers, ref_finish = run_stream(slow_mesh.frontend_grpc, "ref", None)
    assert ref_tokens == MAX_TOKENS and ref_finish == "length" and len(ref_workers) == 1

    text, tokens, workers, finish = run_stream(slow_mesh.frontend_grpc, "killed", kill_after=2)
    assert len(workers) == 2, f"the stream was not migrated: {workers}"
    assert tokens == MAX_TOKENS and finish == "length"
    assert text == ref_text  # nothing lost, nothing twice

    # Kill the last worker too: now no worker is live, and the frontend says so without dying.
    os.kill(pid_of(workers[-1]), signal.SIGKILL)
    with grpc.insecure_channel(slow_mesh.frontend_grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        req = stream_request("none-left")
        with pytest.raises(grpc.RpcError) as ei:
            stub.ModelInfer(_unary(req), timeout=60)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE, ei.value.details()
        assert stub.ServerLive(pb.ServerLiveRequest()).live


def _unary(req: pb.ModelInferRequest) -> pb.ModelInferRequest:
    out = pb.ModelInferRequest()
    out.CopyFrom(req)
    i = [t.name for t in out.inputs].index("stream")
    out.raw_input_contents[i] = b"\x00"
    return out
