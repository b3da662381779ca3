"""The local connector with real processes: workers it starts appear in Consul (passing), workers it stops
drain (deregister, finish their streams) and leave, and a client sees no failed request while a pool shrinks.

Workers have no --role on this branch, so both pools run aggregated mocker workers; the pool command is what
would carry `--role prefill` once worker roles exist.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dynamo_grpc.bench.replay_driver import Driver, DriverConfig
from dynamo_grpc.bench.replay_tokens import prompt_tokens
from dynamo_grpc.bench.replay_trace import TraceRequest
from dynamo_grpc.discovery.agent import AgentHandle, start_consul_dev
from dynamo_grpc.launch.consul_http import passing_instances
from dynamo_grpc.launch.mesh import Mesh, MeshConfig
from dynamo_grpc.planner.connectors.local import LocalConnector

pytestmark = pytest.mark.slow

POOL_CMD = ["worker", "--engine", "mocker", "--drain-grace", "30"]


@pytest.fixture(scope="module")
def consul() -> Iterator[AgentHandle]:
    agent = start_consul_dev(acl=False)
    try:
        yield agent
    finally:
        agent.stop()


def passing_ids(consul: str) -> set[str]:
    return {str(e["Service"]["ID"]) for e in passing_instances(consul, "dynamo-worker")}


def wait_for(what: str, predicate, timeout: float = 90.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def registered(conn: LocalConnector) -> dict[str, str]:
    """worker name -> instance id, for the connector's workers that wrote their ready file."""
    return {w.name: info["instance_id"] for w in conn.workers if (info := w.info()) is not None}


def test_pools_scale_up_and_down_with_real_workers(consul: AgentHandle, tmp_path: Path) -> None:
    async def go() -> None:
        conn = LocalConnector({"prefill": POOL_CMD, "decode": POOL_CMD}, consul.address, log_dir=tmp_path)
        try:
            await conn.scale("prefill", 1)
            await conn.scale("decode", 2)
            assert await conn.replicas() == {"prefill": 1, "decode": 2}
            await asyncio.to_thread(wait_for, "3 registered workers", lambda: len(registered(conn)) == 3)
            ids = set(registered(conn).values())
            await asyncio.to_thread(wait_for, "3 passing workers", lambda: ids <= passing_ids(consul.address))

            await conn.scale("decode", 1)
            assert await conn.replicas() == {"prefill": 1, "decode": 1}
            await conn.wait_drained()
            [(pool, gone, code)] = conn.stopped
            assert pool == "decode" and code == 0 and gone in ids
            assert gone not in passing_ids(consul.address)
            assert len(passing_ids(consul.address) & ids) == 2

            with pytest.raises(Exception, match="unknown pool 'other'"):
                await conn.scale("other", 1)
        finally:
            await conn.close()
        assert not (passing_ids(consul.address) & ids)  # close() drained everything it started

    asyncio.run(go())


def test_scale_down_drains_in_flight_streams_without_failing_one(consul: AgentHandle, tmp_path: Path) -> None:
    async def go() -> None:
        conn = LocalConnector({"decode": POOL_CMD}, consul.address, log_dir=tmp_path)
        try:
            await conn.scale("decode", 2)
            await asyncio.to_thread(wait_for, "2 passing workers", lambda: len(passing_ids(consul.address)) >= 2)
            mesh_cfg = MeshConfig(workers=0, consul=consul.address, acl=False, log_dir=tmp_path / "mesh")
            mesh = await asyncio.to_thread(Mesh(mesh_cfg).start)
            try:
                driver = Driver(DriverConfig(mesh.frontend_grpc, mesh.models[0], channels=4))
                reqs = [TraceRequest(i, 0.0, 300, 150) for i in range(8)]  # ~5 s streams at real mocker speed
                run = asyncio.create_task(driver.run(reqs, lambda r: prompt_tokens(r, None, salt=3)))
                await asyncio.sleep(1.5)  # every stream is decoding now
                await conn.scale("decode", 1)
                records = await run
                await driver.close()
            finally:
                await asyncio.to_thread(mesh.stop)
            assert [r.error for r in records if not r.ok] == []
            assert all(r.output_tokens == 150 for r in records)
            await conn.wait_drained()
            [(_, _, code)] = conn.stopped
            assert code == 0
            # the drained worker (the only one that has drained so far) had streams in flight when told to go
            logs = "".join(p.read_text() for p in tmp_path.glob("decode-*.log"))
            [drained] = [int(n) for n in re.findall(r"draining \S+: (\d+) streams in flight", logs)]
            assert drained > 0
        finally:
            await conn.close()

    asyncio.run(go())


def test_workers_die_with_a_killed_planner(consul: AgentHandle, tmp_path: Path) -> None:
    """A SIGKILLed planner leaves no worker behind (the kernel SIGTERMs them: PR_SET_PDEATHSIG)."""
    code = (
        "import asyncio, sys, time\n"
        "from pathlib import Path\n"
        "from dynamo_grpc.planner.connectors.local import LocalConnector\n"
        "async def go():\n"
        f"    c = LocalConnector({{'worker': {POOL_CMD!r}}}, {consul.address!r}, log_dir=Path({str(tmp_path)!r}))\n"
        "    await c.scale('worker', 1)\n"
        "    while c.workers[0].info() is None: await asyncio.sleep(0.1)\n"
        "    print(c.workers[0].popen.pid, flush=True)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(go())\n"
    )
    planner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert planner.stdout is not None
        pid = int(planner.stdout.readline())
        os.kill(pid, 0)  # the worker runs
    finally:
        planner.kill()
        planner.wait()

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by init) counts as gone
            return f.read().split(")")[-1].split()[0] == "Z"

    wait_for("the orphaned worker to exit", gone, timeout=60)
