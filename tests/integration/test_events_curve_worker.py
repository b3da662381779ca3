"""`dynamo-grpc worker` with CURVE flags: its key is in Consul Meta, only allowed subscribers hear it.

Also: bad key flags stop the worker, router and frontend at start-up with a message naming the flag.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from dynamo_grpc.discovery import ConsulSettings, Discovery
from dynamo_grpc.events.curve import ENV_SECRET_KEY, ZMQ_PUBLIC_KEY_META, CurveConfig, generate_keypair
from dynamo_grpc.events.sockets import connect_sub, open_sub
from dynamo_grpc.v1 import events_pb2
from tests.helpers.consul_dev import consul_dev, consul_dev_process  # noqa: F401
from tests.integration.test_worker_serving import WorkerProcess

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'gen'}:{ROOT}"}


def _heard(sock: zmq.Socket, timeout_s: float) -> events_pb2.LoadMetrics | None:  # type: ignore[type-arg]
    """The first load message ``sock`` receives within the timeout (workers publish load every 100 ms)."""
    if sock.poll(int(timeout_s * 1000)):
        _topic, _seq, payload = sock.recv_multipart()
        return events_pb2.LoadMetrics.FromString(payload)
    return None


@pytest.mark.slow
async def test_worker_with_curve_flags(consul_dev: str, tmp_path: Path) -> None:  # noqa: F811
    _, worker_secret = generate_keypair(tmp_path / "keys", "worker")
    _, router_secret = generate_keypair(tmp_path / "allowed", "router")
    _, stranger_secret = generate_keypair(tmp_path / "keys", "stranger")
    w = WorkerProcess(
        consul_dev,
        tmp_path,
        "--zmq-curve-secret-key",
        str(worker_secret),
        "--zmq-curve-allow",
        str(tmp_path / "allowed"),
        "--speedup-ratio",
        "100",
    )
    ctx = zmq.Context.instance()
    socks: list[zmq.Socket] = []  # type: ignore[type-arg]
    try:
        info = w.wait_ready()
        d = Discovery(ConsulSettings.from_addr(consul_dev))
        try:
            snapshot = await asyncio.wait_for(anext(aiter(d.watch("dynamo-worker"))), 10)
        finally:
            await d.close()
        (inst,) = [i for i in snapshot if i.instance_id == info["instance_id"]]
        worker_cfg = CurveConfig.load(str(worker_secret), None)
        assert worker_cfg is not None
        assert inst.meta[ZMQ_PUBLIC_KEY_META] == worker_cfg.public_key.decode()

        router = CurveConfig.load(str(router_secret), None)
        stranger = CurveConfig.load(str(stranger_secret), None)
        assert router is not None and stranger is not None
        for cfg in (router, stranger):
            s = open_sub(ctx, [b"load."])
            connect_sub(s, inst.meta["zmq_endpoint"], cfg, inst.meta[ZMQ_PUBLIC_KEY_META])
            socks.append(s)
        load = _heard(socks[0], 10)
        assert load is not None and load.instance_id == info["instance_id"]
        assert _heard(socks[1], 1.0) is None
    finally:
        for s in socks:
            s.close(linger=0)
        w.proc.terminate()
        w.proc.wait(20)


@pytest.mark.parametrize("role", ["worker", "router", "frontend"])
def test_bad_key_flags_stop_the_process_naming_the_flag(role: str, tmp_path: Path) -> None:
    public_file, _ = generate_keypair(tmp_path, "k")
    argv = [sys.executable, "-m", f"dynamo_grpc.{role}.main", "--zmq-curve-allow", str(tmp_path)]
    if role == "worker":
        argv += ["--no-consul"]
    env = {**ENV, ENV_SECRET_KEY: str(public_file)}  # a public key where the secret one belongs
    p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0, p.stdout + p.stderr
    assert "--zmq-curve-secret-key" in p.stderr and "Traceback" not in p.stderr, p.stderr
