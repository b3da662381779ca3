"""hold_spill_s: a request its pool is too backed up for, and that no other pool accepts, waits in the global
router for the first worker that frees (bounded by max_held, ended by its timeout) — over real per-pool KV
Routers, and through RouterService on real gRPC (a client that cancels while held is dropped from the hold)."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import grpc
import pytest

from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.global_router import GlobalRouter, Held
from dynamo_grpc.router.global_service import GlobalRouterServicer
from dynamo_grpc.router.pool_config import PoolConfigError, PoolSpec, parse_pool_config
from dynamo_grpc.router.pool_metrics import PoolMetrics
from dynamo_grpc.router.router import RouteInput, Router, WorkerInfo
from dynamo_grpc.v1 import router_pb2, router_pb2_grpc

BS = 16


def config(**top: Any) -> dict[str, Any]:
    return {
        "default_pool": "short",
        "pools": [
            {"name": "short", "input_tokens": [0, 256], "accept_spill_prefill_tokens": 100},
            {"name": "long", "input_tokens": [256, None], "busy_prefill_tokens": 100, "hold_spill_s": 5},
        ],
        **top,
    }


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50_000) for _ in range(n)]


def make(cfg: dict[str, Any], now: list[float]) -> GlobalRouter:
    """One worker per pool; the global router's clock is ``now[0]``."""

    def router(spec: PoolSpec) -> Router:
        r = Router(RouterConfig(block_size=BS, seed=1, busy_threshold=spec.busy_threshold))
        r.set_workers([WorkerInfo(f"{spec.name}-0", "127.0.0.1:9000", "m", BS, 1, 10_000)])
        r.ready = True
        return r

    return GlobalRouter(parse_pool_config(cfg), router, clock=lambda: now[0])


def backed_up(g: GlobalRouter) -> None:
    """The short worker has 192 prompt tokens pending (takes no spill), the long one 288 (busy)."""
    assert g.route(RouteInput("s", token_ids=tokens(200, 1))).pool == "short"
    assert g.route(RouteInput("l1", token_ids=tokens(300, 2))).pool == "long"


def test_a_backed_up_long_pool_holds_the_request_until_its_worker_frees() -> None:
    now = [0.0]
    g = make(config(), now)
    changes: list[int] = []
    g.on_change = lambda: changes.append(1)
    backed_up(g)
    with pytest.raises(Held) as held:
        g.route(RouteInput("l2", token_ids=tokens(300, 3)), hold=True)
    assert "pool long busy (every worker above 100 pending prefill tokens)" in str(held.value)
    assert "pool short takes no spill-over (192 pending prefill tokens, above 100)" in str(held.value)
    assert str(held.value).endswith("held in the global router (at most 5 s more)") and held.value.wait_s == 5
    assert list(g.held) == ["l2"] and g.pools["long"].counters.held == 1 and "l2" not in g.owner
    # a later request does not overtake the held one
    with pytest.raises(Held, match="requests held before it"):
        g.route(RouteInput("l3", token_ids=tokens(300, 4)), hold=True)
    now[0] = 1.5
    assert g.prefill_done("l1") and changes  # the service wakes its waiters on this
    d = g.route(RouteInput("l2", token_ids=tokens(300, 3)), hold=True)
    assert d.pool == "long" and d.spilled_from == ""
    assert d.reason == "input 300 tokens in [256,∞) -> pool long; held 1.5 s in the global router"
    assert list(g.held) == ["l3"] and g.owner["l2"] == "long"


def test_a_held_request_takes_a_short_worker_once_the_short_pool_idles() -> None:
    now = [0.0]
    g = make(config(), now)
    backed_up(g)
    with pytest.raises(Held):
        g.route(RouteInput("l2", token_ids=tokens(300, 3)), hold=True)
    g.prefill_done("s")  # the short worker is idle: it takes the spill
    now[0] = 0.25
    d = g.route(RouteInput("l2", token_ids=tokens(300, 3)), hold=True)
    assert d.pool == "short" and d.spilled_from == "long" and g.pools["short"].counters.spilled_in == 1
    assert "spilled over to pool short (at most 100 prefill tokens pending there)" in d.reason
    assert d.reason.endswith("held 0.25 s in the global router") and not g.held


def test_the_hold_runs_out_and_the_request_queues_in_its_pool() -> None:
    now = [0.0]
    g = make(config(), now)
    backed_up(g)
    with pytest.raises(Held):
        g.route(RouteInput("l2", token_ids=tokens(300, 3)), hold=True)
    now[0] = 3.0
    with pytest.raises(Held, match=r"at most 2 s more"):
        g.route(RouteInput("l2", token_ids=tokens(300, 3)), hold=True)
    now[0] = 5.0
    d = g.route(RouteInput("l2", token_ids=tokens(300, 3)), hold=True)
    assert d.pool == "long"
    assert "no pool has headroom: queued in pool long; held 5 s in the global router" in d.reason
    assert g.pools["long"].counters.hold_timeouts == 1 and not g.held
    text = "\n".join(f"{s.name} {s.labels} {s.value}" for m in PoolMetrics(g).collect() for s in m.samples)
    assert "dynamo_global_router_held_total {'pool': 'long'} 1" in text
    assert "dynamo_global_router_hold_timeouts_total {'pool': 'long'} 1" in text
    assert "dynamo_global_router_held_now {'pool': 'long'} 0" in text


def test_max_held_bounds_the_hold_and_a_caller_that_cannot_wait_is_never_held() -> None:
    now = [0.0]
    g = make(config(max_held=1), now)
    backed_up(g)
    with pytest.raises(Held):
        g.route(RouteInput("l2", token_ids=tokens(300, 3)), hold=True)
    d = g.route(RouteInput("l3", token_ids=tokens(300, 4)), hold=True)  # max_held reached: queued at once
    assert d.pool == "long" and d.reason.endswith("no pool has headroom: queued in pool long")
    d = g.route(RouteInput("l4", token_ids=tokens(300, 5)))  # hold=False: the behaviour without hold_spill_s
    assert d.pool == "long" and list(g.held) == ["l2"]
    # a pinned request, or a dry run, is never held
    assert g.route(RouteInput("p", token_ids=tokens(300, 6)), pool="long", hold=True).pool == "long"
    assert g.route(RouteInput("dry", token_ids=tokens(300, 7), dry_run=True), hold=True).pool == "long"
    assert g.unhold("l2") and not g.unhold("l2")


def test_hold_options_are_validated() -> None:
    grid = parse_pool_config(config(max_held=3))
    assert grid.max_held == 3 and grid.pools["long"].hold_spill_s == 5
    assert "holds a request it is too busy for up to 5 s (max_held 3)" in grid.describe()[1]
    bad = config(max_held=-1)
    bad["pools"][1]["hold_spill_s"] = 0
    bad["pools"][0]["hold_spill_s"] = 2  # no busy_prefill_tokens on the short pool: nothing would make it hold
    with pytest.raises(PoolConfigError) as err:
        parse_pool_config(bad)
    msg = str(err.value)
    assert "pool long: hold_spill_s: must be in (0, 3600], got 0" in msg
    assert "pool short: hold_spill_s needs busy_prefill_tokens" in msg
    assert "max_held: expected an integer >= 0, got -1" in msg


async def test_a_held_route_ends_before_its_deadline_is_answered_on_update_and_a_cancel_frees_it() -> None:
    g = make(config(), [0.0])
    g.clock = time.monotonic
    backed_up(g)
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(GlobalRouterServicer(g, lambda: "m"), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = router_pb2_grpc.RouterServiceStub(ch)

            def req(rid: str, seed: int) -> router_pb2.RouteRequest:
                return router_pb2.RouteRequest(request_id=rid, model="m", token_ids=tokens(300, seed))

            async def held(rid: str) -> None:
                for _ in range(200):
                    if rid in g.held:
                        return
                    await asyncio.sleep(0.01)
                raise AssertionError(f"{rid} was never held")

            # the hold ends before the caller's deadline: the request queues as without hold, in time
            resp = await stub.Route(req("soon", 3), timeout=1.0)
            assert resp.pool == "long" and "no pool has headroom: queued in pool long; held" in resp.reason
            assert g.pools["long"].counters.hold_timeouts == 1
            resp = await stub.Route(req("now", 6), timeout=0.4)  # under the margin: never held
            assert "held" not in resp.reason and g.pools["long"].counters.held == 1
            # a client that cancels while held leaves nothing held or routed
            call = stub.Route(req("gone", 4))
            await held("gone")
            call.cancel()
            for _ in range(200):
                if not g.held:
                    break
                await asyncio.sleep(0.01)
            assert not g.held and "gone" not in g.owner
            assert g.free("soon") and g.free("now")

            # a held Route is answered once an Update prefills the long worker's backlog
            async def route_l2() -> router_pb2.RouteResponse:
                return await stub.Route(req("l2", 5))

            waiting = asyncio.create_task(route_l2())
            await held("l2")
            assert not waiting.done()

            async def done() -> Any:
                yield router_pb2.UpdateRequest(request_id="l1", kind=router_pb2.SEQUENCE_EVENT_KIND_PREFILL_DONE)

            await stub.Update(done())
            resp = await asyncio.wait_for(waiting, 5.0)
            assert resp.pool == "long" and "held" in resp.reason and g.owner["l2"] == "long"
    finally:
        await server.stop(None)
