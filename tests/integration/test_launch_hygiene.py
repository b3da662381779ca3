"""Launchers with real processes: a mocker mesh with ACLs on answers a request; a SIGKILLed run-local
leaves no child alive; a port in use is one clear line naming the port and its flag."""

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

import pytest

from dynamo_grpc.launch.consul_http import passing_instances
from dynamo_grpc.launch.mesh import Mesh, MeshConfig, MeshError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port some other program is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = {int(k) for k in (task / "children").read_text().split()}
            except OSError:
                continue
            todo.extend(kids - out)
            out |= kids
    return out


def test_acl_mesh_answers_a_request_with_one_token_per_role() -> None:
    cfg = MeshConfig(workers=1, speedup_ratio=1000.0, http_port=0, ready_timeout_s=90.0)
    with Mesh(cfg) as mesh:
        assert set(mesh.role_tokens) == {"worker", "router", "frontend"} and mesh.consul_token
        body = {"model": mesh.models[0], "prompt": "Once upon a time", "max_tokens": 4}
        req = urllib.request.Request(
            f"http://{mesh.frontend_http}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            answer = json.loads(resp.read())
        assert answer["usage"]["completion_tokens"] == 4
        # the agent really is deny-by-default: without a token the mesh is invisible
        with urllib.request.urlopen(f"{mesh.consul}/v1/health/service/dynamo-worker", timeout=5) as resp:
            assert json.loads(resp.read()) == []
        assert len(passing_instances(mesh.consul, "dynamo-worker", token=mesh.consul_token)) == 1
        env = Path(f"/proc/{mesh.proc('worker-0').pid}/environ").read_bytes().split(b"\0")
        assert f"CONSUL_HTTP_TOKEN={mesh.role_tokens['worker'].secret_id}".encode() in env


def test_sigkill_of_run_local_takes_every_child_with_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUL_HTTP_")}
    env["PYTHONUNBUFFERED"] = "1"
    argv = [sys.executable, "-m", "dynamo_grpc.cli", "run-local", "--engine", "mocker", "--workers", "1"]
    argv += ["--grpc-port", "0", "--http-port", "-1", "--metrics-port", "0"]
    argv += ["--log-dir", str(tmp_path), "--ready-timeout", "90"]
    launcher = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children: set[int] = set()
    try:
        assert launcher.stdout is not None
        seen = []
        for line in launcher.stdout:
            seen.append(line)
            if line.startswith("Ctrl-C stops everything"):
                break
        else:
            pytest.fail("run-local never came up:\n" + "".join(seen))
        # the frontend's /metrics (Triton's port 8002 by default; any free port here) carries Triton's names
        metrics_url = re.search(r"metrics +: (http://\S+/metrics)", "".join(seen))
        assert metrics_url, "".join(seen)
        with urllib.request.urlopen(metrics_url.group(1), timeout=10) as resp:
            exposition = resp.read().decode()
        assert "# TYPE nv_inference_request_success counter" in exposition
        assert "dynamo_frontend_time_to_first_token_seconds" in exposition
        children = _descendants(launcher.pid)
        assert len(children) >= 3, children  # consul-dev, a worker, the frontend
        assert "ACLs: on (default deny)" in "".join(seen)
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(p) for p in children):
            time.sleep(0.1)
        assert [p for p in children if _alive(p)] == []
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        for pid in children | _descendants(launcher.pid):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)  # never leave a failed run's processes behind


def test_port_in_use_is_one_clear_line(held_port: int) -> None:
    expected = f"port {held_port} is in use (change it with --grpc-port)"
    fe = subprocess.run(
        [sys.executable, "-m", "dynamo_grpc.cli", "frontend", "--grpc-port", str(held_port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert fe.returncode == 1 and fe.stderr.strip() == expected
    worker = subprocess.run(
        [sys.executable, "-m", "dynamo_grpc.cli", "worker", "--engine", "mocker", "--port", str(held_port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert worker.returncode == 1
    assert worker.stderr.strip().splitlines()[-1] == f"port {held_port} is in use (change it with --port)"
    run_local = subprocess.run(
        [sys.executable, "-m", "dynamo_grpc.cli", "run-local", "--engine", "mocker", "--grpc-port", str(held_port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run_local.returncode == 1 and run_local.stderr.strip() == f"run-local: {expected}"
    assert run_local.stdout == ""  # refused before starting anything


def test_mesh_reports_the_childs_own_line(held_port: int) -> None:
    cfg = MeshConfig(workers=1, speedup_ratio=1000.0, grpc_port=held_port, ready_timeout_s=60.0)
    with pytest.raises(MeshError) as err:
        Mesh(cfg).start()
    first = str(err.value).splitlines()[0]
    assert first.startswith(f"frontend exited with code 1: port {held_port} is in use (change it with --grpc-port)")
