"""Frontend replicas with router replica sync, real processes on loopback (frontend/replicas.py).

Two frontends with `--router-replica-sync` in front of two mocker workers: requests through both, and
each embedded router counts the other's in-flight requests (active load agrees); SIGKILL one, and its
load expires on the survivor. Then `--replicas 2`: two processes serve one port, registered apart,
and neither a second replica group nor a plain frontend can take that port.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import pytest

from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.consul_http import passing_instances, service_meta
from dynamo_grpc.launch.mesh import Mesh, MeshConfig
from dynamo_grpc.transport.addresses import METRICS_META
from tests.helpers.token_requests import prompt, token_request

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    # speedup 1: a 2,000-token request stays in flight for many seconds (the tests cancel them)
    cfg = MeshConfig(workers=2, speedup_ratio=1.0, frontend_args=["--router-replica-sync", "--metrics-port", "0"],
                     ready_timeout_s=90.0)
    with Mesh(cfg) as m:
        yield m


def _frontends(mesh: Mesh) -> list[dict[str, str]]:
    return [service_meta(e) for e in passing_instances(mesh.consul, "dynamo-frontend", token=mesh.consul_token)]


def _wait(
    what: str, pred: Callable[[], bool], timeout: float = 60.0, state: Callable[[], object] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}" + (f": {state()}" if state else ""))


def _metric(address: str, name: str) -> float:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    m = re.search(rf"^{name}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _spawn_frontend(mesh: Mesh, name: str, *extra: str) -> subprocess.Popen[bytes]:
    args = ["frontend", "--consul", mesh.consul, "--namespace", mesh.config.namespace, "--router-mode", "kv", *extra]
    return mesh._spawn(name, args, "frontend").popen


async def _flood(address: str, model: str, n: int, seed: int) -> list[asyncio.Task[object]]:
    """n long requests in flight through ``address`` (each task closes its channel when cancelled)."""

    async def one(i: int) -> object:
        async with grpc.aio.insecure_channel(address) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            return await stub.ModelInfer(token_request(model, prompt(seed + i, 128), max_tokens=2000), timeout=120)

    return [asyncio.create_task(one(i)) for i in range(n)]


def test_replica_sync_shares_active_load_and_expires_a_dead_replica(mesh: Mesh) -> None:
    first = _frontends(mesh)[0]
    second = _spawn_frontend(mesh, "frontend-2", "--grpc-port", "0", "--router-replica-sync", "--metrics-port", "0")
    _wait("two frontends", lambda: len(_frontends(mesh)) == 2)
    other = next(f for f in _frontends(mesh) if f["grpc_address"] != first["grpc_address"])
    m1, m2 = first[METRICS_META], other[METRICS_META]
    model = mesh.models[0]
    # each follows the other (a snapshot every second is the sign of life)
    _wait("replicas to hear each other", lambda: _metric(m1, "dynamo_router_replicas") == 1
          and _metric(m2, "dynamo_router_replicas") == 1)

    async def go() -> None:
        tasks = await _flood(first["grpc_address"], model, 3, 0) + await _flood(other["grpc_address"], model, 2, 100)

        def agree() -> bool:
            return (_metric(m1, "dynamo_router_active_sequences") == 5 == _metric(m2, "dynamo_router_active_sequences")
                    and _metric(m1, "dynamo_router_remote_sequences") == 2
                    and _metric(m2, "dynamo_router_remote_sequences") == 3)

        await asyncio.to_thread(_wait, "both routers to count all 5 requests", agree, 30)
        second.send_signal(signal.SIGKILL)  # its 2 requests are never freed by it
        second.wait()

        def expired() -> bool:
            return (_metric(m1, "dynamo_router_active_sequences") == 3
                    and _metric(m1, "dynamo_router_replica_expired_sequences_total") == 2
                    and _metric(m1, "dynamo_router_remote_sequences") == 0)

        names = ("active_sequences", "remote_sequences", "replica_expired_sequences_total", "replicas")
        await asyncio.to_thread(
            _wait, "the dead replica's load to expire", expired, 30,
            lambda: {n: _metric(m1, f"dynamo_router_{n}") for n in names},
        )
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # cancelled requests are freed, and the survivor says so
        await asyncio.to_thread(
            _wait, "cancelled requests freed", lambda: _metric(m1, "dynamo_router_active_sequences") == 0, 30
        )

    asyncio.run(go())


def test_replicas_share_one_port_and_refuse_strangers(mesh: Mesh, tmp_path: object) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    before = {f["grpc_address"] for f in _frontends(mesh)}
    sup = _spawn_frontend(mesh, "frontend-replicas", "--grpc-port", str(port), "--replicas", "2",
                          "--metrics-port", "0")
    try:
        def two_replicas() -> bool:
            return sum(1 for f in _frontends(mesh) if f["grpc_address"] == f"127.0.0.1:{port}") == 2

        _wait("two replicas registered on one port", two_replicas, 90)
        replicas = [f for f in _frontends(mesh) if f["grpc_address"] == f"127.0.0.1:{port}"]
        assert len({f[METRICS_META] for f in replicas}) == 2  # /metrics per replica
        assert all(f.get("zmq_endpoint") for f in replicas)  # replica sync on
        assert f"127.0.0.1:{port}" not in before

        async def serve() -> None:  # several connections: the kernel spreads them over the replicas
            for i in range(6):
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                    resp = await pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(
                        token_request(mesh.models[0], prompt(500 + i, 64), max_tokens=2), timeout=60
                    )
                    assert resp.parameters["worker_id"].string_param

        asyncio.run(serve())
        base = [sys.executable, "-m", "dynamo_grpc.cli", "frontend", "--consul", mesh.consul,
                "--grpc-port", str(port)]
        group = subprocess.run([*base, "--replicas", "2"], capture_output=True, text=True, timeout=60)
        assert group.returncode != 0
        assert "served by another frontend replica group" in group.stderr
        plain = subprocess.run(base, capture_output=True, text=True, timeout=60)
        assert plain.returncode != 0
        assert f"port {port} is in use" in plain.stderr
        # a process that pretends to be a replica of a group that is not the holder's is refused too
        fake = subprocess.run([*base, "--replica-group", "deadbeef0000"], capture_output=True, text=True, timeout=60)
        assert fake.returncode != 0 and "not deadbeef0000" in fake.stderr
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(30)
    _wait("replicas deregistered", lambda: not any(
        f["grpc_address"] == f"127.0.0.1:{port}" for f in _frontends(mesh)), 30)
