"""The global router's core over real per-pool KV Routers: isolation, pinning, spill-over, Updates, drain.

The processes (discovery, KV events, RouterService) are exercised in tests/integration/test_global_router.py;
here each pool's Router is fed directly (its index and load), as its RouterNode would.
"""

from __future__ import annotations

import random

import pytest

from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.global_router import GlobalRouter, UnknownPool
from dynamo_grpc.router.pool_config import PoolSpec, parse_pool_config
from dynamo_grpc.router.router import AllBusy, NoWorkers, RouteInput, Router, WorkerInfo
from dynamo_grpc.tokens.block_hash import block_hash_list

BS = 16
CONFIG = {
    "default_pool": "short",
    "pools": [
        {"name": "short", "input_tokens": [0, 256]},
        {"name": "long", "input_tokens": [256, None]},
    ],
}


def tokens(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50_000) for _ in range(n)]


def make_global(config: dict[str, object] = CONFIG, workers: dict[str, int] | None = None) -> GlobalRouter:
    workers = workers if workers is not None else {"short": 2, "long": 2}

    def make(spec: PoolSpec) -> Router:
        r = Router(RouterConfig(block_size=BS, seed=1, busy_threshold=spec.busy_threshold))
        n = workers.get(spec.name, 0)
        r.set_workers([WorkerInfo(f"{spec.name}-{i}", f"127.0.0.1:{9000 + i}", "m", BS, 1, 64) for i in range(n)])
        r.ready = True
        return r

    return GlobalRouter(parse_pool_config(config), make)


def test_prompt_length_picks_the_pool_and_the_reason_says_why() -> None:
    g = make_global()
    d = g.route(RouteInput("r1", token_ids=tokens(100)))
    assert d.pool == "short" and d.result.instance_id.startswith("short-")
    assert d.reason == "input 100 tokens in [0,256) -> pool short"
    d = g.route(RouteInput("r2", token_ids=tokens(300)))
    assert d.pool == "long" and d.result.instance_id.startswith("long-")


def test_a_block_cached_in_one_pool_never_attracts_a_request_to_another() -> None:
    g = make_global()
    prompt = tokens(200, seed=3)
    # the whole prompt is cached on a long-pool worker; the request is short: it stays in the short pool
    g.pools["long"].router.indexer.store(("long-1", 0), block_hash_list(prompt, BS))
    d = g.route(RouteInput("r1", token_ids=prompt))
    assert d.pool == "short" and d.result.overlap_blocks == 0
    # pinned to the long pool, the same prompt finds its cache there
    d = g.route(RouteInput("r2", token_ids=prompt), pool="long")
    assert d.result.instance_id == "long-1" and d.result.overlap_blocks == len(prompt) // BS
    assert d.reason == "pinned to pool long by the request"


def test_unknown_pool_is_refused_naming_the_pools() -> None:
    g = make_global()
    with pytest.raises(UnknownPool, match=r"pool 'gpu' is not configured \(pools: short, long\)"):
        g.route(RouteInput("r1", token_ids=tokens(10)), pool="gpu")
    with pytest.raises(ValueError, match="phase 'both'"):
        g.route(RouteInput("r1", token_ids=tokens(10)), phase="both")


def test_busy_pool_spills_over_to_the_neighbour_and_says_so() -> None:
    g = make_global()
    short = g.pools["short"].router
    for i in range(2):  # both short workers report 95 % KV use (LoadMetrics): above the default 0.9
        short.set_load((f"short-{i}", 0), 61, 64)
    d = g.route(RouteInput("r1", token_ids=tokens(50)))
    assert d.pool == "long" and d.spilled_from == "short"
    assert "pool short busy (every worker above 0.9 KV use); spilled over to pool long" in d.reason
    assert g.pools["short"].counters.spilled_out == 1 and g.pools["long"].counters.spilled_in == 1
    short.set_load(("short-0", 0), 10, 64)  # headroom again: back home
    assert g.route(RouteInput("r2", token_ids=tokens(50))).pool == "short"


def test_pinned_requests_never_spill_and_all_busy_is_resource_exhausted() -> None:
    g = make_global()
    for p in ("short", "long"):
        for i in range(2):
            g.pools[p].router.set_load((f"{p}-{i}", 0), 64, 64)
    with pytest.raises(AllBusy, match="pool short busy"):
        g.route(RouteInput("r1", token_ids=tokens(10)), pool="short")
    with pytest.raises(AllBusy, match=r"pool short busy.*pool long busy"):
        g.route(RouteInput("r2", token_ids=tokens(10)))


def test_empty_pool_spills_and_no_spill_over_means_unavailable() -> None:
    g = make_global(workers={"short": 0, "long": 1})
    d = g.route(RouteInput("r1", token_ids=tokens(10)))
    assert d.pool == "long" and "pool short has no live worker" in d.reason
    strict = make_global({**CONFIG, "spill_over": False}, workers={"short": 0, "long": 1})
    with pytest.raises(NoWorkers, match=r"pool short has no live worker \(spill-over off\)"):
        strict.route(RouteInput("r1", token_ids=tokens(10)))


def test_updates_reach_the_pool_that_routed() -> None:
    g = make_global()
    g.route(RouteInput("s", token_ids=tokens(100), expected_output_tokens=16))
    g.route(RouteInput("l", token_ids=tokens(300), expected_output_tokens=16))
    assert len(g.pools["short"].router.active) == 1 and len(g.pools["long"].router.active) == 1
    assert g.prefill_done("l", 3)
    assert g.free("l") and not g.free("l")
    assert len(g.pools["long"].router.active) == 0 and len(g.pools["short"].router.active) == 1
    assert g.free("s") and g.owner == {}
    g.route(RouteInput("dry", token_ids=tokens(10), dry_run=True))
    assert "dry" not in g.owner and len(g.pools["short"].router.active) == 0


def test_reload_adds_a_pool_and_drains_a_removed_one() -> None:
    g = make_global(workers={"short": 1, "long": 1, "huge": 1})
    g.route(RouteInput("in-flight", token_ids=tokens(300)))
    new = {
        "default_pool": "short",
        "pools": [
            {"name": "short", "input_tokens": [0, 1000], "busy_threshold": 0.5},
            {"name": "huge", "input_tokens": [1000, None]},
        ],
    }
    added, draining = g.apply(parse_pool_config(new))
    assert added == ["huge"] and draining == ["long"]
    assert g.pools["short"].router.config.busy_threshold == 0.5
    assert g.route(RouteInput("r2", token_ids=tokens(300))).pool == "short"
    assert g.route(RouteInput("r3", token_ids=tokens(2000))).pool == "huge"
    with pytest.raises(UnknownPool):
        g.route(RouteInput("r4", token_ids=tokens(10)), pool="long")
    assert g.drained() == []  # the in-flight request still holds the draining pool
    assert g.free("in-flight")
    assert g.drained() == ["long"] and "long" not in g.pools


def test_prefill_backlog_makes_a_pool_busy_before_its_kv_fills() -> None:
    config = {
        "default_pool": "short",
        "pools": [
            {"name": "short", "input_tokens": [0, 256]},
            {"name": "long", "input_tokens": [256, None], "busy_prefill_tokens": 600},
        ],
    }
    g = make_global(config)
    for rid in "abcd":  # 400 pending tokens each; the pool's router spreads them: 800 per long worker
        assert g.route(RouteInput(rid, token_ids=tokens(400, ord(rid)))).pool == "long"
    d = g.route(RouteInput("e", token_ids=tokens(400, 5)))  # every long worker above 600 pending tokens
    assert d.pool == "short"
    assert "pool long busy (every worker above 600 pending prefill tokens); spilled over to pool short" in d.reason
    for rid in "abcd":
        g.prefill_done(rid)  # prefilled: the backlog is gone
    assert g.route(RouteInput("f", token_ids=tokens(400, 6))).pool == "long"


def test_when_every_pool_is_backed_up_the_request_queues_at_home_instead_of_failing() -> None:
    config = {
        "default_pool": "short",
        "pools": [
            {"name": "short", "input_tokens": [0, 256], "busy_prefill_tokens": 100},
            {"name": "long", "input_tokens": [256, None], "busy_prefill_tokens": 100},
        ],
    }
    g = make_global(config, workers={"short": 1, "long": 1})
    g.route(RouteInput("s", token_ids=tokens(200, 1)))
    g.route(RouteInput("l", token_ids=tokens(300, 2)))
    d = g.route(RouteInput("x", token_ids=tokens(300, 3)))
    assert d.pool == "long" and d.spilled_from == ""
    assert d.reason.endswith("no pool has headroom: queued in pool long")
    assert "pool short busy (every worker above 100 pending prefill tokens)" in d.reason


def test_the_phase_picks_the_workers_of_its_role_inside_the_pool() -> None:
    config = {
        "default_pool": "short",
        "pools": [
            {"name": "short", "input_tokens": [0, 256], "context_tokens": [0, 256]},
            {"name": "long", "input_tokens": [256, None], "context_tokens": [256, None]},
        ],
    }

    def make(spec: PoolSpec) -> Router:
        r = Router(RouterConfig(block_size=BS, seed=1, busy_threshold=spec.busy_threshold))
        roles = ("prefill", "decode") if spec.name == "long" else ("decode",)
        r.set_workers(
            [WorkerInfo(f"{spec.name}-{role}", "127.0.0.1:9000", "m", BS, 1, 1024, role=role) for role in roles]
        )
        r.ready = True
        return r

    g = GlobalRouter(parse_pool_config(config), make)
    for i in range(4):  # whatever the load, a prefill goes to the pool's prefill worker, a decode to its decode one
        assert g.route(RouteInput(f"p{i}", token_ids=tokens(300, i)), "prefill").result.instance_id == "long-prefill"
        assert g.route(RouteInput(f"d{i}", token_ids=tokens(300, i)), "decode").result.instance_id == "long-decode"
    # a pool with no worker serving the phase is skipped like an empty one, and the reason names the phase
    d = g.route(RouteInput("s", token_ids=tokens(100, 9)), "prefill")
    assert d.pool == "long" and d.result.instance_id == "long-prefill"
    assert "pool short has no live worker serving prefill; spilled over to pool long" in d.reason


def test_a_pool_takes_spill_over_only_while_it_is_nearly_idle() -> None:
    # one-directional spill: long prompts borrow an idle short pool, never queue behind short ones
    config = {
        "default_pool": "short",
        "pools": [
            {"name": "short", "input_tokens": [0, 256], "accept_spill_prefill_tokens": 250},
            {"name": "long", "input_tokens": [256, None], "busy_prefill_tokens": 300},
        ],
    }
    g = make_global(config, workers={"short": 2, "long": 1})
    assert g.route(RouteInput("l1", token_ids=tokens(400, 1))).pool == "long"  # the long worker: 400 pending
    g.route(RouteInput("s1", token_ids=tokens(200, 2)))  # the short pool: 192 pending (12 full blocks), below 250
    d = g.route(RouteInput("l2", token_ids=tokens(400, 3)))  # long backed up: spills to the idle short pool
    assert d.pool == "short" and d.spilled_from == "long"
    assert d.reason.endswith(
        "pool long busy (every worker above 300 pending prefill tokens); spilled over to pool short "
        "(at most 250 prefill tokens pending there)"
    )
    # the short pool now has 592 tokens to prefill: the next long prompt waits in its own pool
    d = g.route(RouteInput("l3", token_ids=tokens(400, 5)))
    assert d.pool == "long" and d.spilled_from == ""
    assert "pool short takes no spill-over (592 pending prefill tokens, above 250)" in d.reason
    assert d.reason.endswith("no pool has headroom: queued in pool long")
    # the short pool's own requests are not limited by it
    assert g.route(RouteInput("s2", token_ids=tokens(100, 6))).pool == "short"
    # once the spilled prompt and s1 are prefilled the short pool takes spill-over again
    g.prefill_done("l2")
    g.prefill_done("s1")
    g.prefill_done("s2")
    assert g.route(RouteInput("l4", token_ids=tokens(400, 7))).spilled_from == "long"
    assert g.pools["long"].counters.spilled_out == 2 and g.pools["short"].counters.spilled_in == 2
