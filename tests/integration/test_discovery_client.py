"""The discovery client against a live agent: register/watch/deregister, model cards, settings from env."""

# ruff: noqa: F811  (pytest fixtures imported from tests.helpers.consul_dev)

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from dynamo_grpc.discovery import ConsulSettings, Discovery, Instance
from dynamo_grpc.discovery.agent import ensure_agent
from tests.helpers.consul_dev import consul_agent  # noqa: F401


def _settings(addr: str) -> ConsulSettings:
    import os

    real = os.environ.get("CONSUL_HTTP_ADDR", "")
    token = os.environ.get("CONSUL_HTTP_TOKEN") if real and real in addr else None
    return ConsulSettings.from_addr(addr, token=token)


async def _next(it: AsyncIterator[list[Instance]], timeout: float = 10.0) -> list[Instance]:
    return await asyncio.wait_for(it.__anext__(), timeout)


async def _until(it: AsyncIterator[list[Instance]], ids: list[str], timeout: float = 10.0) -> list[Instance]:
    async def loop() -> list[Instance]:
        while True:
            snap = await it.__anext__()
            if [i.instance_id for i in snap] == ids:
                return snap

    return await asyncio.wait_for(loop(), timeout)


async def test_register_watch_deregister(consul_agent: str) -> None:
    svc = f"dynamo-test-{uuid.uuid4().hex[:8]}"
    async with (
        Discovery(_settings(consul_agent), watch_wait=5) as watcher,
        Discovery(_settings(consul_agent)) as worker,
    ):
        snaps = watcher.watch(svc)
        assert await _next(snaps) == []
        inst = Instance(svc, f"{svc}-w1", "127.0.0.1", 7001, ["m1", "decode"], {"grpc": "127.0.0.1:7001"})
        await worker.register(inst, ttl=3.0)
        (seen,) = await _until(snaps, [inst.instance_id])
        assert seen == inst
        other = Instance(svc, f"{svc}-w2", "127.0.0.1", 7002, ["m1", "prefill"], {})
        await worker.register(other, ttl=3.0)
        await _until(snaps, [inst.instance_id, other.instance_id])
        tagged = watcher.watch(svc, tags=["prefill"])
        assert [i.instance_id for i in await _next(tagged)] == [other.instance_id]
        await asyncio.sleep(1.5)  # heartbeats (every ttl/3) keep both passing past their TTL
        await worker.deregister(inst.instance_id)
        await _until(snaps, [other.instance_id])
        await asyncio.sleep(2.0)
        assert [i.instance_id for i in await watcher_snapshot(watcher, svc)] == [other.instance_id]
        await snaps.aclose()  # type: ignore[attr-defined]
        await tagged.aclose()  # type: ignore[attr-defined]


async def watcher_snapshot(d: Discovery, svc: str) -> list[Instance]:
    it = d.watch(svc)
    try:
        return await _next(it)
    finally:
        await it.aclose()  # type: ignore[attr-defined]


async def test_model_cards_follow_the_instance(consul_agent: str) -> None:
    svc = f"dynamo-test-{uuid.uuid4().hex[:8]}"
    model = f"org/model-{uuid.uuid4().hex[:6]}"  # model names may contain '/'
    async with (
        Discovery(_settings(consul_agent), watch_wait=5) as reader,
        Discovery(_settings(consul_agent)) as worker,
    ):
        inst = Instance(svc, f"{svc}-w1", "127.0.0.1", 7001)
        with pytest.raises(ValueError, match="not registered"):
            await worker.put_model_card(model, inst.instance_id, {})
        await worker.register(inst, ttl=3.0)
        cards = reader.watch_model_cards(model)
        assert await asyncio.wait_for(cards.__anext__(), 10) == {}
        card = {
            "model": model,
            "tokenizer": "gguf",
            "chat_template": "{{ messages }}",
            "context_length": 2048,
            "block_size": 16,
            "kv_blocks": 512,
        }
        await worker.put_model_card(model, inst.instance_id, card)
        assert await asyncio.wait_for(cards.__anext__(), 10) == {model: {inst.instance_id: card}}
        assert await reader.get_model_cards(model) == {model: {inst.instance_id: card}}
        assert (await reader.get_model_cards()).get(model) == {inst.instance_id: card}
        with pytest.raises(ValueError, match="value limit"):
            await worker.put_model_card(model, inst.instance_id, {"blob": "x" * (512 * 1024)})
        await worker.deregister()
        assert await asyncio.wait_for(cards.__anext__(), 10) == {}
        await cards.aclose()  # type: ignore[attr-defined]


async def test_card_key_rejects_ambiguous_names(consul_agent: str) -> None:
    async with Discovery(_settings(consul_agent)) as d:
        inst = Instance("dynamo-test", f"i-{uuid.uuid4().hex[:6]}", "127.0.0.1", 1)
        await d.register(inst)
        for model in ("", "/abs", "trailing/"):
            with pytest.raises(ValueError):
                await d.put_model_card(model, inst.instance_id, {})


def test_settings_from_env() -> None:
    s = ConsulSettings.from_env({})
    assert (s.scheme, s.host, s.port, s.token, s.verify) == ("http", "127.0.0.1", 8500, None, True)
    s = ConsulSettings.from_env(
        {
            "CONSUL_HTTP_ADDR": "consul.local:8501",
            "CONSUL_HTTP_SSL": "true",
            "CONSUL_CACERT": "/ca.pem",
            "CONSUL_CLIENT_CERT": "/c.pem",
            "CONSUL_CLIENT_KEY": "/k.pem",
            "CONSUL_HTTP_TOKEN": "tok",
        }
    )
    assert (s.scheme, s.host, s.port, s.token) == ("https", "consul.local", 8501, "tok")
    assert s.verify == "/ca.pem" and s.cert == ("/c.pem", "/k.pem")
    s = ConsulSettings.from_env(
        {
            "CONSUL_HTTP_ADDR": "https://10.0.0.1:8501",
            "CONSUL_HTTP_SSL_VERIFY": "false",
            "CONSUL_CACERT": "/ca.pem",
        }
    )
    assert (s.scheme, s.verify) == ("https", False)
    with pytest.raises(ValueError):
        ConsulSettings.from_env({"CONSUL_HTTP_ADDR": "unix:///tmp/consul.sock"})
    with pytest.raises(ValueError):
        ConsulSettings.from_env({"CONSUL_CLIENT_KEY": "/k.pem"})


async def test_token_from_settings_reaches_an_acl_agent() -> None:
    from tests.helpers.consul_dev import run_consul_dev

    with run_consul_dev(acl_token="tok") as agent:
        async with Discovery(ConsulSettings.from_addr(agent.address, token="tok")) as good:
            await good.register(Instance("dynamo-x", "x1", "127.0.0.1", 1))
        async with Discovery(ConsulSettings.from_addr(agent.address)) as anonymous:
            import consul

            with pytest.raises(consul.ACLPermissionDenied):
                await anonymous.register(Instance("dynamo-x", "x2", "127.0.0.1", 1))


def test_ensure_agent_prefers_consul_http_addr(tmp_path: object) -> None:
    handle = ensure_agent({"CONSUL_HTTP_ADDR": "10.1.2.3:8500", "PATH": ""})
    assert handle.kind == "external" and handle.address == "http://10.1.2.3:8500" and handle.process is None
    import os

    handle = ensure_agent({"PATH": "", **{k: v for k, v in os.environ.items() if k == "PYTHONPATH"}})
    try:
        assert handle.kind == "consul-dev" and handle.process is not None
        import urllib.request

        with urllib.request.urlopen(f"{handle.address}/v1/status/leader", timeout=5) as resp:
            assert resp.status == 200
    finally:
        handle.stop()
    assert handle.process.poll() is not None


def test_settings_from_env_with_an_explicit_address() -> None:
    s = ConsulSettings.from_env({"CONSUL_HTTP_TOKEN": "tok", "CONSUL_CACERT": "/ca.pem"}, addr="https://h:1")
    assert (s.scheme, s.host, s.port, s.token, s.verify) == ("https", "h", 1, "tok", "/ca.pem")


async def test_duplicate_instance_cannot_steal_a_live_card_and_sessions_do_not_leak(
    consul_agent: str,
) -> None:
    import aiohttp

    svc = f"dynamo-test-{uuid.uuid4().hex[:8]}"
    model = f"m-{uuid.uuid4().hex[:6]}"
    settings = _settings(consul_agent)
    headers = {"X-Consul-Token": settings.token} if settings.token else {}
    async with Discovery(settings) as first, Discovery(settings) as second:
        inst = Instance(svc, f"{svc}-dup", "127.0.0.1", 7001)
        await first.register(inst, ttl=5.0)
        await first.put_model_card(model, inst.instance_id, {"owner": "first"})
        await second.register(inst, ttl=5.0)  # same ID: replaces the service, keeps the check passing
        with pytest.raises(RuntimeError, match="held by another live session"):
            await second.put_model_card(model, inst.instance_id, {"owner": "second"})
        assert (await second.get_model_cards(model))[model][inst.instance_id] == {"owner": "first"}
        await first.deregister()
        await second.deregister()
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.get(f"{consul_agent}/v1/session/list") as resp:
            sessions = await resp.json()
    assert not [s for s in sessions if s["Name"] == f"dynamo-card:{svc}-dup"]
