"""Sessions: create/info/renew/destroy, TTL, check-bound invalidation with release and delete behaviours."""

# ruff: noqa: F811  (pytest fixtures imported from tests.helpers.consul_dev)

from __future__ import annotations

import asyncio
import uuid

from tests.helpers.consul_dev import ConsulHTTP, consul_agent, run_consul_dev  # noqa: F401


def _name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


async def _session(c: ConsulHTTP, **body: object) -> str:
    status, _, out = await c.put("/v1/session/create", body=body or None)
    assert status == 200, out
    return str(out["ID"])  # type: ignore[index]


async def _service(c: ConsulHTTP, name: str, status: str = "passing") -> str:
    await c.put("/v1/agent/service/register", body={"Name": name, "Check": {"TTL": "30s", "Status": status}})
    return f"service:{name}"


async def test_create_info_destroy(consul_agent: str) -> None:
    async with ConsulHTTP(consul_agent) as c:
        sid = await _session(c)
        status, headers, info = await c.get(f"/v1/session/info/{sid}")
        assert status == 200 and "X-Consul-Index" in headers
        assert info[0]["ID"] == sid and info[0]["Behavior"] == "release"  # type: ignore[index]
        assert "serfHealth" in (info[0]["NodeChecks"] or info[0].get("Checks") or [])  # type: ignore[index]
        assert (await c.put(f"/v1/session/destroy/{sid}"))[2] is True
        _, _, info = await c.get(f"/v1/session/info/{sid}")
        assert not info


async def test_check_bound_session_delete_behavior_drops_keys(consul_agent: str) -> None:
    name = _name()
    async with ConsulHTTP(consul_agent) as c:
        check = await _service(c, name)
        sid = await _session(c, Checks=["serfHealth", check], Behavior="delete", LockDelay="0s")
        assert (await c.put(f"/v1/kv/{name}/card", data=b"{}", params={"acquire": sid}))[2] is True
        await c.put(f"/v1/agent/check/fail/{check}")
        assert (await c.get(f"/v1/kv/{name}/card"))[0] == 404
        _, _, info = await c.get(f"/v1/session/info/{sid}")
        assert not info
        await c.put(f"/v1/agent/service/deregister/{name}")


async def test_check_bound_session_release_behavior_keeps_keys(consul_agent: str) -> None:
    name = _name()
    async with ConsulHTTP(consul_agent) as c:
        check = await _service(c, name)
        sid = await _session(c, Checks=["serfHealth", check], LockDelay="0s")
        await c.put(f"/v1/kv/{name}/lock", data=b"v", params={"acquire": sid})
        await c.put(f"/v1/agent/service/deregister/{name}")  # deregistering the check invalidates too
        status, _, body = await c.get(f"/v1/kv/{name}/lock")
        assert status == 200 and "Session" not in body[0]  # type: ignore[index]
        await c.delete(f"/v1/kv/{name}/lock")


async def test_session_on_critical_or_missing_check_is_refused(consul_agent: str) -> None:
    name = _name()
    async with ConsulHTTP(consul_agent) as c:
        check = await _service(c, name, status="critical")
        status, _, text = await c.put("/v1/session/create", body={"Checks": [check]})
        assert status == 500 and "critical state" in str(text)
        status, _, text = await c.put("/v1/session/create", body={"Checks": [f"{check}-missing"]})
        assert status == 500 and "Missing check" in str(text)
        status, _, text = await c.put("/v1/session/create", body={"Behavior": "explode"})
        assert status == 500 and "Invalid Behavior" in str(text)
        status, _, text = await c.put("/v1/session/create", body={"TTL": "5s"})
        assert status == 500 and "Invalid Session TTL" in str(text)
        status, _, text = await c.put(f"/v1/session/renew/{uuid.uuid4()}")
        assert status == 404
        await c.put(f"/v1/agent/service/deregister/{name}")


async def test_ttl_session_expires_unless_renewed_and_lock_delay() -> None:
    # consul-dev only, time-scaled: a "10s" session lapses after 2 x 10 s x 0.05 = 1 s.
    with run_consul_dev(time_scale=0.05) as agent:
        async with ConsulHTTP(agent.address) as c:
            renewed = await _session(c, TTL="10s", LockDelay="15s")
            lapsed = await _session(c, TTL="10s", LockDelay="40s")  # lock delay scales to 2 s
            await c.put("/v1/kv/held", data=b"x", params={"acquire": lapsed})
            for _ in range(6):
                await asyncio.sleep(0.3)
                status, _, out = await c.put(f"/v1/session/renew/{renewed}")
                assert status == 200 and out[0]["ID"] == renewed  # type: ignore[index]
            _, _, info = await c.get(f"/v1/session/info/{lapsed}")
            assert not info
            _, _, body = await c.get("/v1/kv/held")
            assert "Session" not in body[0]  # type: ignore[index]
            # Lock delay: the key cannot be taken again right after its holder lapsed...
            other = await _session(c)
            assert (await c.put("/v1/kv/held", data=b"y", params={"acquire": other}))[2] is False
            await asyncio.sleep(1.6)
            # ...until it has passed.
            assert (await c.put("/v1/kv/held", data=b"y", params={"acquire": other}))[2] is True
