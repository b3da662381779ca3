"""consul-dev's agent and health endpoints follow Consul's rules (run against a real agent too when
CONSUL_HTTP_ADDR is set)."""

# ruff: noqa: F811  (pytest fixtures imported from tests.helpers.consul_dev)

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.helpers.consul_dev import ConsulHTTP, consul_agent, run_consul_dev  # noqa: F401


def _name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


async def _register(c: ConsulHTTP, name: str, sid: str, **extra: object) -> int:
    body = {"Name": name, "ID": sid, "Port": 9000, "Address": "127.0.0.1", "Check": {"TTL": "30s"}}
    body.update(extra)
    status, _, text = await c.put("/v1/agent/service/register", body=body)
    assert status == 200, text
    return status


async def _passing_ids(c: ConsulHTTP, name: str, tags: list[str] | None = None) -> list[str]:
    params = [("passing", "1")] + [("tag", t) for t in tags or []]
    status, headers, body = await c.get(f"/v1/health/service/{name}", params=params)
    assert status == 200 and int(headers["X-Consul-Index"]) >= 1
    assert isinstance(body, list)
    return sorted(e["Service"]["ID"] for e in body)


async def test_ttl_check_starts_critical_until_passed(consul_agent: str) -> None:
    name = _name()
    async with ConsulHTTP(consul_agent) as c:
        await _register(c, name, f"{name}-1")
        status, _, entries = await c.get(f"/v1/health/service/{name}")
        assert status == 200 and len(entries) == 1  # type: ignore[arg-type]
        svc_check = [ch for ch in entries[0]["Checks"] if ch["ServiceID"] == f"{name}-1"]  # type: ignore[index]
        assert [ch["Status"] for ch in svc_check] == ["critical"]
        assert svc_check[0]["CheckID"] == f"service:{name}-1"
        assert await _passing_ids(c, name) == []
        assert (await c.put(f"/v1/agent/check/pass/service:{name}-1"))[0] == 200
        assert await _passing_ids(c, name) == [f"{name}-1"]
        await c.put(f"/v1/agent/service/deregister/{name}-1")


async def test_initial_status_and_warning_is_not_passing(consul_agent: str) -> None:
    name = _name()
    async with ConsulHTTP(consul_agent) as c:
        await _register(c, name, f"{name}-1", Check={"TTL": "30s", "Status": "passing"})
        assert await _passing_ids(c, name) == [f"{name}-1"]
        await c.put(f"/v1/agent/check/warn/service:{name}-1", params={"note": "slow"})
        assert await _passing_ids(c, name) == []
        status, _, _ = await c.put(
            f"/v1/agent/check/update/service:{name}-1", body={"Status": "passing", "Output": "fine again"}
        )
        assert status == 200
        assert await _passing_ids(c, name) == [f"{name}-1"]
        await c.put(f"/v1/agent/check/fail/service:{name}-1")
        assert await _passing_ids(c, name) == []
        status, _, text = await c.put(f"/v1/agent/check/update/service:{name}-1", body={"Status": "bogus"})
        assert status == 400 and "Invalid check status" in str(text)
        await c.put(f"/v1/agent/service/deregister/{name}-1")


async def test_ttl_expiry_turns_check_critical(consul_agent: str) -> None:
    name = _name()
    async with ConsulHTTP(consul_agent) as c:
        await _register(c, name, f"{name}-1", Check={"TTL": "1s", "Status": "passing"})
        assert await _passing_ids(c, name) == [f"{name}-1"]
        await asyncio.sleep(1.6)
        assert await _passing_ids(c, name) == []
        _, _, entries = await c.get(f"/v1/health/service/{name}")
        check = next(ch for ch in entries[0]["Checks"] if ch["ServiceID"])  # type: ignore[index]
        assert check["Status"] == "critical" and "TTL expired" in check["Output"]
        await c.put(f"/v1/agent/service/deregister/{name}-1")


async def test_unknown_check_and_service_are_404(consul_agent: str) -> None:
    async with ConsulHTTP(consul_agent) as c:
        status, _, text = await c.put("/v1/agent/check/pass/no-such-check")
        assert status == 404 and "Unknown check ID" in str(text)
        status, _, text = await c.put("/v1/agent/service/deregister/no-such-service")
        assert status == 404 and "Unknown service ID" in str(text)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"Port": 1}, "Missing service name"),
        ({"Name": "x", "Meta": {f"k{i}": "v" for i in range(65)}}, "cannot contain more than 64"),
        ({"Name": "x", "Meta": {"k" * 129: "v"}}, "Key is too long"),
        ({"Name": "x", "Meta": {"k": "v" * 513}}, "Value is too long"),
        ({"Name": "x", "Meta": {"bad key": "v"}}, "invalid characters"),
        ({"Name": "x", "Meta": {"consul-x": "v"}}, "reserved"),
        ({"Name": "x", "Check": {"TTL": "0s"}}, "TTL must be > 0"),
        ({"Name": "x", "Check": {"TTL": "10s", "Interval": "10s"}}, "cannot both be specified"),
        ({"Name": "x", "Check": {"TTL": "10s", "Status": "great"}}, "Status for checks must"),
    ],
)
async def test_register_validation_errors_are_400(
    consul_agent: str, body: dict[str, object], message: str
) -> None:
    async with ConsulHTTP(consul_agent) as c:
        status, _, text = await c.put("/v1/agent/service/register", body=body)
        assert status == 400, text
        assert message in str(text)


async def test_meta_at_the_limits_is_accepted(consul_agent: str) -> None:
    name = _name()
    meta = {f"k{i:02d}": "v" for i in range(63)} | {"k" * 128: "v" * 512}
    async with ConsulHTTP(consul_agent) as c:
        await _register(c, name, f"{name}-1", Meta=meta)
        _, _, services = await c.get("/v1/agent/services")
        assert services[f"{name}-1"]["Meta"] == meta  # type: ignore[index]
        await c.put(f"/v1/agent/service/deregister/{name}-1")


async def test_malformed_json_is_400(consul_agent: str) -> None:
    async with ConsulHTTP(consul_agent) as c:
        status, _, text = await c.put("/v1/agent/service/register", data=b"{not json")
        assert status == 400 and "Request decode failed" in str(text)


async def test_check_ids_for_several_checks_and_lowercase_fields(consul_agent: str) -> None:
    name = _name()
    async with ConsulHTTP(consul_agent) as c:
        # py-consul sends lower-case field names; Consul matches them case-insensitively.
        status, _, text = await c.put(
            "/v1/agent/service/register",
            body={
                "name": name,
                "id": f"{name}-1",
                "checks": [{"ttl": "30s"}, {"TTL": "30s", "status": "passing"}],
            },
        )
        assert status == 200, text
        _, _, checks = await c.get("/v1/agent/checks")
        mine = {k: v["Status"] for k, v in checks.items() if v["ServiceID"] == f"{name}-1"}  # type: ignore[union-attr]
        assert mine == {f"service:{name}-1:1": "critical", f"service:{name}-1:2": "passing"}
        await c.put(f"/v1/agent/service/deregister/{name}-1")


async def test_reregistration_keeps_check_status(consul_agent: str) -> None:
    name = _name()
    async with ConsulHTTP(consul_agent) as c:
        await _register(c, name, f"{name}-1")
        await c.put(f"/v1/agent/check/pass/service:{name}-1")
        await _register(c, name, f"{name}-1", Tags=["v2"])
        assert await _passing_ids(c, name, ["v2"]) == [f"{name}-1"]
        await c.put(f"/v1/agent/service/deregister/{name}-1")
        assert await _passing_ids(c, name) == []
        _, _, checks = await c.get("/v1/agent/checks")
        assert f"service:{name}-1" not in checks  # type: ignore[operator]


async def test_tag_filter_requires_every_tag(consul_agent: str) -> None:
    name = _name()
    async with ConsulHTTP(consul_agent) as c:
        await _register(
            c, name, f"{name}-a", Tags=["prefill", "m1"], Check={"TTL": "30s", "Status": "passing"}
        )
        await _register(
            c, name, f"{name}-b", Tags=["decode", "m1"], Check={"TTL": "30s", "Status": "passing"}
        )
        assert await _passing_ids(c, name, ["m1"]) == [f"{name}-a", f"{name}-b"]
        assert await _passing_ids(c, name, ["m1", "decode"]) == [f"{name}-b"]
        assert await _passing_ids(c, name, ["prefill", "decode"]) == []
        _, headers, services = await c.get("/v1/catalog/services")
        assert "X-Consul-Index" in headers
        assert services[name] == ["decode", "m1", "prefill"] and "consul" in services  # type: ignore[index]
        for sid in ("a", "b"):
            await c.put(f"/v1/agent/service/deregister/{name}-{sid}")


async def test_status_leader_and_agent_self(consul_agent: str) -> None:
    async with ConsulHTTP(consul_agent) as c:
        status, _, leader = await c.get("/v1/status/leader")
        assert status == 200 and isinstance(leader, str) and ":" in leader
        status, _, me = await c.get("/v1/agent/self")
        assert status == 200 and me["Config"]["Datacenter"]  # type: ignore[index]


async def test_critical_service_is_reaped_after_deregister_critical_service_after() -> None:
    # consul-dev only: a real agent needs >= 1 minute (+ up to its 30 s reap interval) for this.
    with run_consul_dev(time_scale=0.02) as agent:  # 1m minimum -> 1.2 s, reaper every 0.6 s
        async with ConsulHTTP(agent.address) as c:
            await _register(c, "svc", "dies", Check={"TTL": "30s", "DeregisterCriticalServiceAfter": "1s"})
            await _register(
                c,
                "svc",
                "lives",
                Check={"TTL": "30s", "Status": "passing", "DeregisterCriticalServiceAfter": "1s"},
            )
            for _ in range(60):
                _, _, services = await c.get("/v1/agent/services")
                if "dies" not in services:  # type: ignore[operator]
                    break
                await asyncio.sleep(0.1)
            assert "dies" not in services and "lives" in services  # type: ignore[operator]


async def test_deregister_after_is_clamped_to_one_minute() -> None:
    with run_consul_dev(time_scale=0.02) as agent:
        async with ConsulHTTP(agent.address) as c:
            await _register(c, "svc", "x", Check={"TTL": "30s", "DeregisterCriticalServiceAfter": "10ms"})
            await asyncio.sleep(0.7)  # beyond one reap interval, well before the clamped 1.2 s
            _, _, services = await c.get("/v1/agent/services")
            assert "x" in services  # type: ignore[operator]


async def test_acl_token_required() -> None:
    with run_consul_dev(acl_token="s3cret") as agent:
        async with ConsulHTTP(agent.address, token="") as anon:
            status, _, text = await anon.put("/v1/agent/service/register", body={"Name": "a"})
            assert status == 403 and "Permission denied" in str(text)
            status, _, _ = await anon.get("/v1/kv/x")
            assert status == 403
            status, _, body = await anon.get("/v1/health/service/a")
            assert status == 200 and body == []  # list reads are filtered, as under default-deny
            status, _, _ = await anon.get("/v1/status/leader")
            assert status == 200
            status, _, text = await anon.get("/v1/kv/x", headers={"X-Consul-Token": "wrong"})
            assert status == 403 and "ACL not found" in str(text)
        async with ConsulHTTP(agent.address, token="s3cret") as ok:
            status, _, _ = await ok.put(
                "/v1/agent/service/register", body={"Name": "a", "Check": {"TTL": "9s"}}
            )
            assert status == 200
            status, _, _ = await ok.put("/v1/kv/x", data=b"1", headers={})
            assert status == 200
            status, _, _ = await ok.get("/v1/kv/x", headers={"Authorization": "Bearer s3cret"})
            assert status == 200
