"""consul-dev answers a health blocking query when *its* answer changes (tag-filtered queries sleep through
changes to other tags), which is what lets a sharded watch parse one shard per change."""

from __future__ import annotations

import asyncio
import time
import uuid

from tests.helpers.consul_dev import ConsulHTTP, run_consul_dev


def _reg(name: str, iid: str, tag: str) -> dict[str, object]:
    return {"Name": name, "ID": iid, "Tags": [tag], "Check": {"TTL": "30s", "Status": "passing"}}


async def test_tag_query_sleeps_through_other_tags_and_wakes_on_its_own() -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    with run_consul_dev() as agent:
        async with ConsulHTTP(agent.address) as c:
            await c.put("/v1/agent/service/register", body=_reg(name, "a1", "s=a"))
            await c.put("/v1/agent/service/register", body=_reg(name, "b1", "s=b"))
            _, headers, body = await c.get(f"/v1/health/service/{name}", params={"passing": "1", "tag": "s=a"})
            idx_a = int(headers["X-Consul-Index"])
            assert [e["Service"]["ID"] for e in body] == ["a1"]

            async def watch_a() -> tuple[float, int, list[str]]:
                _, h, b = await c.get(
                    f"/v1/health/service/{name}",
                    params={"passing": "1", "tag": "s=a", "index": str(idx_a), "wait": "20s"},
                )
                return time.monotonic(), int(h["X-Consul-Index"]), [e["Service"]["ID"] for e in b]

            task = asyncio.create_task(watch_a())
            await asyncio.sleep(0.3)
            # Another tag's instances come and go: the s=a query must keep sleeping.
            await c.put("/v1/agent/service/register", body=_reg(name, "b2", "s=b"))
            await c.put(f"/v1/agent/service/deregister/{'b1'}")
            await asyncio.sleep(0.5)
            assert not task.done(), "a change to another tag woke the s=a query"
            # The whole service's index moved; the unfiltered answer reports it.
            _, h_all, _ = await c.get(f"/v1/health/service/{name}", params={"passing": "1"})
            assert int(h_all["X-Consul-Index"]) > idx_a
            t_change = time.monotonic()
            await c.put("/v1/agent/service/register", body=_reg(name, "a2", "s=a"))
            woke, idx, ids = await asyncio.wait_for(task, 10)
            assert woke >= t_change
            assert ids == ["a1", "a2"]
            assert idx > idx_a  # never backwards, and a new index for the new answer

            # Asking again at the returned index blocks until the wait runs out (nothing changed).
            t0 = time.monotonic()
            _, h2, _ = await c.get(
                f"/v1/health/service/{name}",
                params={"passing": "1", "tag": "s=a", "index": str(idx), "wait": "300ms"},
            )
            assert time.monotonic() - t0 >= 0.25
            assert int(h2["X-Consul-Index"]) == idx


async def test_query_index_restarts_low_after_agent_restart_so_clients_reset() -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    with run_consul_dev() as agent:
        async with ConsulHTTP(agent.address) as c:
            for i in range(5):
                await c.put("/v1/agent/service/register", body=_reg(name, f"a{i}", "s=a"))
            _, headers, _ = await c.get(f"/v1/health/service/{name}", params={"tag": "s=a"})
            before = int(headers["X-Consul-Index"])
        agent.restart()
        async with ConsulHTTP(agent.address) as c:
            t0 = time.monotonic()
            _, headers, body = await c.get(
                f"/v1/health/service/{name}", params={"tag": "s=a", "index": str(before), "wait": "20s"}
            )
            assert time.monotonic() - t0 < 5  # answered at once: the client sees the lower index
            assert int(headers["X-Consul-Index"]) < before and body == []


async def test_tag_filter_expression_and_a_refused_one() -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    with run_consul_dev() as agent:
        async with ConsulHTTP(agent.address) as c:
            await c.put("/v1/agent/service/register", body=_reg(name, "ours", "dyn-sharded"))
            await c.put("/v1/agent/service/register", body=_reg(name, "foreign", "other"))
            path = f"/v1/health/service/{name}"
            for expr, ids in [
                ('Service.Tags not contains "dyn-sharded"', ["foreign"]),
                ('Service.Tags contains "dyn-sharded"', ["ours"]),
                ('"dyn-sharded" not in Service.Tags', ["foreign"]),
            ]:
                status, _, body = await c.get(path, params={"passing": "1", "filter": expr})
                assert status == 200 and [e["Service"]["ID"] for e in body] == ids, expr
            status, _, body = await c.get(path, params={"filter": 'Service.Port > 80'})
            assert status == 400 and "Service.Port > 80" in str(body)  # refused, never ignored
