"""A request waiting in the router queue (every worker busy) is placed, or fails with a clear error, on
every membership change a planner or a slow registration causes: a worker joins, a skipped worker
becomes usable, the busy worker leaves. A missed wake-up here is a request that never finishes."""

from __future__ import annotations

import asyncio

import pytest

from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.router import NoWorkers, RouteInput, Router, WorkerInfo

BS = 64


def _worker(i: int) -> WorkerInfo:
    return WorkerInfo(f"w{i}", f"127.0.0.1:{9000 + i}", "m", BS, 1, 10_000)


def _busy_router(skipped: set[str] | None = None) -> Router:
    r = Router(RouterConfig(block_size=BS, seed=3, predicted_ttl_s=0))
    skip = skipped if skipped is not None else set()
    r.usable = lambda iid: iid not in skip
    r.set_workers([_worker(0)])
    r.ready = True
    r.set_load(("w0", 0), 9_900, 10_000)  # over the default busy threshold
    return r


def _prompt(salt: int) -> list[int]:
    return [salt * 100_000 + i for i in range(2 * BS)]


async def _waiting(r: Router, rid: str) -> asyncio.Task[object]:
    task: asyncio.Task[object] = asyncio.create_task(r.route_wait(RouteInput(rid, token_ids=_prompt(1))))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not task.done() and r.queue is not None and len(r.queue) == 1
    return task


async def test_a_worker_that_joins_takes_the_waiting_request() -> None:
    r = _busy_router()
    task = await _waiting(r, "a")
    r.set_workers([_worker(0), _worker(1)])  # the planner started a worker
    res = await asyncio.wait_for(task, 10.0)
    assert res.instance_id == "w1"  # type: ignore[attr-defined]


async def test_a_skipped_worker_that_becomes_usable_takes_the_waiting_request() -> None:
    skipped = {"w1"}  # registered before its card session (validate.card_problem): skipped for now
    r = _busy_router(skipped)
    r.set_workers([_worker(0), _worker(1)])
    task = await _waiting(r, "a")
    skipped.clear()  # re-registered with its card_session: the view clears it and tells the router
    r.usable_changed()
    res = await asyncio.wait_for(task, 10.0)
    assert res.instance_id == "w1"  # type: ignore[attr-defined]


async def test_the_busy_worker_leaving_fails_the_waiting_request_clearly() -> None:
    r = _busy_router()
    task = await _waiting(r, "a")
    r.set_workers([])  # drained by the planner and deregistered
    with pytest.raises(NoWorkers, match="no live worker"):
        await asyncio.wait_for(task, 10.0)
    assert r.queue is not None and len(r.queue) == 0
