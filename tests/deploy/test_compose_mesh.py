"""The compose topology's process graph, run without containers: the same commands and environment as
deploy/docker-compose.yml, consul-dev (with the compose ACL token, deny by default) in place of the Consul
image, every address moved to 127.0.0.1 and every port to a free one. One KServe request goes through it, the
compose healthchecks pass, and every metric the Grafana dashboard plots is served. Proof that the wiring in
deploy/ is the wiring that works."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from dynamo_grpc.discovery.agent import start_consul_dev
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from tests.deploy.layout import DEPLOY, compose

pytestmark = pytest.mark.slow

PORT_FLAGS = ("--port", "--grpc-port", "--http-port", "--metrics-port", "--zmq-port", "--health-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Translation:
    """Maps the compose network onto loopback: service IPs -> 127.0.0.1, (service, port) -> a free port,
    /run/secrets/<name> -> the compose secret's file."""

    def __init__(self, doc: dict[str, Any], consul_port: int) -> None:
        self.ports: dict[tuple[str, int], int] = {("consul", 8500): consul_port}
        self.service_at: dict[str, str] = {}  # compose network address -> service
        self.secrets = {f"/run/secrets/{k}": str(DEPLOY / v["file"]) for k, v in doc["secrets"].items()}
        for name, svc in doc["services"].items():
            networks = svc.get("networks")
            if isinstance(networks, dict) and networks.get("mesh"):
                self.service_at[networks["mesh"]["ipv4_address"]] = name
            cmd = svc.get("command") or []
            for f in PORT_FLAGS:
                if f in cmd:
                    self.ports[(name, int(cmd[cmd.index(f) + 1]))] = free_port()

    def value(self, text: str) -> str:
        """``service:port`` and ``ip:port`` -> 127.0.0.1:<free port>; a bare service ip -> 127.0.0.1."""
        text = self.secrets.get(text, text)

        def hostport(m: re.Match[str]) -> str:
            key = (self.service_at.get(m.group(1), m.group(1)), int(m.group(2)))
            return f"127.0.0.1:{self.ports[key]}" if key in self.ports else m.group(0)

        text = re.sub(r"\b([a-z][\w-]*|\d+\.\d+\.\d+\.\d+):(\d+)\b", hostport, text)
        for ip in self.service_at:
            text = re.sub(rf"\b{re.escape(ip)}\b", "127.0.0.1", text)
        return text

    def command(self, cmd: list[str], service: str) -> list[str]:
        out = [self.value(a) for a in cmd]
        for f in PORT_FLAGS:
            if f in out:
                i = out.index(f) + 1
                out[i] = str(self.ports[(service, int(cmd[i]))])
        return out


def wait_healthy(test: list[str], proc: subprocess.Popen[bytes], name: str, log: Path, timeout: float = 120) -> None:
    assert test[0] == "CMD" and test[1] == "python"
    script = str(DEPLOY / "healthcheck.py")  # the image copies it to /opt/dynamo-grpc/healthcheck.py
    assert test[2] == "/opt/dynamo-grpc/healthcheck.py"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if subprocess.run([sys.executable, script, *test[3:]], capture_output=True).returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"{name} never became healthy:\n{log.read_text()[-3000:]}")


def spawn(name: str, svc: dict[str, Any], tr: Translation, logs: Path) -> subprocess.Popen[bytes]:
    """The service's command under the image's entrypoint (``dynamo-grpc``), with its compose environment."""
    env = {**os.environ, **{k: tr.value(str(v)) for k, v in svc["environment"].items()}}
    env.pop("CONSUL_HTTP_TOKEN", None)  # only the compose secret file may carry the token
    with open(logs / f"{name}.log", "wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "dynamo_grpc.cli", *tr.command(svc["command"], name)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )


def stop(procs: list[subprocess.Popen[bytes]]) -> list[int]:
    """SIGTERM in reverse start order (as compose down does), SIGKILL after 30 s; the exit codes."""
    for p in reversed(procs):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return [p.returncode for p in procs]


@pytest.fixture
def compose_mesh(tmp_path: Path) -> Iterator[tuple[Translation, dict[str, Any]]]:
    doc = compose()
    token = json.loads((DEPLOY / "consul" / "acl.json").read_text())["acl"]["tokens"]["initial_management"]
    agent = start_consul_dev(0, acl_token=token)
    tr = Translation(doc, agent.port)
    procs: list[subprocess.Popen[bytes]] = []
    started = {  # the dynamo-grpc services compose starts by default (the torch profile is opt-in)
        n: s for n, s in doc["services"].items() if s["image"].startswith("dynamo-grpc:") and "profiles" not in s
    }
    try:
        # compose's depends_on: the frontend waits for a healthy router; the rest only for Consul
        for wave in ([n for n in started if n != "frontend"], ["frontend"]):
            for name in wave:
                procs.append(spawn(name, started[name], tr, tmp_path))
            for name, proc in zip(wave, procs[-len(wave) :], strict=True):
                test = [tr.value(a) for a in started[name]["healthcheck"]["test"]]
                wait_healthy(test, proc, name, tmp_path / f"{name}.log")
        yield tr, started
        codes = {name: code for name, code in zip(started, stop(procs), strict=True)}
        assert codes == dict.fromkeys(started, 0), f"SIGTERM is a clean, drained exit for every role: {codes}"
    finally:
        stop(procs)
        agent.stop()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body: bytes = r.read()
        return body.decode()


def test_one_kserve_request_through_the_compose_wiring(compose_mesh: tuple[Translation, dict[str, Any]]) -> None:
    tr, started = compose_mesh
    fe = started["frontend"]["command"]
    grpc_port = tr.ports[("frontend", int(fe[fe.index("--grpc-port") + 1]))]
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        deadline = time.monotonic() + 60
        models: list[str] = []
        while not models and time.monotonic() < deadline:
            models = [
                m.name
                for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5).models
                if m.name != "simple"
            ]
            time.sleep(0.2)
        assert models, "the frontend never saw a worker's model through Consul"
        req = pb.ModelInferRequest(model_name=models[0])
        text = b"Hello from deploy/"
        req.inputs.add(name="text_input", datatype="BYTES", shape=[1])
        req.raw_input_contents.append(len(text).to_bytes(4, "little") + text)
        req.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
        req.raw_input_contents.append((5).to_bytes(4, "little"))
        resp = stub.ModelInfer(req, timeout=60)
    outputs = {o.name: raw for o, raw in zip(resp.outputs, resp.raw_output_contents, strict=True)}
    assert int.from_bytes(outputs["num_output_tokens"][:4], "little") == 5
    assert len(outputs["text_output"]) > 4

    rt = started["router"]["command"]
    router_metrics = scrape(tr.ports[("router", int(rt[rt.index("--metrics-port") + 1]))])
    decisions = [float(v) for v in re.findall(r"^dynamo_router_decisions_total\{[^}]*\} (\S+)$", router_metrics, re.M)]
    assert sum(decisions) >= 1, "the frontend did not route through the router service (kv-service)"

    served = ""
    for name, svc in started.items():
        cmd = svc["command"]
        served += scrape(tr.ports[(name, int(cmd[cmd.index("--metrics-port") + 1]))])
    names = set(re.findall(r"^(\w+)(?:\{| )", served, re.M))
    dashboard = json.loads((DEPLOY / "grafana/dashboards/dynamo-grpc-overview.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            for metric in re.findall(r"\bdynamo_\w+", target["expr"]):
                assert metric in names, f"panel {panel['title']!r}: {metric} is not served by any process"
