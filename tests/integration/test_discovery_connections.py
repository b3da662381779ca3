"""A process's connections to the Consul agent come back to the same number at rest, whatever happened
in between: one per blocking query its watches hold, plus one for every other call (discovery/client.py).

This pins the cause of the soak's intermittent extra frontend fd (tests/integration/test_soak.py): the
control client's pool grew by one whenever calls overlapped (a heartbeat, the registry's and the router's
card reads after a worker left or joined) and never shrank, since aiohttp reuses pooled connections
first-in first-out and the heartbeat kept every one of them younger than the keep-alive timeout."""

# ruff: noqa: F811  (pytest fixtures imported from tests.helpers.consul_dev)

from __future__ import annotations

import asyncio
import os
import uuid
from urllib.parse import urlsplit

import pytest

from dynamo_grpc.discovery import ConsulSettings, Discovery, Instance
from dynamo_grpc.discovery.client import CONTROL_CONNECTIONS
from dynamo_grpc.discovery.shards import SHARDS, with_shard_tag
from tests.helpers.consul_dev import ConsulHTTP, consul_agent  # noqa: F401


def agent_connections(address: str) -> int:
    """Established TCP connections to the agent that this process holds an fd for (Linux /proc)."""
    port = urlsplit(address).port
    to_agent: set[str] = set()  # socket inodes
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as fh:
            for row in fh.read().splitlines()[1:]:
                cols = row.split()
                if cols[3] == "01" and int(cols[2].rsplit(":", 1)[1], 16) == port:  # 01: ESTABLISHED
                    to_agent.add(cols[9])
    held = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        held += target.startswith("socket:[") and target[8:-1] in to_agent
    return held


async def _worker(address: str, service: str, instance_id: str, *, join: bool) -> None:
    """A worker joining or leaving, from another client (its connections closed before we count)."""
    async with ConsulHTTP(address) as c:
        if join:
            body = {
                "Name": service, "ID": instance_id, "Port": 7000, "Tags": with_shard_tag(["m=x"], instance_id),
                "Check": {"TTL": "60s", "Status": "passing"},
            }
            status, _, _ = await c.put("/v1/agent/service/register", body=body)
        else:
            status, _, _ = await c.put(f"/v1/agent/service/deregister/{instance_id}")
        assert status == 200


async def test_agent_connections_and_tasks_are_back_after_a_worker_leaves_and_rejoins(consul_agent: str) -> None:
    svc = f"dynamo-test-{uuid.uuid4().hex[:8]}"
    worker = f"{svc}-w0"
    snapshots: asyncio.Queue[list[str]] = asyncio.Queue()
    async with Discovery(ConsulSettings.from_addr(consul_agent), watch_wait=5.0) as fe:
        # a frontend: heartbeating (every 0.5 s here), watching the workers, and on every change reading
        # the model cards from two places at once (the model registry and the embedded router)
        await fe.register(Instance("dynamo-frontend", f"{svc}-fe", "127.0.0.1", 8000, ["m=x"]), ttl=1.5)

        async def follow() -> None:
            async for snap in fe.watch(svc):
                await asyncio.gather(*(fe.get_model_card_entries("m") for _ in range(4)))
                snapshots.put_nowait([i.instance_id for i in snap])

        async def until(ids: list[str]) -> None:
            while await asyncio.wait_for(snapshots.get(), 20.0) != ids:
                pass

        watching = asyncio.get_running_loop().create_task(follow())
        try:
            await _worker(consul_agent, svc, worker, join=True)
            await until([worker])
            await asyncio.sleep(1.0)  # two heartbeats on the control connection
            idle = agent_connections(consul_agent), len(asyncio.all_tasks())

            await _worker(consul_agent, svc, worker, join=False)
            await until([])
            await _worker(consul_agent, svc, worker, join=True)
            await until([worker])
            await asyncio.gather(*(fe.get_model_cards() for _ in range(8)), fe.get_model_card_entries("m"))
            await asyncio.sleep(1.0)
            after = agent_connections(consul_agent), len(asyncio.all_tasks())
        finally:
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
            await _worker(consul_agent, svc, worker, join=False)
    # one long poll per shard and one for the instances without shard tags, plus the control connection
    assert idle[0] == SHARDS + 1 + CONTROL_CONNECTIONS
    assert after == idle


def test_control_connections_below_one_are_refused() -> None:
    with pytest.raises(ValueError, match="control_connections"):
        Discovery(ConsulSettings.from_addr("http://127.0.0.1:8500"), control_connections=0)
