"""`--router-mode kv-service` with two models: each request goes to the router registered for its model.

Real processes on loopback: consul-dev, two mocker workers serving different model names, one
`dynamo-router` per model (`--model`), and a frontend that finds the routers in Consul. A request for
either model must be routed by that model's router to that model's worker; with one model's router gone,
that model answers UNAVAILABLE while the other keeps serving.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from dynamo_grpc.discovery.agent import start_consul_dev
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.consul_http import passing_instances

pytestmark = pytest.mark.slow
MODELS = ("alpha", "beta")


class Procs:
    def __init__(self) -> None:
        self.log_dir = Path(tempfile.mkdtemp(prefix="fe-kv-service-"))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(self, name: str, *args: str) -> None:
        with open(self.log_dir / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "dynamo_grpc.cli", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def wait(self, what: str, ok: Callable[[], bool], timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None and name != "router-beta-stopped":
                    log = (self.log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                    raise AssertionError(f"{name} exited ({p.returncode}):\n{log}")
            if ok():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; logs in {self.log_dir}")

    def stop(self, name: str) -> None:
        p = self.procs.pop(name)
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


def _tagged(consul: str, service: str, model: str) -> list[dict]:
    return [e for e in passing_instances(consul, service) if f"model={model}" in e["Service"]["Tags"]]


@pytest.fixture(scope="module")
def mesh() -> Iterator[tuple[Procs, str, str]]:
    agent = start_consul_dev()
    procs = Procs()
    ready = procs.log_dir / "frontend.json"
    common = ["--consul", agent.address]
    try:
        for m in MODELS:
            procs.spawn(
                f"worker-{m}", "worker", *common, "--engine", "mocker", "--port", "0", "--model-name", m,
                "--speedup-ratio", "1000",
            )  # fmt: skip
            procs.spawn(f"router-{m}", "router", *common, "--mode", "kv", "--port", "0", "--model", m)
        procs.spawn(
            "frontend", "frontend", *common, "--router-mode", "kv-service", "--grpc-port", "0",
            "--ready-file", str(ready),
        )  # fmt: skip
        for m in MODELS:
            procs.wait(f"router for {m}", lambda m=m: bool(_tagged(agent.address, "dynamo-router", m)))
        procs.wait("frontend", ready.exists)
        address = json.loads(ready.read_text())["grpc_address"]

        def both_ready() -> bool:
            with grpc.insecure_channel(address) as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                try:
                    return all(stub.ModelReady(pb.ModelReadyRequest(name=m), timeout=2).ready for m in MODELS)
                except grpc.RpcError:
                    return False

        procs.wait("both models ready", both_ready)
        yield procs, agent.address, address
    finally:
        procs.stop_all()
        agent.stop()


def infer(address: str, model: str) -> pb.ModelInferResponse:
    req = pb.ModelInferRequest(model_name=model, id=model)
    for name, value in (("text_input", b"route me"), ("sampling_parameters", b'{"max_tokens": 3, "seed": 1}')):
        req.inputs.add(name=name, datatype="BYTES", shape=[1])
        req.raw_input_contents.append(struct.pack("<I", len(value)) + value)
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)


def router_metric(consul: str, model: str, name: str) -> float:
    """One sample of the router's /metrics (its address is in its Consul Meta)."""
    (router,) = _tagged(consul, "dynamo-router", model)
    url = f"http://{router['Service']['Meta']['metrics_address']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_each_model_is_routed_by_its_own_router(mesh: tuple[Procs, str, str]) -> None:
    procs, consul, address = mesh
    for _ in range(3):
        for m in MODELS:
            (worker,) = _tagged(consul, "dynamo-worker", m)
            resp = infer(address, m)
            assert resp.parameters["worker_id"].string_param == worker["Service"]["ID"]
            assert resp.parameters["completion_tokens"].int64_param == 3
    for m in MODELS:  # each router made its own model's decisions, and got FREE for each (nothing left active)
        assert router_metric(consul, m, "dynamo_router_decisions_total") == 3
        procs.wait(f"{m}'s router to free", lambda m=m: router_metric(consul, m, "dynamo_router_active_sequences") == 0)

    # beta's router goes away: beta has no router (UNAVAILABLE, named), alpha is unaffected
    procs.stop("router-beta")
    procs.wait("beta's router to leave Consul", lambda: not _tagged(consul, "dynamo-router", "beta"))
    time.sleep(0.5)  # the frontend's watch sees the change
    with pytest.raises(grpc.RpcError) as ei:
        infer(address, "beta")
    assert ei.value.code() == grpc.StatusCode.UNAVAILABLE and "beta" in (ei.value.details() or "")
    assert infer(address, "alpha").parameters["completion_tokens"].int64_param == 3
