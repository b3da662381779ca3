"""Start consul-dev as a real subprocess on an ephemeral port, for any test that needs discovery.

    from tests.helpers.consul_dev import consul_dev  # noqa: F401  (the fixture: yields "http://127.0.0.1:PORT")

    def test_x(consul_dev): ...

or, outside pytest fixtures, ``with run_consul_dev() as agent: agent.address``. ``consul_agent`` is a
fixture parametrized over consul-dev and, when CONSUL_HTTP_ADDR is set, that real agent.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from dynamo_grpc.discovery.agent import AgentHandle, start_consul_dev, wait_ready


class ConsulDevProcess:
    """A running consul-dev. ``restart()`` brings it back on the same port with empty state."""

    def __init__(
        self,
        *,
        acl_token: str = "",
        time_scale: float | None = None,
        acl_file: str | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.acl_token = acl_token
        self.time_scale = time_scale
        self.acl_file = acl_file
        self.extra_args = extra_args
        self.handle: AgentHandle = start_consul_dev(0, **self._kw())
        self.address = self.handle.address
        self.port = self.handle.port

    @property
    def pid(self) -> int:
        assert self.handle.process is not None
        return self.handle.process.pid

    def _kw(self) -> dict[str, Any]:
        return {
            "acl_token": self.acl_token,
            "time_scale": self.time_scale,
            "acl_file": self.acl_file,
            "extra_args": self.extra_args,
        }

    def start(self) -> None:
        self.handle = start_consul_dev(self.port, **self._kw())

    def stop(self) -> None:
        self.handle.stop()

    def kill(self) -> None:
        self.handle.kill()

    def restart(self) -> None:
        self.stop()
        self.start()
        wait_ready(self.address, 10.0, self.handle.process, self.acl_token or None)


@contextmanager
def run_consul_dev(
    *,
    acl_token: str = "",
    time_scale: float | None = None,
    acl_file: str | None = None,
    extra_args: list[str] | None = None,
) -> Iterator[ConsulDevProcess]:
    """``acl_token``: ACLs on (deny) with that management token; ``acl_file``: policies and tokens to load
    (consul-dev's ``--acl-file``); ``extra_args``: more consul-dev flags (e.g. ``--acl``)."""
    agent = ConsulDevProcess(acl_token=acl_token, time_scale=time_scale, acl_file=acl_file, extra_args=extra_args)
    try:
        yield agent
    finally:
        agent.kill()


@pytest.fixture
def consul_dev_process() -> Iterator[ConsulDevProcess]:
    with run_consul_dev() as agent:
        yield agent


@pytest.fixture
def consul_dev(consul_dev_process: ConsulDevProcess) -> str:
    """The address (``http://127.0.0.1:PORT``) of a fresh consul-dev subprocess."""
    return consul_dev_process.address


REAL_AGENT = os.environ.get("CONSUL_HTTP_ADDR", "")


@pytest.fixture(scope="module", params=["consul-dev", pytest.param("real", marks=pytest.mark.real_consul)])
def consul_agent(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each test twice: against consul-dev (one per module; use unique names) and against the agent at
    CONSUL_HTTP_ADDR (skipped if unset)."""
    if request.param == "real":
        if not REAL_AGENT:
            pytest.skip("CONSUL_HTTP_ADDR not set: no real Consul agent to test against")
        addr = REAL_AGENT if "//" in REAL_AGENT else f"http://{REAL_AGENT}"
        yield addr
        return
    with run_consul_dev() as agent:
        yield agent.address


class ConsulHTTP:
    """A bare HTTP client for asserting on Consul's wire behaviour (status codes, headers, bodies)."""

    def __init__(self, address: str, token: str | None = None) -> None:
        import aiohttp

        self.address = address.rstrip("/")
        self.token = (
            token
            if token is not None
            else (
                os.environ.get("CONSUL_HTTP_TOKEN")
                if address == REAL_AGENT or f"http://{REAL_AGENT}" == address
                else None
            )
        )
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))

    async def __aenter__(self) -> ConsulHTTP:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | list[tuple[str, str]] | None = None,
        body: object = None,
        data: bytes | str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], object]:
        import json as _json

        hdrs = dict(headers or {})
        if self.token and "X-Consul-Token" not in hdrs:
            hdrs["X-Consul-Token"] = self.token
        payload = _json.dumps(body) if body is not None else data
        async with self._session.request(
            method, self.address + path, params=params, data=payload, headers=hdrs
        ) as resp:
            raw = await resp.read()
            parsed: object = raw.decode(errors="replace")
            if resp.content_type == "application/json" and raw:
                parsed = _json.loads(raw)
            return resp.status, dict(resp.headers), parsed

    async def get(self, path: str, **kw: object) -> tuple[int, dict[str, str], object]:
        return await self.call("GET", path, **kw)  # type: ignore[arg-type]

    async def put(self, path: str, **kw: object) -> tuple[int, dict[str, str], object]:
        return await self.call("PUT", path, **kw)  # type: ignore[arg-type]

    async def delete(self, path: str, **kw: object) -> tuple[int, dict[str, str], object]:
        return await self.call("DELETE", path, **kw)  # type: ignore[arg-type]
