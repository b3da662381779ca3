"""Blocking queries: X-Consul-Index on every read, return on change or after wait, per-resource indexes."""

# ruff: noqa: F811  (pytest fixtures imported from tests.helpers.consul_dev)

from __future__ import annotations

import asyncio
import time
import uuid

from tests.helpers.consul_dev import ConsulHTTP, consul_agent, run_consul_dev  # noqa: F401


def _name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


async def _index(c: ConsulHTTP, path: str, **params: str) -> int:
    _, headers, _ = await c.get(path, params=params)
    return int(headers["X-Consul-Index"])


async def test_every_read_carries_an_index(consul_agent: str) -> None:
    name = _name()
    async with ConsulHTTP(consul_agent) as c:
        for path, params in [
            (f"/v1/health/service/{name}", {}),
            ("/v1/catalog/services", {}),
            (f"/v1/kv/{name}", {}),
            (f"/v1/kv/{name}/", {"recurse": "1"}),
            (f"/v1/kv/{name}/", {"keys": "1"}),
            ("/v1/session/list", {}),
            (f"/v1/session/info/{uuid.uuid4()}", {}),
        ]:
            status, headers, _ = await c.get(path, params=params)
            assert status in (200, 404), path
            assert int(headers["X-Consul-Index"]) >= 1, path


async def test_blocking_query_returns_after_wait_without_change(consul_agent: str) -> None:
    name = _name()
    async with ConsulHTTP(consul_agent) as c:
        await c.put(
            "/v1/agent/service/register", body={"Name": name, "Check": {"TTL": "30s", "Status": "passing"}}
        )
        idx = await _index(c, f"/v1/health/service/{name}")
        t0 = time.monotonic()
        _, headers, _ = await c.get(f"/v1/health/service/{name}", params={"index": str(idx), "wait": "400ms"})
        elapsed = time.monotonic() - t0
        assert int(headers["X-Consul-Index"]) == idx
        assert elapsed >= 0.35  # it did block (the upper bound is Consul's wait + wait/16 jitter)
        await c.put(f"/v1/agent/service/deregister/{name}")


async def test_blocking_query_wakes_on_change_and_not_on_other_services(consul_agent: str) -> None:
    name, other = _name(), _name()
    async with ConsulHTTP(consul_agent) as c:
        await c.put(
            "/v1/agent/service/register",
            body={"Name": name, "ID": f"{name}-1", "Check": {"TTL": "30s", "Status": "passing"}},
        )
        idx = await _index(c, f"/v1/health/service/{name}", passing="1")

        async def change_later() -> None:
            await asyncio.sleep(0.3)
            # A different service changes first: that must not wake our watch.
            await c.put("/v1/agent/service/register", body={"Name": other, "Check": {"TTL": "30s"}})
            await asyncio.sleep(0.3)
            await c.put(
                "/v1/agent/service/register",
                body={"Name": name, "ID": f"{name}-2", "Check": {"TTL": "30s", "Status": "passing"}},
            )

        task = asyncio.create_task(change_later())
        t0 = time.monotonic()
        _, headers, body = await c.get(
            f"/v1/health/service/{name}", params={"index": str(idx), "wait": "20s", "passing": "1"}
        )
        elapsed = time.monotonic() - t0
        await task
        assert int(headers["X-Consul-Index"]) > idx
        assert sorted(e["Service"]["ID"] for e in body) == [f"{name}-1", f"{name}-2"]  # type: ignore[union-attr]
        assert 0.5 < elapsed < 10
        for sid in (f"{name}-1", f"{name}-2", other):
            await c.put(f"/v1/agent/service/deregister/{sid}")


async def test_heartbeat_without_status_change_does_not_move_the_index(consul_agent: str) -> None:
    name = _name()
    async with ConsulHTTP(consul_agent) as c:
        await c.put(
            "/v1/agent/service/register", body={"Name": name, "Check": {"TTL": "30s", "Status": "passing"}}
        )
        idx = await _index(c, f"/v1/health/service/{name}")
        for _ in range(5):
            assert (await c.put(f"/v1/agent/check/pass/service:{name}"))[0] == 200
        assert await _index(c, f"/v1/health/service/{name}") == idx
        await c.put(f"/v1/agent/check/fail/service:{name}")
        assert await _index(c, f"/v1/health/service/{name}") > idx
        await c.put(f"/v1/agent/service/deregister/{name}")


async def test_kv_prefix_index_never_goes_backwards_on_delete(consul_agent: str) -> None:
    name = _name()
    async with ConsulHTTP(consul_agent) as c:
        await c.put(f"/v1/kv/{name}/a", data=b"1")
        await c.put(f"/v1/kv/{name}/b", data=b"2")
        before = await _index(c, f"/v1/kv/{name}/", recurse="1")

        async def delete_later() -> None:
            await asyncio.sleep(0.2)
            await c.delete(f"/v1/kv/{name}/b")

        task = asyncio.create_task(delete_later())
        status, headers, body = await c.get(
            f"/v1/kv/{name}/", params={"recurse": "1", "index": str(before), "wait": "10s"}
        )
        await task
        assert status == 200 and [e["Key"] for e in body] == [f"{name}/a"]  # type: ignore[union-attr]
        assert int(headers["X-Consul-Index"]) > before
        await c.delete(f"/v1/kv/{name}", params={"recurse": "1"})


async def test_bad_wait_and_index_are_400(consul_agent: str) -> None:
    async with ConsulHTTP(consul_agent) as c:
        status, _, text = await c.get("/v1/catalog/services", params={"index": "1", "wait": "10"})
        assert status == 400 and "Invalid wait time" in str(text)
        status, _, text = await c.get("/v1/catalog/services", params={"index": "abc"})
        assert status == 400 and "Invalid index" in str(text)


async def test_index_greater_than_current_returns_at_once() -> None:
    # consul-dev's reset rule (after an agent restart a watcher's index is ahead of the agent's).
    with run_consul_dev() as agent:
        async with ConsulHTTP(agent.address) as c:
            idx = await _index(c, "/v1/health/service/x")
            t0 = time.monotonic()
            _, headers, _ = await c.get(
                "/v1/health/service/x", params={"index": str(idx + 1000), "wait": "5s"}
            )
            assert time.monotonic() - t0 < 2.0
            assert int(headers["X-Consul-Index"]) == idx


async def test_large_answers_are_gzipped_for_clients_that_accept_it() -> None:
    with run_consul_dev() as agent:
        async with ConsulHTTP(agent.address) as c:
            for i in range(60):
                await c.put(
                    "/v1/agent/service/register",
                    body={"Name": "big", "ID": f"b{i}", "Meta": {"k": "v" * 200}, "Check": {"TTL": "60s"}},
                )
            status, headers, body = await c.get("/v1/health/service/big")  # aiohttp sends gzip, inflates
            assert status == 200 and headers.get("Content-Encoding") == "gzip"
            assert sorted(e["Service"]["ID"] for e in body) == sorted(f"b{i}" for i in range(60))  # type: ignore[union-attr]
            status, headers, _ = await c.get(
                "/v1/health/service/big", headers={"Accept-Encoding": "identity"}
            )
            assert status == 200 and "Content-Encoding" not in headers
