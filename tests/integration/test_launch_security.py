"""`dynamo-grpc run-local --tls --curve` as a user runs it: the mesh comes up secured, the printed grpcurl line
names the generated CA, a client holding that CA is served, a plaintext client is not, and Ctrl-C stops it."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.slow


def test_run_local_tls_and_curve_prints_a_working_cacert_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_", "CONSUL_HTTP"))}
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [
        sys.executable, "-m", "dynamo_grpc.cli", "run-local", "--engine", "mocker", "--workers", "1",
        "--grpc-port", "0", "--http-port", "0", "--tls", "--curve", "--log-dir", str(tmp_path / "logs"),
        "--ready-timeout", "90",
    ]
    out = tmp_path / "out.txt"
    with open(out, "wb") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ctrl-C stops everything" not in out.read_text():
            assert p.poll() is None, out.read_text()[-3000:]
            assert time.monotonic() < deadline, out.read_text()[-3000:]
            time.sleep(0.2)
        text = out.read_text()
        assert "security: TLS" in text and "CURVE" in text
        line = next(ln for ln in text.splitlines() if ln.strip().startswith("grpcurl -cacert") and ln.endswith("list"))
        _grpcurl, _flag, ca, address, _list = shlex.split(line)
        assert re.search(r"https://\S+/v1/chat/completions", text) and "--cacert" in text
        assert "root_certificates=" in text  # the tritonclient line
        creds = grpc.ssl_channel_credentials(Path(ca).read_bytes())
        with grpc.secure_channel(address, creds) as ch:  # the CA alone: the public port serves it
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 0, out.read_text()[-3000:]
    assert "stopped." in out.read_text()
