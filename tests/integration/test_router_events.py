"""Real processes: 3 KV event publishers and 2 router replicas over consul-dev.

kill -9 a router and restart it, drop a publisher's messages (in the middle and at the
end of a stream), restart a publisher: each time the routers' index (``/dump-index`` on
the metrics port) converges to the publishers' truth, and Route reports the right overlap.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dynamo_grpc.events.curve import ENV_ALLOW, ENV_SECRET_KEY, generate_keypair
from dynamo_grpc.transport import open_channel
from dynamo_grpc.v1 import router_pb2, router_pb2_grpc
from tests.helpers.consul_dev import consul_dev, consul_dev_process  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'gen'}:{ROOT}"}
BS = 16

PUBLISHER = r"""
import asyncio, json, sys
from dynamo_grpc.discovery import ConsulSettings, Discovery, Instance
from dynamo_grpc.events.kv import KvRemoved, KvStored, StoredBlock
from dynamo_grpc.events import KvEventPublisher
from dynamo_grpc.events.curve import CurveConfig
from dynamo_grpc.events.service import KvEventsServicer
from dynamo_grpc.transport import GrpcServer, ServerOptions
from dynamo_grpc.v1 import events_pb2_grpc

class Lossy(KvEventPublisher):
    drop = 0
    def _send(self, topic, seq, payload):
        if topic.startswith(b"kv.") and self.drop > 0:
            self.drop -= 1
            return
        super()._send(topic, seq, payload)

async def main():
    iid, consul, bs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    blocks = {}
    pub = Lossy(iid, "m", bs, ring_size=4, curve=CurveConfig.from_env())
    srv = GrpcServer(ServerOptions("127.0.0.1", 0))
    dump = lambda: [KvStored(None, [StoredBlock(h, 0) for h in blocks])]
    srv.add(events_pb2_grpc.add_KvEventsServiceServicer_to_server, KvEventsServicer(pub, dump), "x")
    addr = await srv.start()
    d = Discovery(ConsulSettings.from_addr(consul))
    meta = {"grpc_address": addr, **pub.meta(), "model": "m", "block_size": str(bs),
            "kv_blocks": "100000", "engine": "test", "dp_size": "1"}
    await d.register(Instance("dynamo-worker", iid, "127.0.0.1", int(addr.rsplit(":", 1)[1]),
                              tags=["namespace=dynamo", "model=m", "role=both"], meta=meta), ttl=10)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
        if not line or line[0] == "quit":
            break
        cmd, args = line[0], [int(x) for x in line[1:]]
        if cmd == "store":
            for h in args:
                blocks[h] = None
            pub.publish_kv([KvStored(None, [StoredBlock(h, 0) for h in args])])
        elif cmd == "remove":
            for h in args:
                blocks.pop(h, None)
            pub.publish_kv([KvRemoved(args)])
        elif cmd == "drop":
            pub.drop = args[0]
        print(json.dumps(sorted(blocks)), flush=True)
    await d.deregister()
    await srv.stop(0)
    await pub.close()

asyncio.run(main())
"""


class Pub:
    def __init__(self, iid: str, consul: str, env: dict[str, str] | None = None) -> None:
        self.iid = iid
        self.p = subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, iid, consul, str(BS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**ENV, **(env or {})},
        )
        assert self.p.stdout is not None and self.p.stdout.readline().strip() == "ready"
        self.truth: list[int] = []

    def cmd(self, *words: object) -> None:
        assert self.p.stdin is not None and self.p.stdout is not None
        self.p.stdin.write(" ".join(map(str, words)) + "\n")
        self.p.stdin.flush()
        self.truth = json.loads(self.p.stdout.readline())

    def kill(self) -> None:
        self.p.kill()
        self.p.wait(10)


class RouterProc:
    def __init__(self, consul: str, log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log.open("a")
        self.p = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dynamo_grpc.router.main",
                "--consul",
                consul,
                "--metrics-port",
                "0",
                "--router-resync-interval",
                "0.5",
                "--router-seed",
                "1",
            ],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**ENV, **(env or {})},
        )
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        parts = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
        self.grpc, self.metrics_port = parts["grpc"], int(parts["metrics_port"])

    def dump(self) -> dict[str, object]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/dump-index", timeout=5) as r:
            return json.loads(r.read())  # type: ignore[no-any-return]

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def kill(self) -> None:
        self.p.kill()
        self.p.wait(10)
        self.log.close()

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
        self.log.close()


def converge(routers: list[RouterProc], pubs: list[Pub], timeout: float = 20.0) -> None:
    want = {f"{p.iid}/0": p.truth for p in pubs if p.truth}
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        views = [r.dump() for r in routers]
        last = views
        if all(v["ready"] and {k: w for k, w in v["workers"].items() if w} == want for v in views):  # type: ignore[union-attr]
            return
        time.sleep(0.1)
    raise AssertionError(f"index did not converge: want {want}, got {last}")


@pytest.fixture
def mesh(consul_dev: str, tmp_path: Path) -> Iterator[tuple[str, list[Pub], list[RouterProc], Path]]:  # noqa: F811
    pubs: list[Pub] = []
    routers: list[RouterProc] = []
    try:
        pubs.extend(Pub(f"w{i}", consul_dev) for i in range(3))
        yield consul_dev, pubs, routers, tmp_path
    finally:
        for r in routers:
            if r.p.poll() is None:
                r.stop()
        for p in pubs:
            if p.p.poll() is None:
                p.kill()


async def route(router: RouterProc, hashes: list[int]) -> router_pb2.RouteResponse:
    ch = open_channel(router.grpc)
    try:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        return await stub.Route(router_pb2.RouteRequest(request_id="q", model="m", block_hashes=hashes, dry_run=True))
    finally:
        await ch.close()


@pytest.mark.slow
async def test_index_converges_through_failures(mesh: tuple[str, list[Pub], list[RouterProc], Path]) -> None:
    consul, pubs, routers, tmp = mesh
    w0, w1, w2 = pubs
    # history from before any router exists: recovered by Replay (ring for w0, dump for w1)
    w0.cmd("store", 1, 2, 3)
    for i in range(10):
        w1.cmd("store", 100 + i)
    routers.extend(RouterProc(consul, tmp / f"router{i}.log") for i in range(2))
    converge(routers, pubs)
    res = await route(routers[0], [1, 2, 3, 4])
    assert res.worker.instance_id == "w0" and res.overlap_blocks == 3

    # live events, removals
    w2.cmd("store", 7, 8)
    w0.cmd("remove", 2)
    converge(routers, pubs)
    assert (await route(routers[1], [1, 2, 3])).overlap_blocks == 1

    # kill -9 a router, change things while it is down, restart it
    routers[0].kill()
    w2.cmd("store", 9)
    w1.cmd("remove", 100, 101)
    routers[0] = RouterProc(consul, tmp / "router0b.log")
    converge(routers, pubs)

    # drop messages in the middle of the stream (gap -> Replay) ...
    w1.cmd("drop", 2)
    w1.cmd("store", 500)
    w1.cmd("store", 501)
    w1.cmd("store", 502)
    converge(routers, pubs)
    # ... and the last one (no later seq reveals it: the periodic resync does)
    w0.cmd("drop", 1)
    w0.cmd("store", 600)
    converge(routers, pubs)
    # more drops than the ring holds: a full dump
    w2.cmd("drop", 6)
    for h in range(700, 706):
        w2.cmd("store", h)
    w2.cmd("store", 706)
    converge(routers, pubs)

    # restart a publisher under the same instance id: new epoch, empty cache
    w2.kill()
    pubs[2] = Pub("w2", consul)
    pubs[2].cmd("store", 42)
    converge(routers, pubs)
    res = await route(routers[1], [42])
    assert res.worker.instance_id == "w2" and res.overlap_blocks == 1
    assert (await route(routers[1], [7, 8])).overlap_blocks == 0

    m = routers[0].metrics()
    assert "dynamo_router_replays_total{" in m and "dynamo_router_indexed_blocks{" in m
    gaps = [line for line in m.splitlines() if line.startswith("dynamo_router_event_gaps_total{")]
    assert gaps and float(gaps[0].split()[1]) >= 1


@pytest.mark.slow
async def test_router_not_serving_until_synced_and_refuses_block_size_mismatch(
    mesh: tuple[str, list[Pub], list[RouterProc], Path],
) -> None:
    consul, pubs, routers, tmp = mesh
    odd = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, "odd", consul, str(BS * 2)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    try:
        assert odd.stdout is not None and odd.stdout.readline().strip() == "ready"
        r = RouterProc(consul, tmp / "r.log")
        routers.append(r)
        converge(routers, pubs)
        view = r.dump()
        assert "odd" in view["refused"]  # type: ignore[operator]
        for i in range(20):
            ch = open_channel(r.grpc)
            stub = router_pb2_grpc.RouterServiceStub(ch)
            res = await stub.Route(router_pb2.RouteRequest(request_id=f"x{i}", model="m", token_ids=list(range(64))))
            await ch.close()
            assert res.worker.instance_id != "odd"
        assert "block_size 32" in (tmp / "r.log").read_text()
        ch = open_channel(r.grpc)
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await router_pb2_grpc.RouterServiceStub(ch).Route(router_pb2.RouteRequest(request_id="e", model="m"))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await ch.close()
    finally:
        odd.kill()
        odd.wait(10)


def active_sequences(router: RouterProc) -> float:
    """Sum over models of the router's active-sequence gauge."""
    lines = [
        ln for ln in router.metrics().splitlines() if re.match(r"dynamo_router_active_sequences(\{[^}]*\})? ", ln)
    ]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)


@pytest.mark.slow
async def test_event_plane_over_curve(consul_dev: str, tmp_path: Path) -> None:  # noqa: F811
    """Workers and router replicas with CURVE keys: the index and the replica sync work; a plain worker is refused."""
    worker_pub, worker_secret = generate_keypair(tmp_path / "keys", "worker")
    router_pub, router_secret = generate_keypair(tmp_path / "keys", "router")
    routers_allowed = tmp_path / "routers-allowed"  # who may subscribe: the router replicas
    routers_allowed.mkdir()
    (routers_allowed / router_pub.name).write_bytes(router_pub.read_bytes())
    worker_env = {ENV_SECRET_KEY: str(worker_secret), ENV_ALLOW: str(routers_allowed)}
    router_env = {ENV_SECRET_KEY: str(router_secret), ENV_ALLOW: str(routers_allowed)}
    assert worker_pub.exists()

    pubs = [Pub(f"c{i}", consul_dev, worker_env) for i in range(2)]
    plain = Pub("plain", consul_dev)
    routers: list[RouterProc] = []
    try:
        pubs[0].cmd("store", 1, 2, 3)  # before any router: recovered by Replay
        routers.extend(RouterProc(consul_dev, tmp_path / f"r{i}.log", router_env) for i in range(2))
        pubs[1].cmd("store", 10, 11)
        plain.cmd("store", 99)
        pubs[0].cmd("store", 4)  # live, over CURVE
        converge(routers, pubs)
        res = await route(routers[0], [1, 2, 3, 4, 5])
        assert res.worker.instance_id == "c0" and res.overlap_blocks == 4
        for i, r in enumerate(routers):
            view = r.dump()
            assert "plain/0" not in view["workers"] or not view["workers"]["plain/0"]  # type: ignore[index,operator]
            assert "not subscribing to plain" in (tmp_path / f"r{i}.log").read_text()

        # replica sync: sequences routed by one replica count in the other (active.<model> over CURVE)
        ch = open_channel(routers[0].grpc)
        stub = router_pb2_grpc.RouterServiceStub(ch)
        for i in range(3):
            await stub.Route(router_pb2.RouteRequest(request_id=f"live{i}", model="m", block_hashes=[1, 2]))
        await ch.close()
        deadline = time.monotonic() + 15
        while active_sequences(routers[1]) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert active_sequences(routers[1]) >= 3
    finally:
        for r in routers:
            r.stop()
        for p in [*pubs, plain]:
            p.kill()
