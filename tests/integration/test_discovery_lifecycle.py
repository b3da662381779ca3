"""Worker processes come and go: SIGKILL leaves the passing set within TTL + 1 s (and its card vanishes),
a clean stop deregisters at once, and watchers survive a consul-dev restart.

Run as a script, this module is the worker: ``python test_discovery_lifecycle.py ADDR SERVICE ID TTL MODEL``.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.helpers.consul_dev)

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from dynamo_grpc.discovery import ConsulSettings, Discovery, Instance
from tests.helpers.consul_dev import consul_dev, consul_dev_process  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]
TTL = 2.0


async def _worker(addr: str, service: str, instance_id: str, ttl: float, model: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with Discovery(ConsulSettings.from_addr(addr)) as d:
        await d.register(
            Instance(service, instance_id, "127.0.0.1", 7000, ["m"], {"grpc": "127.0.0.1:7000"}), ttl=ttl
        )
        await d.put_model_card(model, instance_id, {"model": model, "block_size": 16, "kv_blocks": 64})
        print("ready", flush=True)
        await stop.wait()
        await d.deregister()


class Collector:
    """Consume an async iterator in the background, recording (monotonic time, item)."""

    def __init__(self, it: AsyncIterator[Any]) -> None:
        self.items: list[tuple[float, Any]] = []
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._run(it))

    async def _run(self, it: AsyncIterator[Any]) -> None:
        async for item in it:
            self.items.append((time.monotonic(), item))
            self._changed.set()

    async def wait_for(self, pred: Any, timeout: float) -> float:
        """Wait until the newest item satisfies ``pred``; return when it arrived."""
        deadline = time.monotonic() + timeout
        while True:
            if self.items and pred(self.items[-1][1]):
                return self.items[-1][0]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"condition not met; last items: {self.items[-3:]}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    async def close(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass


def _ids(snap: list[Instance]) -> list[str]:
    return [i.instance_id for i in snap]


def _spawn_worker(addr: str, service: str, instance_id: str, model: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "gen"), str(ROOT)]))
    proc = subprocess.Popen(
        [sys.executable, __file__, addr, service, instance_id, str(TTL), model],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise RuntimeError(f"worker did not start: {line!r}")
    return proc


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
async def test_worker_death_and_clean_stop(consul_dev: str, how: str) -> None:
    service, model = "dynamo-worker", "tiny/model"
    async with Discovery(ConsulSettings.from_addr(consul_dev), watch_wait=10) as watcher:
        instances = Collector(watcher.watch(service))
        cards = Collector(watcher.watch_model_cards(model))
        proc = _spawn_worker(consul_dev, service, "w1", model)
        try:
            await instances.wait_for(lambda s: _ids(s) == ["w1"], 10)
            await cards.wait_for(lambda c: set(c.get(model, {})) == {"w1"}, 10)
            t0 = time.monotonic()
            if how == "sigkill":
                proc.kill()
            else:
                proc.terminate()
                assert proc.wait(10) == 0
                # Deregistered, not merely critical: the agent no longer has the service at all, and the
                # card is gone, the moment the worker has exited (a lapsed TTL would leave both for a while).
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"{consul_dev}/v1/agent/services") as resp:
                        assert "w1" not in await resp.json()
                    async with http.get(f"{consul_dev}/v1/kv/dynamo/models/{model}/w1") as resp:
                        assert resp.status == 404
            gone = await instances.wait_for(lambda s: _ids(s) == [], TTL + 5)
            card_gone = await cards.wait_for(lambda c: c == {}, TTL + 5)
            if how == "sigkill":
                # The TTL lapsed: still registered (critical) until DeregisterCriticalServiceAfter.
                async with aiohttp.ClientSession() as http:
                    async with http.get(f"{consul_dev}/v1/agent/checks") as resp:
                        assert (await resp.json())["service:w1"]["Status"] == "critical"
        finally:
            proc.kill()
            proc.wait()
            await instances.close()
            await cards.close()
    if how == "sigkill":
        # The TTL check lapses, the instance leaves the passing set, and the card session is invalidated.
        assert gone - t0 <= TTL + 1.0, gone - t0
        assert card_gone - t0 <= TTL + 1.0, card_gone - t0


async def test_watchers_survive_agent_restart(consul_dev_process: Any) -> None:
    agent = consul_dev_process
    addr, service, model = agent.address, "dynamo-worker", "tiny/model"
    async with (
        Discovery(ConsulSettings.from_addr(addr), watch_wait=10, backoff=(0.05, 0.5)) as watcher,
        Discovery(ConsulSettings.from_addr(addr), backoff=(0.05, 0.5)) as workers,
    ):
        for iid in ("w1", "w2"):
            await workers.register(Instance(service, iid, "127.0.0.1", 7000), ttl=TTL)
            await workers.put_model_card(model, iid, {"instance": iid})
        instances = Collector(watcher.watch(service))
        cards = Collector(watcher.watch_model_cards(model))
        try:
            await instances.wait_for(lambda s: _ids(s) == ["w1", "w2"], 10)
            seen_before = len(instances.items)
            agent.kill()
            await asyncio.sleep(1.0)
            # While the agent is down nothing is yielded: no empty or partial view.
            assert len(instances.items) == seen_before
            agent.start()
            await instances.wait_for(lambda s: _ids(s) == ["w1", "w2"], 15)
            await cards.wait_for(lambda c: set(c.get(model, {})) == {"w1", "w2"}, 15)
            # And it keeps following changes after the restart.
            await workers.deregister("w1")
            await instances.wait_for(lambda s: _ids(s) == ["w2"], 10)
        finally:
            await instances.close()
            await cards.close()


if __name__ == "__main__":
    a = sys.argv[1:]
    asyncio.run(_worker(a[0], a[1], a[2], float(a[3]), a[4]))
