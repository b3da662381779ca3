"""Frontend limits on real processes: hostile inputs, overload, API keys, HTTP body rules; nothing leaks.

One mocker mesh whose frontend runs with small limits, plus a second frontend (same Consul, same workers)
that requires an API key. After each hostile batch the embedded router's active sequences and the
frontend's in-flight gauge are back to zero (read from the frontend's /metrics).
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator

import aiohttp
import grpc
import pytest

from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.consul_http import passing_instances, service_meta
from dynamo_grpc.launch.mesh import Mesh, MeshConfig
from tests.conformance.test_bad_inputs import bytes_input, good

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
KEY = "s3cret-key"
LIMIT_ARGS = [
    "--max-inflight-requests", "2",
    "--max-queued-requests", "1",
    "--max-input-bytes", "65536",
    "--max-prompt-tokens", "512",
    "--max-message-bytes", str(1 << 20),
    "--http-body-timeout", "1",
    "--http-request-timeout", "1.5",
]  # fmt: skip


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    m = Mesh(
        MeshConfig(
            workers=2,
            speedup_ratio=50.0,
            http_port=0,
            frontend_args=LIMIT_ARGS,
            worker_args=["--metrics-port", "0"],
            ready_timeout_s=90.0,
        )
    ).start()
    try:
        yield m
    finally:
        m.stop()


@pytest.fixture(scope="module")
def keyed(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A second frontend over the same workers that requires `authorization: Bearer KEY`."""
    d = tmp_path_factory.mktemp("keyed")
    ready = d / "ready.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("CONSUL_HTTP_TOKEN_FILE", None)
    if "frontend" in mesh.role_tokens:
        env["CONSUL_HTTP_TOKEN"] = mesh.role_tokens["frontend"].secret_id
    args = ["frontend", "--consul", mesh.consul, "--grpc-port", "0", "--http-port", "0", "--api-key", KEY]
    with open(d / "frontend.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dynamo_grpc.cli", *args, "--ready-file", str(ready)],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, (d / "frontend.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "keyed frontend did not start"
            time.sleep(0.1)
        yield json.loads(ready.read_text())
    finally:
        proc.terminate()
        proc.wait(15)


def with_sampling_raw(raw: bytes) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL)
    bytes_input(req, "text_input", b"hello")
    bytes_input(req, "sampling_parameters", raw)
    return req


def huge_shape(shape: list[int]) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="text_input", datatype="BYTES", shape=shape)
    req.raw_input_contents.append(struct.pack("<I", 5) + b"hello")
    return req


def input_ids(values: list[int]) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="input_ids", datatype="UINT64", shape=[len(values)])
    req.raw_input_contents.append(b"".join(struct.pack("<Q", v) for v in values))
    return req


HOSTILE = {
    "shape_2^27": huge_shape([134217728]),
    "shape_2^40": huge_shape([2**40]),
    "shape_2^62x2^62": huge_shape([2**62, 2**62]),
    "top_k_2^31": good(top_k=2**31),
    "min_tokens_2^32": good(min_tokens=2**32, max_tokens=2**33),
    "stop_token_ids_2^32": good(stop_token_ids=[2**32]),
    "input_ids_2^63": input_ids([1, 2**63]),
    "nested_json": with_sampling_raw(b"[" * 50000 + b"]" * 50000),
    "5000_digits": with_sampling_raw(b'{"seed": ' + b"9" * 5000 + b"}"),
    "long_id": pb.ModelInferRequest(model_name=MODEL, id="x" * 1_000_000),
}


async def metrics(base: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(f"{base}/metrics") as r:
        text = await r.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = out.get(name, 0.0) + float(value)
    return out


def active_sequences(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if "active_sequences" in k)


async def settled(base: str) -> dict[str, float]:
    """/metrics once every route is freed and no request runs (frees are fire-and-forget: allow a moment)."""
    for _ in range(50):
        m = await metrics(base)
        if active_sequences(m) == 0 and m.get("dynamo_frontend_admitted_requests") == 0:
            return m
        await asyncio.sleep(0.1)
    raise AssertionError(f"leaked: active={active_sequences(m)}, admitted={m.get('dynamo_frontend_admitted_requests')}")


async def test_hostile_requests_are_invalid_argument_and_free_everything(mesh: Mesh) -> None:
    base = f"http://{mesh.frontend_http}"
    async with grpc.aio.insecure_channel(mesh.frontend_grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        for _ in range(5):  # 50 requests in all
            for name, req in HOSTILE.items():
                with pytest.raises(grpc.aio.AioRpcError) as ei:
                    await stub.ModelInfer(req, timeout=30)
                assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, ei.value.details())
        assert "'id'" in ei.value.details() and len(ei.value.details()) < 200  # the long id is named, not echoed
        resp = await stub.ModelInfer(good(), timeout=30)
        assert resp.id == "ok" and resp.outputs[0].name == "text_output"
    await settled(base)


async def test_prompt_limits(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.frontend_grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.ModelInfer(good("x" * 70000), timeout=30)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-input-bytes" in ei.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await stub.ModelInfer(good(" hello" * 600), timeout=30)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-prompt-tokens" in ei.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as ei:  # over --max-message-bytes: grpc refuses it
            await stub.ModelInfer(good("y" * (2 << 20)), timeout=30)
        assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await stub.ModelInfer(good(), timeout=30)).outputs


async def test_overload_is_resource_exhausted_and_429(mesh: Mesh) -> None:
    base = f"http://{mesh.frontend_http}"
    async with grpc.aio.insecure_channel(mesh.frontend_grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        calls = [stub.ModelInfer(good(max_tokens=400, ignore_eos=True), timeout=60) for _ in range(6)]
        results = await asyncio.gather(*calls, return_exceptions=True)
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    served = [r for r in results if isinstance(r, pb.ModelInferResponse)]
    assert len(served) >= 3 and len(served) + len(refused) == 6  # 2 running + 1 waiting always get through
    assert refused, "6 requests at once on 2 running + 1 waiting places: some must be refused"
    for e in refused:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-queued-requests" in e.details()
        assert ("dynamo-error", "overloaded") in tuple(e.trailing_metadata() or ())
    async with aiohttp.ClientSession() as s:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 400, "ignore_eos": True}
        posts = [s.post(f"{base}/v1/completions", json=body) for _ in range(6)]
        answers = await asyncio.gather(*posts)
        statuses = sorted(r.status for r in answers)
        for r in answers:
            if r.status == 429:
                assert r.headers["Retry-After"] == "1" and (await r.json())["error"]["code"] == "overloaded"
            r.release()
    assert statuses.count(200) >= 3 and set(statuses) <= {200, 429} and 429 in statuses
    m = await settled(base)
    assert m["dynamo_frontend_rejected_requests_total"] == len(refused) + statuses.count(429)


async def test_http_body_rules(mesh: Mesh) -> None:
    base = f"http://{mesh.frontend_http}"
    url = f"{base}/v1/completions"
    good_body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=good_body, headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415 and "application/json" in (await r.json())["error"]["message"]
        async with s.post(url, data=b"x" * (2 << 20), headers={"Content-Type": "application/json"}) as r:
            assert r.status == 413 and "--max-message-bytes" in (await r.json())["error"]["message"]

        async def chunked() -> object:
            for _ in range(40):
                yield b" " * 65536

        async with s.post(url, data=chunked(), headers={"Content-Type": "application/json"}) as r:
            assert r.status == 413  # no Content-Length: bounded while reading
        for bad in (b"[" * 100000, b'{"model": "m", "max_tokens": ' + b"9" * 5000 + b"}", b"\xff\xfe"):
            async with s.post(url, data=bad, headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400, bad[:20]
                assert (await r.json())["error"]["type"] == "invalid_request_error"
        async with s.post(url, data=good_body, headers={"Content-Type": "application/json"}) as r:
            assert r.status == 200
    # a body that never finishes is answered (408) and its connection closed after --http-body-timeout
    host, port = mesh.frontend_http.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{")  # fmt: skip
    await writer.drain()
    head = await asyncio.wait_for(reader.read(), timeout=20)  # read() returns at EOF: the server closed it
    assert head.startswith(b"HTTP/1.1 408")
    writer.close()
    await settled(base)


async def test_api_keys_guard_inference_not_health(keyed: dict[str, str]) -> None:
    async with grpc.aio.insecure_channel(keyed["grpc_address"]) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        for md in (None, (("authorization", "Bearer wrong"),), (("authorization", KEY),)):
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await stub.ModelInfer(good(), timeout=30, metadata=md)
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        call = stub.ModelStreamInfer()  # refused before any request is read
        assert await call.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = (("authorization", f"Bearer {KEY}"),)
        for _ in range(100):  # the keyed frontend sees the workers a moment after it starts
            try:
                resp = await stub.ModelInfer(good(), timeout=30, metadata=ok)
                break
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND and e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                await asyncio.sleep(0.2)
        assert resp.outputs[0].name == "text_output"
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # probes need no key
    base = f"http://{keyed['http_address']}"
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/v1/completions", json=body) as r:
            assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"
        async with s.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status == 200
        async with s.get(f"{base}/health") as r:
            assert r.status in (200, 503)
        async with s.get(f"{base}/metrics") as r:
            assert r.status == 200


async def generated_tokens(mesh: Mesh) -> float:
    """Tokens generated by all workers so far (their own /metrics)."""
    total = 0.0
    for e in passing_instances(mesh.consul, "dynamo-worker", token=mesh.consul_token):
        m = await metrics(f"http://{service_meta(e)['metrics_address']}")
        total += sum(v for k, v in m.items() if k.startswith("dynamo_worker_generated_tokens_total"))
    return total


async def test_http_client_that_leaves_stops_generation(mesh: Mesh) -> None:
    """A non-streamed request whose client disconnects stops generating (it does not run to max_tokens)."""
    base = f"http://{mesh.frontend_http}"
    before = await generated_tokens(mesh)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 6000, "ignore_eos": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.5)) as s:
        with pytest.raises(asyncio.TimeoutError):
            async with s.post(f"{base}/v1/completions", json=body) as r:
                await r.read()
    await settled(base)  # the route and the admission place were freed when the client left
    stopped = await generated_tokens(mesh)
    await asyncio.sleep(1.0)
    after = await generated_tokens(mesh)
    assert after == stopped, "the worker kept generating for a client that left"
    assert 0 < after - before < 6000


async def test_unread_stream_is_bounded_and_others_are_served(keyed: dict[str, str]) -> None:
    """2,000 requests on one ModelStreamInfer stream that is never read: at most --max-stream-requests (64)
    run at once (the rest wait unread), another client is still served, and cancelling frees everything."""
    ok = (("authorization", f"Bearer {KEY}"),)
    base = f"http://{keyed['http_address']}"
    async with (
        grpc.aio.insecure_channel(keyed["grpc_address"]) as ch,
        grpc.aio.insecure_channel(keyed["grpc_address"]) as other,
    ):
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        call = stub.ModelStreamInfer(metadata=ok)

        async def flood() -> None:
            for i in range(2000):
                r = good(max_tokens=2000, ignore_eos=True)
                r.id = str(i)
                await call.write(r)

        writer = asyncio.create_task(flood())
        peak = 0.0
        for _ in range(20):
            await asyncio.sleep(0.1)
            m = await metrics(base)
            peak = max(
                peak, m.get("dynamo_frontend_admitted_requests", 0) + m.get("dynamo_frontend_queued_requests", 0)
            )
        assert 0 < peak <= 64
        resp = await pb_grpc.GRPCInferenceServiceStub(other).ModelInfer(good(), timeout=30, metadata=ok)
        assert resp.outputs[0].name == "text_output"
        call.cancel()
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    await settled(base)


async def test_big_prompt_does_not_stall_small_requests(mesh: Mesh) -> None:
    """While big-but-allowed prompts are tokenised, small requests complete; the big ones get their answer."""
    async with grpc.aio.insecure_channel(mesh.frontend_grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        big = [asyncio.ensure_future(stub.ModelInfer(good("word " * 13000), timeout=60)) for _ in range(2)]
        small = await stub.ModelInfer(good(), timeout=60)
        assert small.outputs[0].name == "text_output"
        for b in big:  # 65,000 bytes < --max-input-bytes, but over the context once tokenised
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await b
            assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "13001 tokens" in ei.value.details()
    await settled(f"http://{mesh.frontend_http}")


async def test_http_request_timeout(mesh: Mesh) -> None:
    """--http-request-timeout bounds a generation: 504 deadline_exceeded, and the worker stops."""
    base = f"http://{mesh.frontend_http}"
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 8000, "ignore_eos": True}
    async with aiohttp.ClientSession() as s, s.post(f"{base}/v1/completions", json=body) as r:
        assert r.status == 504 and (await r.json())["error"]["code"] == "deadline_exceeded"
    await settled(base)
