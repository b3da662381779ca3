"""The cache-aware router queue: when a worker gets room, it takes the waiting request whose prefix it holds
on the device, not the oldest (a host-tier copy does not reorder the queue: it is not lost by waiting), and
leaves a request whose prefix waits on a busy worker (any tier) to that worker; the age cap hands the oldest
its turn back; a request whose allowed workers are all busy does not hold up the
others. Against fcfs on the same queue, so the difference a user sees (cached tokens) is what is asserted.

The index is fed through the real event codec (events.proto -> the router's sink), as a worker would."""

from __future__ import annotations

import asyncio

import pytest

from dynamo_grpc.events.codec import make_batch
from dynamo_grpc.events.kv import KvEvent, KvStored, StoredBlock
from dynamo_grpc.queueing import WaitQueue
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.flags import add_router_flags, router_config_from_args
from dynamo_grpc.router.router import RouteInput, Router, RouteResult, WorkerInfo
from dynamo_grpc.router.sync import IndexSink

BS = 4
P0 = [1001, 1002, 1003, 1004]  # cached on w0 (on the device; in host memory (G2) where a test says so)
P1 = [2001, 2002, 2003, 2004]  # cached on w1, on the device


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _feed(sink: IndexSink, worker: str, events: list[KvEvent]) -> None:
    sink.apply_batch(make_batch(worker, 0, 1, 7, BS, events, 0.0))


def _router(policy: str, clock: Clock | None = None, p0_medium: str = "device") -> Router:
    """Two workers, each busy with a 5-block prefill (a rank with more than 4 blocks of prefill pending is
    busy: --router-queue-threshold 1 at 16 tokens per step); w0 holds P0 (in ``p0_medium``), w1 holds P1."""
    cfg = RouterConfig(
        block_size=BS,
        seed=1,
        busy_threshold=1.0,
        queue_threshold=1.0,
        max_num_batched_tokens=4 * BS,
        queue_policy=policy,
        predicted_ttl_s=0,
    )
    r = Router(cfg)
    if clock is not None and r.queue is not None:
        r.queue.clock = clock
    r.set_workers([WorkerInfo(f"w{i}", f"127.0.0.1:{9000 + i}", block_size=BS) for i in range(2)])
    r.ready = True
    sink = IndexSink(r)
    _feed(sink, "w0", [KvStored(None, [StoredBlock(h, h) for h in P0], p0_medium)])
    _feed(sink, "w1", [KvStored(None, [StoredBlock(h, h) for h in P1])])
    assert r.route(RouteInput("x0", block_hashes=[4001, 4002, 4003, 4004, 4005], exclude=["w1"])).instance_id == "w0"
    assert r.route(RouteInput("x1", block_hashes=[5001, 5002, 5003, 5004, 5005], exclude=["w0"])).instance_id == "w1"
    return r


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _enqueue(r: Router, reqs: list[RouteInput]) -> dict[str, asyncio.Task[RouteResult]]:
    """Queue the requests one after the other (arrival order = list order); all must wait."""
    tasks = {}
    for inp in reqs:
        tasks[inp.request_id] = asyncio.create_task(r.route_wait(inp))
        await _settle()
    assert r.queue is not None and len(r.queue) == len(reqs)
    return tasks


def _three() -> list[RouteInput]:
    return [
        RouteInput("a", block_hashes=[3001, 3002, 3003, 3004]),  # oldest, cached nowhere
        RouteInput("b", block_hashes=[*P1, 2005]),  # its prefix is on w1
        RouteInput("c", block_hashes=[*P0, 1005]),  # its prefix is on w0
    ]


@pytest.mark.parametrize("policy", ["cache-aware", "fcfs"])
async def test_the_freed_worker_takes_the_request_whose_prefix_it_holds(policy: str) -> None:
    r = _router(policy)
    tasks = await _enqueue(r, _three())
    r.prefill_done("x0")  # w0 has room for about one request
    await _settle()
    placed = {rid: t.result() for rid, t in tasks.items() if t.done()}
    r.prefill_done("x1")  # now w1
    got = {rid: await asyncio.wait_for(t, 1.0) for rid, t in tasks.items()}
    if policy == "cache-aware":
        # w0 took c (its 4 blocks on w0's device) and then the oldest, a; b waited for w1, which holds P1
        assert set(placed) == {"c", "a"} and placed["c"].instance_id == "w0"
        assert got["b"].instance_id == "w1" and got["b"].overlap_blocks == 4
        assert got["c"].overlap_blocks == 4
        assert r.queue is not None and r.queue.overtaken == 1 and r.queue.aged == 0  # c went ahead of a and b
    else:
        # fcfs: w0 took a and then b, whose prefix is on w1; c went to w1 last: no request found its cache
        assert set(placed) == {"a", "b"} and placed["b"].instance_id == "w0"
        assert got["b"].overlap_blocks == 0 and got["c"].instance_id == "w1" and got["c"].overlap_blocks == 0


async def test_a_device_prefix_goes_ahead_of_a_longer_host_copy() -> None:
    """w0 holds P0 in host memory (4 blocks, credit 3 at the default weight 0.75) and P2 on the device (2
    blocks). The queue places d (P2) first: its device blocks would be reused if it waited, while c's host
    copy stays. Before, c's larger weighted credit went first; with G2 on, that order cost device hits and
    made TTFT worse than with no G2 (docs/kvbm.md, "Why G2 lost to G1")."""
    r = _router("cache-aware", p0_medium="host")
    p2 = [7001, 7002]
    _feed(IndexSink(r), "w0", [KvStored(None, [StoredBlock(h, h) for h in p2])])
    tasks = await _enqueue(
        r,
        [
            RouteInput("c", block_hashes=[*P0, 1005]),  # older: 3 blocks' credit in w0's host memory
            RouteInput("d", block_hashes=[*p2, 7003, 7004, 7005, 7006, 7007]),  # 2 blocks on w0's device
        ],
    )
    r.prefill_done("x0")  # w0 has room for one of them: d's 5 new blocks fill it again
    await _settle()
    assert [rid for rid, t in tasks.items() if t.done()] == ["d"]
    assert tasks["d"].result().instance_id == "w0" and tasks["d"].result().overlap_blocks == 2
    r.prefill_done("x1")
    c = await asyncio.wait_for(tasks["c"], 1.0)
    assert c.instance_id == "w1" and c.overlap_blocks == 0  # placed where there was room: host copies wait


async def test_a_request_whose_prefix_waits_on_a_busy_worker_lets_a_cold_one_go_first() -> None:
    """w1 (busy) holds P3 in host memory. When w0 gets room for one request, it takes the cold b rather than
    the older a, which would be recomputed there; a waits for w1 and finds 3 blocks' credit there (4 host
    blocks at 0.75). Before, a went to w0 (the oldest) with nothing cached."""
    r = _router("cache-aware")
    p3 = [8001, 8002, 8003, 8004]
    _feed(IndexSink(r), "w1", [KvStored(None, [StoredBlock(h, h) for h in p3], "host")])
    tasks = await _enqueue(
        r,
        [
            RouteInput("a", block_hashes=[*p3, 8005]),  # older; its prefix is in w1's host memory
            RouteInput("b", block_hashes=[9001, 9002, 9003, 9004, 9005]),  # cold: cached nowhere
        ],
    )
    r.prefill_done("x0")  # w0 has room for one of them: 5 new blocks fill it again
    await _settle()
    assert [rid for rid, t in tasks.items() if t.done()] == ["b"] and tasks["b"].result().instance_id == "w0"
    r.prefill_done("x1")
    a = await asyncio.wait_for(tasks["a"], 1.0)
    assert a.instance_id == "w1" and a.overlap_blocks == 3


async def test_past_the_age_cap_the_oldest_goes_first_whatever_is_cached() -> None:
    clock = Clock()
    r = _router("cache-aware", clock)
    assert r.config.queue_age_cap_s == 30.0
    tasks = await _enqueue(r, _three())
    clock.now += 30.0  # every one of them has waited the cap
    r.prefill_done("x0")
    await _settle()
    placed = {rid: t.result() for rid, t in tasks.items() if t.done()}
    # arrival order, as fcfs: a then b filled w0; c, the one w0 had cached, waits
    assert set(placed) == {"a", "b"} and all(p.instance_id == "w0" for p in placed.values())
    assert r.queue is not None and r.queue.aged == 2 and r.queue.overtaken == 0
    r.prefill_done("x1")
    assert (await asyncio.wait_for(tasks["c"], 1.0)).instance_id == "w1"


async def test_a_request_whose_workers_are_all_busy_does_not_hold_up_the_others() -> None:
    r = _router("cache-aware")
    tasks = await _enqueue(
        r,
        [
            RouteInput("only-w1", block_hashes=[*P0, 1006], exclude=["w0"]),  # may not use w0
            RouteInput("d", block_hashes=[6001, 6002]),
        ],
    )
    r.prefill_done("x0")
    assert (await asyncio.wait_for(tasks["d"], 1.0)).instance_id == "w0"
    assert not tasks["only-w1"].done()
    r.prefill_done("x1")
    assert (await asyncio.wait_for(tasks["only-w1"], 1.0)).instance_id == "w1"


async def test_a_cancelled_waiter_leaves_no_load_and_is_never_chosen() -> None:
    r = _router("cache-aware")
    tasks = await _enqueue(r, _three())
    tasks["c"].cancel()  # the client holding w0's prefix goes away
    await _settle()
    r.prefill_done("x0")
    r.prefill_done("x1")
    got = {rid: await asyncio.wait_for(t, 1.0) for rid, t in tasks.items() if rid != "c"}
    assert set(got) == {"a", "b"} and "c" not in r.active
    assert r.queue is not None and len(r.queue) == 0


async def test_queue_age_cap_on_the_wait_queue_itself() -> None:
    """The queue, without a router: the chooser names the newest; the cap gives the oldest its turn."""
    clock = Clock()
    free = [0]

    def attempt(name: str) -> str:
        if free[0] <= 0:
            raise LookupError(name)
        free[0] -= 1
        return name

    q: WaitQueue[str] = WaitQueue(8, "cache-aware", busy=LookupError, choose=lambda infos: len(infos) - 1)
    q.clock, q.age_cap_s = clock, 2.0
    tasks = [asyncio.create_task(q.admit(lambda n=n: attempt(n), info=n)) for n in ("old", "mid", "new")]
    await _settle()
    free[0] = 1
    q.poke()
    await _settle()
    assert [t.result() for t in tasks if t.done()] == ["new"]
    clock.now += 2.0
    free[0] = 1
    q.poke()
    await _settle()
    assert tasks[0].done() and tasks[0].result() == "old" and not tasks[1].done()
    tasks[1].cancel()
    await _settle()
    with pytest.raises(ValueError, match="choose callback"):
        WaitQueue(8, "cache-aware")


def _args(*argv: str) -> RouterConfig:
    import argparse

    p = argparse.ArgumentParser()
    add_router_flags(p)
    return router_config_from_args(p.parse_args(list(argv)))


def test_flags_and_their_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _args("--router-queue-policy", "cache-aware", "--router-queue-age-cap-secs", "2.5")
    assert (cfg.queue_policy, cfg.queue_age_cap_s) == ("cache-aware", 2.5)
    with pytest.raises(ValueError, match=r"--router-queue-policy .*cache-aware needs a KV index"):
        _args("--router-mode", "round-robin", "--router-queue-policy", "cache-aware")
    with pytest.raises(ValueError, match=r"--router-queue-age-cap-secs .*unless the queue policy is cache-aware"):
        _args("--router-queue-age-cap-secs", "2")
    with pytest.raises(ValueError, match="--router-queue-age-cap-secs must be >= 0"):
        _args("--router-queue-policy", "cache-aware", "--router-queue-age-cap-secs", "-1")
    # every flag also reads DYN_<FLAG> (when the parser is built)
    monkeypatch.setenv("DYN_ROUTER_QUEUE_POLICY", "cache-aware")
    monkeypatch.setenv("DYN_ROUTER_QUEUE_AGE_CAP_SECS", "7")
    cfg = _args()
    assert (cfg.queue_policy, cfg.queue_age_cap_s) == ("cache-aware", 7.0)


@pytest.mark.parametrize("policy", ["cache-aware", "fcfs"])
async def test_a_rank_takes_the_next_request_when_it_can_start_it(policy: str) -> None:
    """LoadMetrics cannot show a request still waiting in the engine (it holds no blocks yet). The cache-aware
    queue gives a rank under the busy threshold one request, then waits for its next report, and holds the
    rest while the engine says requests are waiting; fcfs puts every waiter on the first rank to dip under."""
    r = Router(RouterConfig(block_size=BS, seed=1, queue_policy=policy, predicted_ttl_s=0))
    r.set_workers([WorkerInfo(f"w{i}", f"127.0.0.1:{9000 + i}", block_size=BS, kv_blocks=100) for i in range(2)])
    r.ready = True
    for w in ("w0", "w1"):
        r.set_load((w, 0), 97, 100)  # both over the default 0.95
    reqs = [RouteInput(rid, block_hashes=[salt * 1000 + i for i in range(30)]) for salt, rid in enumerate("abc", 1)]
    tasks = await _enqueue(r, reqs)

    def placed() -> list[str]:
        return sorted(rid for rid, t in tasks.items() if t.done())

    r.set_load(("w0", 0), 50, 100)  # w0 finished something
    await _settle()
    if policy == "fcfs":
        assert placed() == ["a", "b", "c"]  # the stale report let all three onto w0
        assert all(t.result().instance_id == "w0" for t in tasks.values())
        return
    assert placed() == ["a"]
    r.set_load(("w0", 0), 50, 100, waiting=1)  # a is still waiting in w0's engine: no room yet
    await _settle()
    assert placed() == ["a"]
    r.set_load(("w0", 0), 80, 100, waiting=0, running=1)  # a started: w0 can take the next
    await _settle()
    assert placed() == ["a", "b"]
    r.set_load(("w1", 0), 50, 100)
    assert (await asyncio.wait_for(tasks["c"], 1.0)).instance_id == "w1"
    assert tasks["a"].result().instance_id == tasks["b"].result().instance_id == "w0"


async def test_a_rank_whose_load_reports_stop_is_not_full_forever() -> None:
    """Marked full after a placement, a rank whose next LoadMetrics never comes takes work again after
    NO_ROOM_TTL_S (a lost report must not strand the queue)."""
    from dynamo_grpc.router import router as router_mod

    now = [1000.0]
    r = Router(RouterConfig(block_size=BS, seed=1, queue_policy="cache-aware", predicted_ttl_s=0))
    r.clock = lambda: now[0]
    r.set_workers([WorkerInfo("w0", "127.0.0.1:9000", block_size=BS, kv_blocks=100)])
    r.ready = True
    r.set_load(("w0", 0), 10, 100)
    assert r.route(RouteInput("a", block_hashes=[1, 2])).instance_id == "w0"
    tasks = await _enqueue(r, [RouteInput("b", block_hashes=[3, 4])])  # w0 is full until it reports
    now[0] += router_mod.NO_ROOM_TTL_S + 0.1
    r.housekeeping()  # the periodic sweep wakes the queue
    assert (await asyncio.wait_for(tasks["b"], 1.0)).instance_id == "w0"
