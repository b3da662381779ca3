"""consul-dev's KV store: get/recurse/keys/raw, put with flags/cas/acquire/release, delete, limits."""

# ruff: noqa: F811  (pytest fixtures imported from tests.helpers.consul_dev)

from __future__ import annotations

import base64
import uuid

from tests.helpers.consul_dev import ConsulHTTP, consul_agent  # noqa: F401


def _name() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


async def _session(c: ConsulHTTP, **body: object) -> str:
    status, _, out = await c.put("/v1/session/create", body=body or None)
    assert status == 200, out
    return str(out["ID"])  # type: ignore[index]


async def test_put_get_roundtrip_and_404(consul_agent: str) -> None:
    k = _name()
    async with ConsulHTTP(consul_agent) as c:
        status, headers, _ = await c.get(f"/v1/kv/{k}")
        assert status == 404 and "X-Consul-Index" in headers
        assert (await c.put(f"/v1/kv/{k}", data=b"hello", params={"flags": "42"}))[2] is True
        status, headers, body = await c.get(f"/v1/kv/{k}")
        entry = body[0]  # type: ignore[index]
        assert status == 200 and base64.b64decode(entry["Value"]) == b"hello" and entry["Flags"] == 42
        assert (
            entry["CreateIndex"] == entry["ModifyIndex"]
            and entry["LockIndex"] == 0
            and "Session" not in entry
        )
        status, _, raw = await c.get(f"/v1/kv/{k}", params={"raw": "1"})
        assert raw == "hello"
        await c.delete(f"/v1/kv/{k}")


async def test_recurse_and_keys_with_separator(consul_agent: str) -> None:
    p = _name()
    async with ConsulHTTP(consul_agent) as c:
        for key in ("a/1", "a/2", "b", "c/d/e"):
            await c.put(f"/v1/kv/{p}/{key}", data=key.encode())
        _, _, body = await c.get(f"/v1/kv/{p}/", params={"recurse": "1"})
        assert [e["Key"] for e in body] == [f"{p}/a/1", f"{p}/a/2", f"{p}/b", f"{p}/c/d/e"]  # type: ignore[union-attr]
        _, _, keys = await c.get(f"/v1/kv/{p}/", params={"keys": "1", "separator": "/"})
        assert keys == [f"{p}/a/", f"{p}/b", f"{p}/c/"]
        status, _, _ = await c.get(f"/v1/kv/{p}-nothing/", params={"recurse": "1"})
        assert status == 404
        assert (await c.delete(f"/v1/kv/{p}/a", params={"recurse": "1"}))[2] is True
        _, _, keys = await c.get(f"/v1/kv/{p}/", params={"keys": "1"})
        assert keys == [f"{p}/b", f"{p}/c/d/e"]
        await c.delete(f"/v1/kv/{p}", params={"recurse": "1"})


async def test_cas_put_and_delete(consul_agent: str) -> None:
    k = _name()
    async with ConsulHTTP(consul_agent) as c:
        assert (await c.put(f"/v1/kv/{k}", data=b"1", params={"cas": "0"}))[2] is True
        assert (await c.put(f"/v1/kv/{k}", data=b"2", params={"cas": "0"}))[2] is False  # exists already
        _, _, body = await c.get(f"/v1/kv/{k}")
        idx = body[0]["ModifyIndex"]  # type: ignore[index]
        assert (await c.put(f"/v1/kv/{k}", data=b"3", params={"cas": str(idx + 1000)}))[2] is False
        assert (await c.put(f"/v1/kv/{k}", data=b"3", params={"cas": str(idx)}))[2] is True
        assert (await c.put(f"/v1/kv/{k}", data=b"4", params={"cas": str(idx)}))[2] is False  # stale now
        _, _, body = await c.get(f"/v1/kv/{k}")
        idx2 = body[0]["ModifyIndex"]  # type: ignore[index]
        assert (await c.delete(f"/v1/kv/{k}", params={"cas": str(idx)}))[2] is False
        assert (await c.delete(f"/v1/kv/{k}", params={"cas": str(idx2)}))[2] is True
        assert (await c.get(f"/v1/kv/{k}"))[0] == 404


async def test_acquire_and_release(consul_agent: str) -> None:
    k = _name()
    async with ConsulHTTP(consul_agent) as c:
        s1, s2 = await _session(c, Name="one"), await _session(c, Name="two")
        assert (await c.put(f"/v1/kv/{k}", data=b"a", params={"acquire": s1}))[2] is True
        _, _, body = await c.get(f"/v1/kv/{k}")
        assert body[0]["Session"] == s1 and body[0]["LockIndex"] == 1  # type: ignore[index]
        assert (await c.put(f"/v1/kv/{k}", data=b"b", params={"acquire": s2}))[2] is False
        assert (await c.put(f"/v1/kv/{k}", data=b"c", params={"acquire": s1}))[2] is True  # holder may update
        assert (await c.put(f"/v1/kv/{k}", data=b"d", params={"release": s2}))[2] is False
        assert (await c.put(f"/v1/kv/{k}", data=b"e", params={"release": s1}))[2] is True
        _, _, body = await c.get(f"/v1/kv/{k}")
        entry = body[0]  # type: ignore[index]
        assert "Session" not in entry and entry["LockIndex"] == 1 and base64.b64decode(entry["Value"]) == b"e"
        assert (await c.put(f"/v1/kv/{k}", data=b"f", params={"acquire": s2}))[2] is True
        _, _, body = await c.get(f"/v1/kv/{k}")
        assert body[0]["LockIndex"] == 2 and body[0]["Session"] == s2  # type: ignore[index]
        # A plain put keeps the lock holder.
        assert (await c.put(f"/v1/kv/{k}", data=b"g"))[2] is True
        _, _, body = await c.get(f"/v1/kv/{k}")
        assert body[0]["Session"] == s2  # type: ignore[index]
        status, _, _ = await c.put(f"/v1/kv/{k}", data=b"x", params={"acquire": str(uuid.uuid4())})
        assert status == 500  # invalid session
        for s in (s1, s2):
            await c.put(f"/v1/session/destroy/{s}")
        await c.delete(f"/v1/kv/{k}")


async def test_value_limit_and_missing_key(consul_agent: str) -> None:
    k = _name()
    async with ConsulHTTP(consul_agent) as c:
        status, _, _ = await c.put(f"/v1/kv/{k}", data=b"x" * (512 * 1024 + 1))
        assert status == 413
        assert (await c.put(f"/v1/kv/{k}", data=b"x" * (512 * 1024)))[0] == 200
        assert (await c.put("/v1/kv/", data=b"x"))[0] == 400
        assert (await c.delete("/v1/kv/"))[0] == 400
        assert (await c.get("/v1/kv/"))[0] == 400
        await c.delete(f"/v1/kv/{k}")
