"""The discovery client against consul-dev with ACLs on (deny by default) and per-role tokens: each role
can do its job, and a missing permission is an error (and a log line) that names it."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import consul
import pytest

from dynamo_grpc import errors
from dynamo_grpc.discovery import ConsulPermissionDenied, ConsulSettings, Discovery, Instance
from dynamo_grpc.discovery.roles import acl_file, create_role_tokens
from tests.helpers.consul_dev import run_consul_dev

ROOT, WORKER, FRONTEND = "root-secret", "worker-secret", "frontend-secret"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = tmp_path_factory.mktemp("acl") / "acl.json"
    path.write_text(json.dumps(acl_file({"worker": WORKER, "frontend": FRONTEND})))
    with run_consul_dev(acl_token=ROOT, acl_file=str(path)) as a:
        yield a.address


def _discovery(address: str, token: str | None) -> Discovery:
    env = {"CONSUL_HTTP_ADDR": address, **({"CONSUL_HTTP_TOKEN": token} if token else {})}
    return Discovery(ConsulSettings.from_env(env), watch_wait=1.0)


async def _first(it: Any, predicate: Any, timeout: float = 10.0) -> Any:
    async def run() -> Any:
        async for snap in it:
            if predicate(snap):
                return snap
        return None

    return await asyncio.wait_for(run(), timeout)


async def test_worker_token_may_not_register_another_service(agent: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="dynamo_grpc.discovery.client")
    async with _discovery(agent, WORKER) as d:
        with pytest.raises(ConsulPermissionDenied) as err:
            await d.register(Instance("dynamo-frontend", "fe-x", "127.0.0.1", 1))
    assert isinstance(err.value, consul.ACLPermissionDenied) and isinstance(err.value, errors.PermissionDenied)
    assert err.value.denial is not None and err.value.denial.permission == "service:write"
    line = next(r.getMessage() for r in caplog.records if "consul denied" in r.getMessage())
    assert line.startswith("registering dynamo-frontend (fe-x): consul denied service:write on 'dynamo-frontend' ")
    assert "for this token (CONSUL_HTTP_TOKEN, AccessorID '" in line
    assert 'give its policy service "dynamo-frontend" { policy = "write" }' in line


async def test_worker_publishes_and_the_read_only_frontend_sees_it(
    agent: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="dynamo_grpc.discovery.client")
    async with _discovery(agent, WORKER) as worker, _discovery(agent, FRONTEND) as fe:
        await worker.register(Instance("dynamo-worker", "w-acl", "127.0.0.1", 7001), ttl=1.0)
        await worker.put_model_card("m-acl", "w-acl", {"block_size": 16})
        seen = await _first(fe.watch("dynamo-worker"), lambda s: [i.instance_id for i in s] == ["w-acl"])
        assert seen is not None
        assert (await fe.get_model_cards("m-acl")) == {"m-acl": {"w-acl": {"block_size": 16}}}
        await asyncio.sleep(1.5)  # beyond the TTL: the worker's heartbeats (service:write) keep it passing
        assert [i.instance_id for i in await _first(fe.watch("dynamo-worker"), lambda s: True)] == ["w-acl"]
        await fe.register(Instance("dynamo-frontend", "fe-acl", "127.0.0.1", 8001))  # its own service
        with pytest.raises(ConsulPermissionDenied, match="consul denied session:write"):
            await fe.put_model_card("m-acl", "fe-acl", {"forged": True})
        assert (await fe.get_model_cards("m-acl")) == {"m-acl": {"w-acl": {"block_size": 16}}}
    assert any(
        "publishing the model card of 'm-acl': consul denied session:write" in r.getMessage() for r in caplog.records
    )


async def test_anonymous_sees_nothing_and_may_register_nothing(agent: str) -> None:
    async with _discovery(agent, WORKER) as worker, _discovery(agent, None) as anon:
        await worker.register(Instance("dynamo-worker", "w-anon", "127.0.0.1", 7002))
        with pytest.raises(ConsulPermissionDenied, match=r"for the anonymous token \(no CONSUL_HTTP_TOKEN set\)"):
            await anon.register(Instance("dynamo-worker", "rogue", "127.0.0.1", 1))
        assert await _first(anon.watch("dynamo-worker"), lambda s: True) == []
        assert await anon.get_model_cards() == {}


async def test_role_tokens_minted_through_the_acl_api(agent: str) -> None:
    tokens = await asyncio.to_thread(create_role_tokens, agent, ROOT)
    again = await asyncio.to_thread(create_role_tokens, agent, ROOT)  # policies exist: reused, new tokens
    assert set(tokens) == {"worker", "router", "frontend"} and tokens["worker"].secret_id != again["worker"].secret_id
    async with _discovery(agent, tokens["router"].secret_id) as router:
        await router.register(Instance("dynamo-router", "r-acl", "127.0.0.1", 9001))
        with pytest.raises(ConsulPermissionDenied, match="service:write on 'dynamo-worker'"):
            await router.register(Instance("dynamo-worker", "r-as-worker", "127.0.0.1", 9002))
    async with _discovery(agent, "not-a-token") as bad:
        with pytest.raises(ConsulPermissionDenied, match="ACL not found"):
            await bad.get_model_cards()
