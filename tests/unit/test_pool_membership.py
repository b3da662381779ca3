"""Pool membership follows the Consul tag: a worker re-registered in another pool leaves the old pool's index
and load and joins the new pool's, with real RouterNodes (the global router's per-pool nodes) fed by a stand-in
discovery that yields the snapshots Consul's blocking queries would."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any, cast

from dynamo_grpc.discovery import Discovery, Instance
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.node import RouterNode


class Snapshots:
    """The two calls RouterNode makes on Discovery: watch() snapshots (pushed by the test) and model cards (none)."""

    def __init__(self) -> None:
        self.queues: list[asyncio.Queue[list[Instance]]] = []

    def watch(self, service: str, tags: list[str] | None = None) -> AsyncIterator[list[Instance]]:
        q: asyncio.Queue[list[Instance]] = asyncio.Queue()
        if service == "dynamo-worker":
            self.queues.append(q)

        async def gen() -> AsyncIterator[list[Instance]]:
            while True:
                yield await q.get()

        return gen()

    def push(self, snapshot: list[Instance]) -> None:
        for q in self.queues:
            q.put_nowait(snapshot)

    async def get_model_card_entries(self, model: str) -> dict[str, Any]:
        return {}


def worker(pool: str) -> Instance:
    meta = {"grpc_address": "127.0.0.1:9", "model": "m", "block_size": "16", "kv_blocks": "64"}
    tags = ["namespace=dynamo", "model=m", "role=worker", f"pool={pool}"]
    return Instance("dynamo-worker", "w1", "127.0.0.1", 9, tags=tags, meta=meta)


async def settle(cond: Any) -> None:
    for _ in range(200):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("timed out")


def test_a_worker_that_changes_pool_moves_between_the_pools_routers() -> None:
    async def go() -> None:
        disc = Snapshots()
        cfg = RouterConfig(mode="round-robin", model="m")
        nodes = {
            p: RouterNode(dataclasses.replace(cfg), cast(Discovery, disc), f"g/{p}", share_active=False, pool=p)
            for p in ("a", "b")
        }
        for n in nodes.values():
            n.start()
        try:
            await settle(lambda: len(disc.queues) == 2)  # both nodes are watching
            disc.push([worker("a")])
            await settle(lambda: "w1" in nodes["a"].router.workers)
            assert not nodes["b"].router.workers
            nodes["a"].router.indexer.store(("w1", 0), [11, 12, 13])  # what its KV events had said
            nodes["a"].router.active.add("r1", ("w1", 0), 3, 3, 48, "g/a")
            disc.push([worker("b")])  # re-registered with --pool b
            await settle(lambda: "w1" in nodes["b"].router.workers)
            assert not nodes["a"].router.workers
            # pool a forgot its blocks and its load: nothing there attracts or weighs a request any more
            assert nodes["a"].router.indexer.overlaps([11, 12, 13]) == {}
            assert "r1" not in nodes["a"].router.active
        finally:
            for n in nodes.values():
                await n.close()

    asyncio.run(go())
