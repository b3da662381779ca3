"""One trace across the mesh, exported over OTLP/gRPC to a real trace endpoint the test starts.

A KServe client (gRPC metadata) and an OpenAI client (HTTP header) each send a W3C `traceparent`; every
process (frontend, `dynamo-router`, worker) must continue that trace: client span → frontend server span →
frontend.request → route → (router process) router.decide, and frontend.request → Decode client span →
worker server span → decode, parents intact, the request id on every span of ours. Disaggregated, the same
trace carries the remote prefill, the decode worker's KV pull and the prefill worker's send.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import struct
import time
from collections.abc import AsyncIterator, Iterator

import aiohttp
import grpc
import pytest

from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.mesh import Mesh, MeshConfig
from tests.helpers.otlp_receiver import OtlpReceiverProcess, ReceivedSpan

pytestmark = pytest.mark.slow

OURS = {"preprocess", "frontend.request", "route", "router.decide", "decode"}


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OtlpReceiverProcess]:
    r = OtlpReceiverProcess(tmp_path_factory.mktemp("otlp"))
    try:
        yield r
    finally:
        r.stop()


@contextlib.contextmanager
def _traced(receiver: OtlpReceiverProcess, cfg: MeshConfig) -> Iterator[Mesh]:
    """A mesh whose processes export to the receiver, configured by the standard variables, nothing of ours."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the mesh's processes inherit them
    try:
        with Mesh(cfg) as m:
            yield m
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def traced_mesh(receiver: OtlpReceiverProcess) -> Iterator[Mesh]:
    cfg = MeshConfig(workers=1, speedup_ratio=1000.0, router_mode="kv-service", http_port=0, ready_timeout_s=90.0)
    with _traced(receiver, cfg) as m:
        yield m


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _infer_request(model: str) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id="client-req-7")
    text = b"why was this request slow"
    req.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(struct.pack("<I", len(text)) + text)
    sp = json.dumps({"max_tokens": 4, "ignore_eos": True}).encode()
    req.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(struct.pack("<I", len(sp)) + sp)
    return req


def _one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{len(found)} spans named {name}: {[(s.service, s.name) for s in spans]}"
    return found[0]


def _parent(spans: list[ReceivedSpan], s: ReceivedSpan) -> ReceivedSpan:
    by_id = {x.span_id: x for x in spans}
    assert s.parent_span_id in by_id, f"{s.name} ({s.service}) has a parent that is not in the trace"
    return by_id[s.parent_span_id]


def _check_chain(spans: list[ReceivedSpan], client_span_id: str, server_span: str) -> None:
    server = _one(spans, server_span)
    assert server.service == "dynamo-frontend" and server.parent_span_id == client_span_id  # the client's trace
    preprocess, request = _one(spans, "preprocess"), _one(spans, "frontend.request")
    assert _parent(spans, preprocess) is server and _parent(spans, request) is server
    assert request.attributes["dynamo.routing_mode"] == "kv-service"
    assert request.attributes["dynamo.prompt_tokens"] > 0 and "first_token" in request.events
    rid = request.attributes["dynamo.request_id"]
    route = _one(spans, "route")
    assert _parent(spans, route) is request and route.attributes["dynamo.request_id"] == rid
    # the router process continued it: route -> Route client span -> router server span -> router.decide
    decide = _one(spans, "router.decide")
    assert decide.service == "dynamo-router" and decide.attributes["dynamo.request_id"] == rid
    rpc_server = _parent(spans, decide)
    assert rpc_server.name == "/dynamo_grpc.v1.RouterService/Route" and rpc_server.service == "dynamo-router"
    assert _parent(spans, _parent(spans, rpc_server)) is route
    assert decide.attributes["dynamo.worker"] == route.attributes["dynamo.worker"]
    # ... and the worker: frontend.request -> Decode client span -> worker server span -> decode
    decode = _one(spans, "decode")
    assert decode.service == "dynamo-worker" and decode.attributes["dynamo.request_id"] == rid
    assert decode.attributes["dynamo.output_tokens"] == 4 and decode.attributes["dynamo.finish_reason"] == "length"
    worker_server = _parent(spans, decode)
    assert worker_server.name == "/dynamo_grpc.v1.DecodeService/Decode" and worker_server.service == "dynamo-worker"
    assert _parent(spans, _parent(spans, worker_server)) is request


async def test_kserve_client_trace_continues_through_router_and_worker(
    traced_mesh: Mesh, receiver: OtlpReceiverProcess
) -> None:
    header, trace_id, client_span = _traceparent()
    async with grpc.aio.insecure_channel(traced_mesh.frontend_grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        resp = await stub.ModelInfer(
            _infer_request(traced_mesh.models[0]), metadata=(("traceparent", header),), timeout=30
        )
    assert resp.outputs
    spans = receiver.wait_for(trace_id, OURS | {"/inference.GRPCInferenceService/ModelInfer"})
    _check_chain(spans, client_span, "/inference.GRPCInferenceService/ModelInfer")
    assert {s.service for s in spans} == {"dynamo-frontend", "dynamo-router", "dynamo-worker"}


async def test_kserve_stream_rpc_is_traced_too(traced_mesh: Mesh, receiver: OtlpReceiverProcess) -> None:
    """ModelStreamInfer answers with context.write (a coroutine handler): still one span, the chain intact."""
    header, trace_id, client_span = _traceparent()

    async def one() -> AsyncIterator[pb.ModelInferRequest]:
        yield _infer_request(traced_mesh.models[0])

    async with grpc.aio.insecure_channel(traced_mesh.frontend_grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        got = [m async for m in stub.ModelStreamInfer(one(), metadata=(("traceparent", header),), timeout=30)]
    assert got and not got[0].error_message
    name = "/inference.GRPCInferenceService/ModelStreamInfer"
    _check_chain(receiver.wait_for(trace_id, OURS | {name}), client_span, name)


async def test_openai_client_traceparent_header_is_continued(traced_mesh: Mesh, receiver: OtlpReceiverProcess) -> None:
    header, trace_id, client_span = _traceparent()
    body = {"model": traced_mesh.models[0], "prompt": "why", "max_tokens": 4, "ignore_eos": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"http://{traced_mesh.frontend_http}/v1/completions", json=body, headers={"traceparent": header}
        ) as r:
            assert r.status == 200
    spans = receiver.wait_for(trace_id, OURS | {"POST /v1/completions"})
    _check_chain(spans, client_span, "POST /v1/completions")


async def test_untraced_request_starts_its_own_trace(traced_mesh: Mesh, receiver: OtlpReceiverProcess) -> None:
    """Without a traceparent the frontend's server span is a root, and the mesh still shares one trace."""
    async with grpc.aio.insecure_channel(traced_mesh.frontend_grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        await stub.ModelInfer(_infer_request(traced_mesh.models[0]), timeout=30)
    name = "/inference.GRPCInferenceService/ModelInfer"
    deadline = time.monotonic() + 20
    while not (roots := [s for s in receiver.spans if s.name == name and not s.parent_span_id]):
        assert time.monotonic() < deadline, "no root server span arrived"
        time.sleep(0.1)
    spans = receiver.wait_for(roots[-1].trace_id, OURS)
    assert {s.service for s in spans} == {"dynamo-frontend", "dynamo-router", "dynamo-worker"}


# -- disaggregated: prefill -> KV transfer -> decode in the same trace ---------------------------------------

DISAGG = {"frontend.request", "prefill.route", "prefill.remote", "prefill", "kv_transfer", "kv_transfer.send", "decode"}


@pytest.fixture(scope="module")
def traced_disagg_mesh(receiver: OtlpReceiverProcess) -> Iterator[Mesh]:
    cfg = MeshConfig(
        workers=2,
        worker_roles=["prefill", "decode"],
        speedup_ratio=1000.0,
        frontend_args=["--max-local-prefill-tokens", "0"],  # every prompt is prefilled remotely
        ready_timeout_s=90.0,
    )
    with _traced(receiver, cfg) as m:
        yield m


def _ancestors(spans: list[ReceivedSpan], s: ReceivedSpan) -> list[ReceivedSpan]:
    by_id = {x.span_id: x for x in spans}
    out = []
    while s.parent_span_id in by_id:
        s = by_id[s.parent_span_id]
        out.append(s)
    return out


async def test_disaggregated_request_is_one_trace_prefill_transfer_decode(
    traced_disagg_mesh: Mesh, receiver: OtlpReceiverProcess
) -> None:
    header, trace_id, client_span = _traceparent()
    req = _infer_request(traced_disagg_mesh.models[0])
    text = b"why was this request slow? " * 12  # several KV blocks to move
    req.raw_input_contents[0] = struct.pack("<I", len(text)) + text
    async with grpc.aio.insecure_channel(traced_disagg_mesh.frontend_grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        resp = await stub.ModelInfer(req, metadata=(("traceparent", header),), timeout=30)
    assert resp.parameters["disaggregated"].bool_param  # it really went prefill worker -> decode worker
    spans = receiver.wait_for(trace_id, DISAGG)
    request = _one(spans, "frontend.request")
    assert all(s.trace_id == trace_id for s in spans)
    # the prefill worker's span hangs under the frontend's remote-prefill span
    prefill = _one(spans, "prefill")
    assert prefill.service == "dynamo-worker" and _one(spans, "prefill.remote") in _ancestors(spans, prefill)
    assert request in _ancestors(spans, prefill)
    # the decode worker pulls the KV: its kv_transfer span, then the prefill worker's send span under it
    transfer, send = _one(spans, "kv_transfer"), _one(spans, "kv_transfer.send")
    assert transfer in _ancestors(spans, send) and request in _ancestors(spans, transfer)
    assert transfer.attributes["dynamo.bytes"] > 0 and "dynamo.fallback" not in transfer.attributes
    decode = _one(spans, "decode")
    assert request in _ancestors(spans, decode)
    assert decode.attributes["dynamo.request_id"] == transfer.attributes["dynamo.request_id"]
    assert client_span in {s.parent_span_id for s in spans}  # the client's trace, continued
