"""A real mesh for conformance tests: consul-dev, 2 mocker workers, frontend (KV router inside), all subprocesses.

Uses the lead's launcher (`dynamo_grpc.launch.mesh`) on ephemeral ports. Third-party clients run in their
own subprocesses (`run_client`): tritonclient and our generated `inference` stubs cannot share a process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dynamo_grpc.launch.mesh import Mesh, MeshConfig

CLIENTS = Path(__file__).parent / "clients"
ROOT = Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct"


def start_mesh(**overrides: Any) -> Mesh:
    cfg = MeshConfig(
        workers=2,
        engine="mocker",
        router_mode="kv",
        speedup_ratio=1000.0,
        frontend_args=["--with-simple-model"],
        ready_timeout_s=90.0,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    mesh = Mesh(cfg).start()
    # with --with-simple-model the frontend reports ready before the LLM is served (the worker's card can land
    # in KV seconds later): a test's first request must not get "unknown model" (a stream test then waits forever)
    mesh._wait(f"{MODEL} served", lambda: mesh._frontend_ready() and MODEL in mesh.models)
    return mesh


@pytest.fixture(scope="session")
def mesh() -> Iterator[Mesh]:
    m = start_mesh()
    try:
        yield m
    finally:
        m.stop()


def run_client(script: str, *args: str, python: str | None = None, timeout: float = 120.0) -> dict[str, Any]:
    """Run tests/conformance/clients/<script> in a fresh interpreter; it prints one JSON object last."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no `inference` stubs in the client
    proc = subprocess.run(
        [python or sys.executable, str(CLIENTS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(ROOT),
    )
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if not lines:
        raise AssertionError(f"{script} printed nothing; stderr:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result
