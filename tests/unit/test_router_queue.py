"""The router queue (ordering, bounds, cancellation), the load accounting it waits on, predicted prefixes
and the tie-break: what a client sees when every worker is busy or a burst shares a new prefix."""

from __future__ import annotations

import asyncio

import pytest

from dynamo_grpc.queueing import QueueFull, WaitQueue
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.router import AllBusy, RouteInput, Router, WorkerInfo

BS = 64


class Busy(Exception):
    pass


class Gate:
    """A resource with ``free`` slots: attempts take one or raise Busy."""

    def __init__(self, free: int = 0) -> None:
        self.free = free
        self.order: list[str] = []

    def attempt(self, name: str) -> str:
        if self.free <= 0:
            raise Busy(name)
        self.free -= 1
        self.order.append(name)
        return name


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("fcfs", ["big", "small", "mid"]), ("wspt", ["small", "mid", "big"])],
)
async def test_queue_orders_fcfs_by_arrival_and_wspt_by_cost(policy: str, expected: list[str]) -> None:
    gate = Gate()
    q: WaitQueue[str] = WaitQueue(8, policy, busy=Busy)
    tasks = [
        asyncio.create_task(q.admit(lambda n=name: gate.attempt(n), cost))
        for name, cost in (("big", 900.0), ("small", 10.0), ("mid", 100.0))
    ]
    await _settle()
    assert len(q) == 3 and gate.order == []
    gate.free = 3
    assert q.poke() == 3
    assert await asyncio.gather(*tasks) == ["big", "small", "mid"]  # each caller gets its own result
    assert gate.order == expected


async def test_queue_is_bounded_and_a_full_queue_refuses() -> None:
    gate = Gate()
    q: WaitQueue[str] = WaitQueue(2, busy=Busy)
    waiting = [asyncio.create_task(q.admit(lambda n=n: gate.attempt(n))) for n in ("a", "b")]
    await _settle()
    with pytest.raises(QueueFull, match="full"):
        await q.admit(lambda: gate.attempt("c"))
    assert q.refused == 1 and len(q) == 2
    gate.free = 2
    q.poke()
    assert await asyncio.gather(*waiting) == ["a", "b"]
    # no queue at all: busy goes straight back to the caller
    q0: WaitQueue[str] = WaitQueue(0, busy=Busy)
    with pytest.raises(Busy):
        await q0.admit(lambda: Gate().attempt("x"))


async def test_a_waiter_that_goes_away_leaves_the_queue_and_a_late_placement_is_released() -> None:
    gate = Gate()
    q: WaitQueue[str] = WaitQueue(4, busy=Busy)
    released: list[str] = []
    t1 = asyncio.create_task(q.admit(lambda: gate.attempt("gone")))
    t2 = asyncio.create_task(q.admit(lambda: gate.attempt("stays")))
    await _settle()
    t1.cancel()
    await _settle()
    assert len(q) == 1
    gate.free = 1
    q.poke()
    assert await t2 == "stays" and gate.order == ["stays"]  # the cancelled one took no slot
    # placed in the same tick as its caller was cancelled: the result is handed back
    t3 = asyncio.create_task(q.admit(lambda: gate.attempt("late"), release=released.append))
    await _settle()
    gate.free = 1
    q.poke()
    t3.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t3
    assert released == ["late"]


async def test_an_attempt_that_fails_otherwise_fails_only_its_caller() -> None:
    gate = Gate()
    q: WaitQueue[str] = WaitQueue(4, busy=Busy)

    def broken() -> str:
        if gate.free <= 0:
            raise Busy("wait")
        raise ValueError("bad request")

    t1 = asyncio.create_task(q.admit(broken))
    t2 = asyncio.create_task(q.admit(lambda: gate.attempt("ok")))
    await _settle()
    gate.free = 1
    q.poke()
    with pytest.raises(ValueError, match="bad request"):
        await t1
    assert await t2 == "ok"


# ---- the router ------------------------------------------------------------------------------


def make_router(n: int = 2, **kw: object) -> Router:
    r = Router(RouterConfig(block_size=BS, seed=3, **kw))  # type: ignore[arg-type]
    r.set_workers([WorkerInfo(f"w{i}", f"127.0.0.1:{9000 + i}", "m", BS, 1, 10_000) for i in range(n)])
    r.ready = True
    return r


def prompt(blocks: int, salt: int) -> list[int]:
    return [salt * 100_000 + i for i in range(blocks * BS)]


def test_load_accounting_route_prefill_done_free_migration_and_cancel() -> None:
    r = make_router(2, predicted_ttl_s=0)
    res = r.route(RouteInput("a", token_ids=prompt(5, 1), expected_output_tokens=2 * BS))
    key = (res.instance_id, 0)
    other = ("w1", 0) if key == ("w0", 0) else ("w0", 0)
    t = r._table()
    slot = t.slot_of[key]
    assert (r.active.load(key).prefill_blocks, r.active.load(key).decode_blocks) == (5, 7)
    assert (t.prefill[slot], t.decode[slot]) == (5, 7)
    # prefill done: the prefill part goes, the blocks it holds stay and grow with the output
    assert r.prefill_done("a", output_tokens=3 * BS)
    assert (r.active.load(key).prefill_blocks, r.active.load(key).decode_blocks) == (0, 8)
    assert (t.prefill[slot], t.decode[slot]) == (0, 8)
    # migration: the same request routed again away from its worker moves its load there
    moved = r.route(RouteInput("a", token_ids=prompt(5, 1), exclude=[key[0]], expected_output_tokens=2 * BS))
    assert (moved.instance_id, 0) == other
    assert r.active.load(key).decode_blocks == 0 and t.decode[slot] == 0
    assert r.active.load(other).prefill_blocks == 5
    # cancellation frees everything, once
    assert r.free("a") and not r.free("a")
    assert len(r.active) == 0 and t.prefill.sum() == 0 and t.decode.sum() == 0


def test_a_cached_prefix_is_shared_not_counted_twice() -> None:
    r = make_router(1, predicted_ttl_s=0)
    from dynamo_grpc.tokens.block_hash import block_hash_list

    tokens = prompt(6, 2)
    r.indexer.store(("w0", 0), block_hash_list(tokens, BS)[:4])
    res = r.route(RouteInput("a", token_ids=tokens, expected_output_tokens=BS))
    assert res.overlap_blocks == 4
    load = r.active.load(("w0", 0))
    assert (load.prefill_blocks, load.decode_blocks) == (2, 3)  # 2 uncached prompt blocks + 1 output block
    r.prefill_done("a", output_tokens=BS + 1)  # crossed into a second output block
    assert r.active.load(("w0", 0)).decode_blocks == 4


async def test_every_worker_busy_the_request_waits_in_the_router_and_takes_the_freed_worker() -> None:
    # busy: more than 1 x 256 tokens (4 blocks) of prefill pending
    r = make_router(2, queue_threshold=1.0, max_num_batched_tokens=4 * BS, queue_size=1, predicted_ttl_s=0)
    a = r.route(RouteInput("a", token_ids=prompt(5, 1)))
    b = r.route(RouteInput("b", token_ids=prompt(5, 2)))
    assert {a.instance_id, b.instance_id} == {"w0", "w1"}
    with pytest.raises(AllBusy, match="prefill pending"):
        r.route(RouteInput("x", token_ids=prompt(1, 3), dry_run=True))
    waiting = asyncio.create_task(r.route_wait(RouteInput("c", token_ids=prompt(2, 4))))
    await _settle()
    assert not waiting.done() and "c" not in r.active
    # the queue holds one: the next is refused with a clear error, and nothing of it is left behind
    with pytest.raises(AllBusy, match="router queue is full"):
        await r.route_wait(RouteInput("d", token_ids=prompt(2, 5)))
    assert "d" not in r.active
    r.prefill_done("b")  # b's worker has room again: c goes there, not where a still prefills
    c = await asyncio.wait_for(waiting, 1.0)
    assert c.instance_id == b.instance_id and "c" in r.active


async def test_a_client_that_leaves_the_router_queue_leaves_no_load() -> None:
    r = make_router(1, queue_threshold=1.0, max_num_batched_tokens=4 * BS, predicted_ttl_s=0)
    r.route(RouteInput("a", token_ids=prompt(5, 1)))
    waiting = asyncio.create_task(r.route_wait(RouteInput("c", token_ids=prompt(2, 4))))
    await _settle()
    assert r.queue is not None and len(r.queue) == 1
    waiting.cancel()
    await _settle()
    assert len(r.queue) == 0
    r.free("a")
    assert len(r.active) == 0 and r._table().prefill.sum() == 0


async def test_default_busy_threshold_is_on_and_kv_usage_over_it_queues() -> None:
    r = make_router(2)
    assert r.config.busy_threshold < 1.0
    for w in ("w0", "w1"):
        r.set_load((w, 0), 9_700, 10_000, waiting=4, running=30)
    waiting = asyncio.create_task(r.route_wait(RouteInput("a", token_ids=prompt(2, 1))))
    await _settle()
    assert not waiting.done()
    r.set_load(("w1", 0), 5_000, 10_000)  # w1 reports free KV: the waiting request goes there
    assert (await asyncio.wait_for(waiting, 1.0)).instance_id == "w1"
    # without a queue the same situation is RESOURCE_EXHAUSTED at once
    r0 = make_router(2, queue_size=0)
    for w in ("w0", "w1"):
        r0.set_load((w, 0), 9_700, 10_000)
    with pytest.raises(AllBusy, match="busy threshold"):
        await r0.route_wait(RouteInput("a", token_ids=prompt(2, 1)))


def test_predicted_prefix_keeps_a_burst_together_until_events_arrive() -> None:
    shared = prompt(20, 7)

    def burst(r: Router) -> tuple[str, str]:
        first = r.route(RouteInput("r1", token_ids=[*shared, *prompt(1, 8)]))
        r.prefill_done("r1")  # first token out, but the worker's KV events have not reached the router yet
        second = r.route(RouteInput("r2", token_ids=[*shared, *prompt(1, 9)]))
        return first.instance_id, second.instance_id

    first, second = burst(make_router(2))
    assert first == second
    first, second = burst(make_router(2, predicted_ttl_s=0))
    assert first != second  # without the prediction the second copy of the prefix goes elsewhere
    # the prediction expires after its TTL
    r = make_router(2, predicted_ttl_s=5.0)
    now = [0.0]
    assert r.predicted is not None
    r.predicted.clock = lambda: now[0]
    r.route(RouteInput("r1", token_ids=shared))
    assert max(r._selector_overlaps(r.hashes_for(RouteInput("q", token_ids=shared))).values()) == 20
    now[0] = 6.0
    assert r._selector_overlaps(r.hashes_for(RouteInput("q", token_ids=shared))) == {}


def test_equal_costs_go_to_the_worker_reporting_the_shortest_queue() -> None:
    for seed in range(5):
        r = Router(RouterConfig(block_size=BS, seed=seed))
        r.set_workers([WorkerInfo(f"w{i}", f"h:{i}", "m", BS, 1, 10_000) for i in range(3)])
        r.ready = True
        r.set_load(("w0", 0), 10, 10_000, waiting=3, running=1)
        r.set_load(("w1", 0), 10, 10_000, waiting=0, running=1)
        r.set_load(("w2", 0), 10, 10_000, waiting=1, running=2)
        assert r.route(RouteInput("a", token_ids=prompt(2, seed), dry_run=True)).instance_id == "w1"


async def test_queue_depth_and_refusals_are_exported() -> None:
    from types import SimpleNamespace

    from prometheus_client import generate_latest

    from dynamo_grpc.router.metrics import RouterMetrics

    r = make_router(1, queue_threshold=1.0, max_num_batched_tokens=4 * BS, queue_size=1, predicted_ttl_s=0)
    m = RouterMetrics()
    m.track(SimpleNamespace(router=r, config=SimpleNamespace(model="m"), router_id="x", sub=None, active_sync=None))  # type: ignore[arg-type]
    r.route(RouteInput("a", token_ids=prompt(5, 1)))
    waiting = asyncio.create_task(r.route_wait(RouteInput("b", token_ids=prompt(1, 2))))
    await _settle()
    with pytest.raises(AllBusy):
        await r.route_wait(RouteInput("c", token_ids=prompt(1, 3)))
    text = generate_latest(m.registry()).decode()
    assert 'dynamo_router_queue_depth{model="m"} 1.0' in text
    assert 'dynamo_router_queue_refused_total{model="m"} 1.0' in text
    r.free("a")
    await asyncio.wait_for(waiting, 1.0)
    assert 'dynamo_router_queue_dispatched_total{model="m"} 1.0' in generate_latest(m.registry()).decode()
