"""The control plane is closed and a bad registration cannot hurt the others (real consul-dev with ACLs,
real mocker workers and frontend): an anonymous rogue `dynamo-worker` is refused (403); rogues that
get in anyway (registered with the management token) with an unreachable event endpoint or an absurd
``dp_size`` are skipped, the KV router stays ready and every request goes to a real worker; a card replaced
by a plain PUT takes its worker out of both the registry and the embedded KV router."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.consul_http import passing_instances, service_meta
from dynamo_grpc.launch.mesh import Mesh, MeshConfig

pytestmark = pytest.mark.slow


class Trap:
    """A TCP listener standing in for a rogue's gRPC/ZMQ endpoint: it counts every connection."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()


def _put(consul: str, path: str, body: object, token: str | None) -> int:
    base = consul if "://" in consul else f"http://{consul}"
    req = urllib.request.Request(f"{base}{path}", data=json.dumps(body).encode(), method="PUT")
    if token:
        req.add_header("X-Consul-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _rogue(iid: str, model: str, grpc_address: str, zmq: str, block_size: str, **meta: str) -> dict[str, object]:
    host, port = grpc_address.rsplit(":", 1)
    return {
        "Name": "dynamo-worker",
        "ID": iid,
        "Address": host,
        "Port": int(port),
        "Tags": ["namespace=dynamo", f"model={model}", "role=both"],
        "Meta": {"grpc_address": grpc_address, "zmq_endpoint": f"tcp://{zmq}", "model": model,
                 "block_size": block_size, "kv_blocks": "1024", "dp_size": "1", **meta},
        "Check": {"TTL": "3600s", "Status": "passing"},
    }  # fmt: skip


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    metrics = ["--metrics-port", "0"]
    cfg = MeshConfig(workers=2, speedup_ratio=1000.0, router_mode="kv", http_port=0, worker_args=metrics)
    with Mesh(cfg) as m:
        yield m


def _infer(stub: pb_grpc.GRPCInferenceServiceStub, model: str, i: int) -> None:
    req = pb.ModelInferRequest(model_name=model, id=f"cp-{i}")
    for name, value in (("text_input", f"probe {i}".encode()), ("sampling_parameters", b'{"max_tokens": 4}')):
        req.inputs.add(name=name, datatype="BYTES", shape=[1])
        req.raw_input_contents.append(struct.pack("<I", len(value)) + value)
    assert stub.ModelInfer(req, timeout=30).outputs


def test_anonymous_rogue_worker_is_refused(mesh: Mesh) -> None:
    trap = Trap()
    body = _rogue("rogue-anon", mesh.models[0], trap.address, trap.address, "16")
    assert _put(mesh.consul, "/v1/agent/service/register", body, None) == 403
    assert _put(mesh.consul, f"/v1/kv/dynamo/models/{mesh.models[0]}/rogue-anon", {"forged": True}, None) == 403
    with grpc.insecure_channel(mesh.frontend_grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        for i in range(12):
            _infer(stub, mesh.models[0], i)
    assert trap.accepted == 0


def test_rogues_with_dead_events_or_huge_dp_size_never_get_a_request(mesh: Mesh) -> None:
    model = mesh.models[0]
    huge = Trap()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    unreachable = f"127.0.0.1:{closed.getsockname()[1]}"
    closed.close()  # nothing listens here: its Replay can never succeed
    token = mesh.consul_token
    bs = service_meta(passing_instances(mesh.consul, "dynamo-worker", token=token)[0])["block_size"]
    rogue_dead = _rogue("rogue-dead", model, unreachable, unreachable, bs)
    assert _put(mesh.consul, "/v1/agent/service/register", rogue_dead, token) == 200
    rogue_huge = _rogue("rogue-huge", model, huge.address, huge.address, bs, dp_size="2000000")
    assert _put(mesh.consul, "/v1/agent/service/register", rogue_huge, token) == 200
    try:
        with grpc.insecure_channel(mesh.frontend_grpc) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            # across the rogue's grace period (3 s) and after it: the router stays ready, real workers answer
            for i in range(24):
                _infer(stub, model, i)
                time.sleep(0.25)
            assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
        assert huge.accepted == 0
        with urllib.request.urlopen(f"http://{mesh.frontend_http}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        live = [ln for ln in text.splitlines() if ln.startswith("dynamo_frontend_live_workers{")]
        assert live and live[0].endswith(" 2.0"), live
        # skipped, counted and exported: the huge one for its registration, the dead one for its events
        assert 'dynamo_discovery_skipped_workers{source="registration"} 1.0' in text
        assert 'dynamo_discovery_skipped_workers{source="events"} 1.0' in text
    finally:
        for iid in ("rogue-dead", "rogue-huge"):
            _put(mesh.consul, f"/v1/agent/service/deregister/{iid}", {}, token)


def _metrics(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        return str(resp.read().decode())


def _served(metrics_address: str) -> float:
    lines = _metrics(metrics_address).splitlines()
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if ln.startswith("dynamo_worker_requests_total{"))


def test_a_worker_whose_card_was_replaced_gets_no_request(mesh: Mesh) -> None:
    """Last in the module: the victim's card stays forged."""
    model, token = mesh.models[0], mesh.consul_token
    workers = sorted((service_meta(e) for e in passing_instances(mesh.consul, "dynamo-worker", token=token)),
                     key=lambda m: m["grpc_address"])  # fmt: skip
    victim, other = workers
    victim_id = next(e["Service"]["ID"] for e in passing_instances(mesh.consul, "dynamo-worker", token=token)
                     if service_meta(e)["grpc_address"] == victim["grpc_address"])  # fmt: skip
    # a plain PUT over the locked card (Consul's locks are advisory): same shape, no valid checksum
    forged = {"name": model, "block_size": 16}
    assert _put(mesh.consul, f"/v1/kv/dynamo/models/{model}/{victim_id}", forged, token) == 200
    deadline = time.monotonic() + 15
    while 'dynamo_discovery_skipped_workers{source="card"} 1.0' not in _metrics(mesh.frontend_http):
        assert time.monotonic() < deadline, "the frontend did not notice the replaced card"
        time.sleep(0.2)
    before = _served(victim["metrics_address"]), _served(other["metrics_address"])
    with grpc.insecure_channel(mesh.frontend_grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        for i in range(12):
            _infer(stub, model, 100 + i)
    assert _served(victim["metrics_address"]) == before[0]
    assert _served(other["metrics_address"]) >= before[1] + 12
