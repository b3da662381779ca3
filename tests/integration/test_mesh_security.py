"""The whole mesh with every security layer on, as real processes: mTLS on gRPC, CURVE on ZeroMQ, Consul ACLs.

One module-scoped mesh (consul-dev with ACLs, a `dynamo-router`, two mocker workers, a frontend with the
embedded KV router), configured the way `run-local --tls --curve` does it: certificates and keys reach
the processes only through `DYN_TLS_*` / `DYN_ZMQ_CURVE_*` variables.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import zmq
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dynamo_grpc.events.curve import generate_keypair, load_keypair
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.consul_http import passing_instances, service_meta
from dynamo_grpc.launch.mesh import Mesh, MeshConfig
from dynamo_grpc.launch.security import MeshSecurity, local_security
from dynamo_grpc.transport.certs import CertPaths, Issued, issue, write_local_certs
from tests.helpers.token_requests import prompt, token_request

pytestmark = pytest.mark.slow

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def security(tmp_path_factory: pytest.TempPathFactory) -> MeshSecurity:
    return local_security(tmp_path_factory.mktemp("security"), tls=True, curve=True)


@pytest.fixture(scope="module")
def mesh(security: MeshSecurity) -> Iterator[Mesh]:
    cfg = MeshConfig(
        workers=2,
        speedup_ratio=20.0,
        router_mode="kv",
        start_router=True,
        http_port=0,
        security=security,
        ready_timeout_s=120.0,
    )
    with Mesh(cfg) as m:
        yield m


def metas(mesh: Mesh, service: str) -> list[dict[str, str]]:
    return [service_meta(e) for e in passing_instances(mesh.consul, service, token=mesh.consul_token)]


def internal_addresses(mesh: Mesh) -> list[str]:
    addrs = [m["grpc_address"] for m in metas(mesh, "dynamo-worker")] + [mesh.router_grpc]
    assert len(addrs) == 3 and all(addrs), addrs
    return addrs


def health(address: str, creds: grpc.ChannelCredentials | None) -> int:
    """grpc.health.v1 Check's status; raises grpc.RpcError when the handshake (or anything) fails."""
    ch = grpc.secure_channel(address, creds) if creds is not None else grpc.insecure_channel(address)
    with ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def creds(tls: CertPaths, client_cert: bool) -> grpc.ChannelCredentials:
    if client_cert:
        return grpc.ssl_channel_credentials(
            tls.ca.read_bytes(), tls.client_key.read_bytes(), tls.client_cert.read_bytes()
        )
    return grpc.ssl_channel_credentials(tls.ca.read_bytes())


def test_internal_ports_refuse_a_client_without_a_certificate(mesh: Mesh, security: MeshSecurity) -> None:
    assert security.tls is not None
    for addr in internal_addresses(mesh):
        with pytest.raises(grpc.RpcError) as err:
            health(addr, creds(security.tls, client_cert=False))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, addr
        with pytest.raises(grpc.RpcError):
            health(addr, None)  # plaintext
        assert health(addr, creds(security.tls, client_cert=True)) == SERVING, addr  # the CA's client: served


def test_a_wrong_ca_is_refused_on_every_port(
    mesh: Mesh, security: MeshSecurity, tmp_path: Path
) -> None:
    other = write_local_certs(tmp_path / "other")  # another CA, a client certificate it signed
    for addr in [*internal_addresses(mesh), mesh.frontend_grpc]:
        with pytest.raises(grpc.RpcError) as err:
            health(addr, creds(other, client_cert=True))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, addr
    # the OpenAI HTTPS listener too: our CA does not verify it
    ctx = ssl.create_default_context(cafile=str(other.ca))
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"https://{mesh.frontend_http}/health", context=ctx, timeout=5)


TRITON_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as g
url, ca, model = sys.argv[1:4]
c = g.InferenceServerClient(url, ssl=True, root_certificates=ca)
text = g.InferInput("text_input", [1], "BYTES")
text.set_data_from_numpy(np.array([b"What is the capital of France?"], dtype=object))
out = c.infer(model, [text], parameters={"max_tokens": 4})
names = [m.name for m in c.get_model_repository_index().models]
print(json.dumps({"ready": c.is_server_ready(), "models": names, "text": str(out.as_numpy("text_output")[0])}))
"""


def test_tritonclient_with_the_ca_and_no_certificate_is_served(mesh: Mesh, security: MeshSecurity) -> None:
    """tritonclient in its own process (its protos and ours cannot share one), with the CA and no certificate."""
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient[grpc] not installed")
    assert security.tls is not None
    run = subprocess.run(
        [sys.executable, "-c", TRITON_CLIENT, mesh.frontend_grpc, str(security.tls.ca), mesh.models[0]],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["ready"] and mesh.models[0] in got["models"] and got["text"]
    # and HTTPS with the CA alone
    ctx = ssl.create_default_context(cafile=str(security.tls.ca))
    with urllib.request.urlopen(f"https://{mesh.frontend_http}/v1/models", context=ctx, timeout=10) as r:
        assert mesh.models[0] in r.read().decode()


def test_every_process_advertises_its_metrics_and_serves_them_over_tls(mesh: Mesh, security: MeshSecurity) -> None:
    assert security.tls is not None
    ctx = ssl.create_default_context(cafile=str(security.tls.ca))  # scrapers bring the CA, no certificate
    for service in ("dynamo-worker", "dynamo-router", "dynamo-frontend"):
        found = metas(mesh, service)
        assert found and all(m.get("metrics_address") for m in found), (service, found)
        for m in found:
            with urllib.request.urlopen(f"https://{m['metrics_address']}/metrics", context=ctx, timeout=10) as r:
                assert r.status == 200 and b"# TYPE" in r.read(), (service, m["metrics_address"])
            with pytest.raises((urllib.error.URLError, ConnectionError)):  # not in plaintext
                urllib.request.urlopen(f"http://{m['metrics_address']}/metrics", timeout=5)


def test_unauthorised_subscriber_gets_no_events_while_the_router_routes_by_kv(
    mesh: Mesh, security: MeshSecurity, tmp_path: Path
) -> None:
    model = mesh.models[0]
    workers = metas(mesh, "dynamo-worker")
    ctx = zmq.Context()
    public, secret = load_keypair(str(generate_keypair(tmp_path / "intruder", "intruder")[1]))
    socks = []
    for w in workers:
        assert w.get("zmq_public_key"), w  # CURVE is on: publishers advertise their key
        intruder = ctx.socket(zmq.SUB)
        intruder.setsockopt(zmq.LINGER, 0)
        intruder.curve_publickey, intruder.curve_secretkey = public, secret
        intruder.curve_serverkey = w["zmq_public_key"].encode()
        intruder.setsockopt(zmq.SUBSCRIBE, b"")
        intruder.connect(w["zmq_endpoint"])
        plain = ctx.socket(zmq.SUB)
        plain.setsockopt(zmq.LINGER, 0)
        plain.setsockopt(zmq.SUBSCRIBE, b"")
        plain.connect(w["zmq_endpoint"])
        socks += [intruder, plain]

    async def route() -> None:
        assert security.tls is not None
        channel_creds = creds(security.tls, client_cert=False)
        async with grpc.aio.secure_channel(mesh.frontend_grpc, channel_creds) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            base = prompt(3, 640)
            first = await stub.ModelInfer(token_request(model, base), timeout=30)
            home = first.parameters["worker_id"].string_param
            assert home
            await asyncio.sleep(1.0)  # the worker's stored-blocks events reach the embedded router
            for k in range(4):
                resp = await stub.ModelInfer(token_request(model, [*base, 5, 6, 7 + k]), timeout=30)
                assert resp.parameters["worker_id"].string_param == home, k

    try:
        asyncio.run(route())
        poller = zmq.Poller()
        for s in socks:
            poller.register(s, zmq.POLLIN)
        assert poller.poll(1000) == []  # neither an unlisted key nor a plain subscriber got one event
    finally:
        for s in socks:
            s.close(0)
        ctx.term()


def test_consul_acls_are_on(mesh: Mesh) -> None:
    body = json.dumps({"Name": "intruder", "ID": "intruder-1", "Port": 1}).encode()
    req = urllib.request.Request(f"{mesh.consul}/v1/agent/service/register", data=body, method="PUT")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=5)
    assert err.value.code == 403


def _served_serial(address: str, ca: Path) -> int:
    host, port = address.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=host) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_sighup_swaps_the_certificate_while_a_stream_keeps_running(mesh: Mesh, security: MeshSecurity) -> None:
    tls = security.tls
    assert tls is not None
    model = mesh.models[0]
    before = _served_serial(mesh.frontend_grpc, tls.ca)
    max_tokens = 400

    async def go() -> tuple[int, int, int]:
        async with grpc.aio.secure_channel(mesh.frontend_grpc, creds(tls, client_cert=False)) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            call = stub.ModelStreamInfer(iter([token_request(model, prompt(9, 64), max_tokens)]), timeout=120)
            got = 0
            at_swap = -1
            async for msg in call:
                assert not msg.error_message, msg.error_message
                got += 1
                if got == 3:
                    # a new certificate from the same CA, then SIGHUP: new handshakes get it at once
                    ca = Issued(tls.ca.read_bytes(), tls.ca_key.read_bytes())
                    fresh = issue(ca, "dynamo-grpc", ("127.0.0.1", "localhost"))
                    fresh.write(tls.server_cert, tls.server_key)
                    os.kill(mesh.proc("frontend").pid, signal.SIGHUP)
                    await asyncio.sleep(0.5)
                    at_swap = got
            after = await asyncio.to_thread(_served_serial, mesh.frontend_grpc, tls.ca)
            return got, at_swap, after

    got, at_swap, after = asyncio.run(go())
    assert at_swap >= 3, "the stream ended before the swap"
    assert got > at_swap + 10, f"the stream stopped after {got} messages"  # kept streaming (no error, see above)
    assert after != before
    assert mesh.proc("frontend").poll() is None


def test_a_worker_configured_by_env_alone_serves_health_in_plaintext_beside_mtls(
    security: MeshSecurity, tmp_path: Path
) -> None:
    """`DYN_<FLAG>` for every flag, in a real process: no command-line flags at all."""
    tls = security.tls
    assert tls is not None
    ready = tmp_path / "ready.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        zmq_port = s.getsockname()[1]
    env = {
        **os.environ,
        **tls.env(),
        "DYN_ENGINE": "mocker",
        "DYN_NO_CONSUL": "true",
        "DYN_READY_FILE": str(ready),
        "DYN_HEALTH_PORT": "0",
        "DYN_METRICS_PORT": "-1",
        "DYN_SPEEDUP_RATIO": "50",
        "DYN_HOST": "0.0.0.0",  # bind every interface, advertise loopback
        "DYN_ADVERTISE_HOST": "127.0.0.1",
        "DYN_ZMQ_PORT": str(zmq_port),
    }
    p = subprocess.Popen([sys.executable, "-m", "dynamo_grpc.cli", "worker"], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert p.poll() is None, p.stderr.read().decode() if p.stderr else ""
            assert time.monotonic() < deadline, "worker not ready"
            time.sleep(0.1)
        info = json.loads(ready.read_text())
        assert info["metrics_address"] is None  # DYN_METRICS_PORT=-1 honoured
        assert info["zmq_endpoint"] == f"tcp://127.0.0.1:{zmq_port}"  # the fixed port, on the advertised host
        assert info["grpc_address"].startswith("127.0.0.1:")
        assert health(f"127.0.0.1:{info['health_port']}", None) == SERVING
        with pytest.raises(grpc.RpcError):
            health(info["grpc_address"], None)  # the main port is TLS only
        assert health(info["grpc_address"], creds(tls, client_cert=True)) == SERVING
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(15)
