"""Sharded watches (discovery/shards.py): a change costs each watcher one shard's answer, not the whole
service's, and decoding only the entry that changed (discovery/entries.py); the shard tag never leaks
into what callers see."""

# ruff: noqa: F811  (pytest fixtures imported from tests.helpers.consul_dev)

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

from dynamo_grpc.discovery import ConsulSettings, Discovery, Instance
from dynamo_grpc.discovery.shards import SHARD_TAG, shard_of
from tests.helpers.consul_dev import ConsulHTTP, consul_agent  # noqa: F401


async def _until(it: AsyncIterator[list[Instance]], n: int, timeout: float = 20.0) -> list[Instance]:
    async def loop() -> list[Instance]:
        while True:
            snap = await it.__anext__()
            if len(snap) == n:
                return snap

    return await asyncio.wait_for(loop(), timeout)


async def test_sharded_watch_sees_everything_and_parses_one_shard_per_change(consul_agent: str) -> None:
    svc = f"dynamo-test-{uuid.uuid4().hex[:8]}"
    n = 48
    settings = ConsulSettings.from_addr(consul_agent)
    async with (
        Discovery(settings) as fleet,
        Discovery(settings, watch_wait=10) as sharded,
        Discovery(settings, watch_wait=10, sharded_watch=False) as whole,
    ):
        await asyncio.gather(*(
            fleet.register(Instance(svc, f"{svc}-{i:02d}", "127.0.0.1", 7000 + i, ["m=x"]), ttl=30)
            for i in range(n)
        ))
        a, b = sharded.watch(svc, tags=["m=x"]), whole.watch(svc, tags=["m=x"])
        snap_a, snap_b = await _until(a, n), await _until(b, n)
        assert snap_a == snap_b  # same instances, same order, the shard tag stripped from both
        assert all(i.tags == ["m=x"] for i in snap_a)
        # On the wire each instance carries its shard tag (other tools can filter on it too).
        async with ConsulHTTP(consul_agent) as c:
            _, _, body = await c.get(f"/v1/health/service/{svc}")
        assert isinstance(body, list)
        for e in body:
            assert f"{SHARD_TAG}{shard_of(e['Service']['ID'])}" in e["Service"]["Tags"]

        got_a, got_b = sharded.answer_entries, whole.answer_entries
        before_a, before_b = sharded.parsed_entries, whole.parsed_entries
        new = Instance(svc, f"{svc}-new", "127.0.0.1", 7999, ["m=x"])
        await fleet.register(new, ttl=30)
        assert new.instance_id in {i.instance_id for i in await _until(a, n + 1)}
        await _until(b, n + 1)
        # The whole-service watcher receives every entry again; the sharded one only the new one's shard.
        assert whole.answer_entries - got_b == n + 1
        shard_size = sum(1 for i in snap_a if shard_of(i.instance_id) == shard_of(new.instance_id)) + 1
        assert sharded.answer_entries - got_a == shard_size
        assert shard_size < (n + 1) / 4
        # Both decode only the entry that changed (discovery/entries.py); the rest keep their Instance.
        assert whole.parsed_entries - before_b == 1
        assert sharded.parsed_entries - before_a == 1

        await fleet.deregister(new.instance_id)
        assert new.instance_id not in {i.instance_id for i in await _until(a, n)}


async def test_sharded_watch_sees_instances_registered_without_shard_tags() -> None:
    """Another tool's registration (no dyn-shard tag) is still watched: the catch-all query finds it."""
    from tests.helpers.consul_dev import run_consul_dev

    svc = f"dynamo-test-{uuid.uuid4().hex[:8]}"
    with run_consul_dev() as agent:
        settings = ConsulSettings.from_addr(agent.address)
        async with Discovery(settings) as fleet, Discovery(settings, watch_wait=5) as watcher:
            await fleet.register(Instance(svc, f"{svc}-ours", "127.0.0.1", 7000, ["m=x"]), ttl=10.0)
            snaps = watcher.watch(svc)
            await _until(snaps, 1)
            async with ConsulHTTP(agent.address) as c:
                body = {"Name": svc, "ID": f"{svc}-foreign", "Tags": ["m=x"], "Port": 7001,
                        "Check": {"TTL": "30s", "Status": "passing"}}
                await c.put("/v1/agent/service/register", body=body)
            seen = await _until(snaps, 2)
            assert {i.instance_id for i in seen} == {f"{svc}-ours", f"{svc}-foreign"}
            assert all(i.tags == ["m=x"] for i in seen)


async def test_sharded_watch_keeps_its_view_while_the_agent_restarts() -> None:
    from tests.helpers.consul_dev import run_consul_dev

    svc = f"dynamo-test-{uuid.uuid4().hex[:8]}"
    with run_consul_dev() as agent:
        settings = ConsulSettings.from_addr(agent.address)
        async with Discovery(settings) as fleet, Discovery(settings, watch_wait=5) as watcher:
            for i in range(6):
                await fleet.register(Instance(svc, f"{svc}-{i}", "127.0.0.1", 7000 + i), ttl=2.0)
            snaps = watcher.watch(svc)
            await _until(snaps, 6)
            agent.restart()
            # Every shard query starts over (the index went backwards); the fleet's heartbeats find
            # the agent empty and register again, and the merged view converges back to all six.
            seen: list[int] = []

            async def loop() -> None:
                while True:
                    snap = await snaps.__anext__()
                    seen.append(len(snap))
                    if len(snap) == 6:
                        return

            await asyncio.wait_for(loop(), 30)
            assert seen[-1] == 6
