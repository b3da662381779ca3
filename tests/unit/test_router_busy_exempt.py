"""A busy worker that holds a request's prefix stays a candidate for it (``--router-busy-exempt-overlap``).

Without this, when every worker's small device cache sits at the busy threshold (the normal state of a
loaded engine with few KV blocks), the first worker to drop under it took every waiting request whatever
its cache held: on `bench kvbm`'s mesh 59 % of later conversation turns left the worker holding their
prefix and recomputed it (docs/kvbm.md).
"""

from __future__ import annotations

import pytest

from dynamo_grpc.events.codec import make_batch
from dynamo_grpc.events.kv import KvEvent, KvStored, StoredBlock
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.flags import add_router_flags, refuse_unused_flags, router_config_from_args
from dynamo_grpc.router.router import AllBusy, RouteInput, Router, WorkerInfo
from dynamo_grpc.router.sync import IndexSink

CHAIN = [11, 12, 13, 14]


def _router(n: int = 2, **kw: object) -> tuple[Router, IndexSink]:
    kw.setdefault("busy_threshold", 0.9)
    r = Router(RouterConfig(block_size=4, seed=1, predicted_ttl_s=0, **kw))  # type: ignore[arg-type]
    r.set_workers([WorkerInfo(f"w{i}", f"127.0.0.1:{9000 + i}", block_size=4) for i in range(n)])
    r.ready = True
    return r, IndexSink(r)


def _feed(sink: IndexSink, worker: str, hashes: list[int], medium: str = "device") -> None:
    events: list[KvEvent] = [KvStored(None, [StoredBlock(h, h) for h in hashes], medium)]
    sink.apply_batch(make_batch(worker, 0, 1, 7, 4, events, 0.0))


def _route(r: Router, rid: str, hashes: list[int]) -> str:
    return r.route(RouteInput(request_id=rid, block_hashes=hashes, dry_run=True)).instance_id


def test_busy_worker_with_the_prefix_keeps_the_request() -> None:
    r, sink = _router()
    _feed(sink, "w0", CHAIN[:3])  # 3 of the 4 prompt blocks on w0's device
    r.set_load(("w0", 0), 990, 1000)  # w0 is over the threshold, w1 is idle
    assert _route(r, "turn", CHAIN) == "w0"
    # a prompt w0 holds too little of (1 of 4 blocks < half) still avoids the busy worker
    assert _route(r, "new", [CHAIN[0], 91, 92, 93]) == "w1"


def test_a_host_memory_prefix_counts_with_its_weight() -> None:
    r, sink = _router()
    _feed(sink, "w0", CHAIN, "host")  # credit 4 x 0.75 = 3 blocks >= half of 4
    r.set_load(("w0", 0), 990, 1000)
    assert _route(r, "a", CHAIN) == "w0"
    r2, sink2 = _router()
    _feed(sink2, "w0", CHAIN, "disk")  # credit 4 x 0.25 = 1 block < 2: recompute on the idle worker
    r2.set_load(("w0", 0), 990, 1000)
    assert _route(r2, "b", CHAIN) == "w1"


def test_all_busy_waits_unless_a_worker_holds_the_prefix() -> None:
    r, sink = _router()
    _feed(sink, "w1", CHAIN)
    r.set_load(("w0", 0), 990, 1000)
    r.set_load(("w1", 0), 990, 1000)
    assert _route(r, "turn", CHAIN) == "w1"  # not the router queue: w1 has the whole prefix
    with pytest.raises(AllBusy):
        _route(r, "cold", [81, 82, 83, 84])


def test_prefill_queue_threshold_exempts_the_holder_too() -> None:
    r, sink = _router(queue_threshold=1.0, max_num_batched_tokens=8, busy_threshold=1.0)  # 2 blocks of backlog
    _feed(sink, "w0", CHAIN)
    r.route(RouteInput(request_id="big", block_hashes=[71, 72, 73, 74, 75]))  # lands on a worker: backlog 5 > 2
    r.route(RouteInput(request_id="big2", block_hashes=[61, 62, 63, 64, 65]))  # and the other one
    assert _route(r, "turn", CHAIN) == "w0"
    with pytest.raises(AllBusy):
        _route(r, "cold", [81, 82, 83, 84])


def test_zero_turns_the_exemption_off() -> None:
    r, sink = _router(busy_exempt_overlap=0.0)
    _feed(sink, "w0", CHAIN)
    r.set_load(("w0", 0), 990, 1000)
    assert _route(r, "turn", CHAIN) == "w1"


def test_flag_env_range_and_mode() -> None:
    import argparse

    p = argparse.ArgumentParser()
    add_router_flags(p)
    assert router_config_from_args(p.parse_args([])).busy_exempt_overlap == 0.5
    cfg = router_config_from_args(p.parse_args(["--router-busy-exempt-overlap", "0.8"]))
    assert cfg.busy_exempt_overlap == 0.8
    with pytest.raises(ValueError, match=r"--router-busy-exempt-overlap must be in \[0, 1\], got 1.5"):
        router_config_from_args(p.parse_args(["--router-busy-exempt-overlap", "1.5"]))
    with pytest.raises(ValueError, match="--router-busy-exempt-overlap: no effect with --router-mode round-robin"):
        refuse_unused_flags(p, p.parse_args(["--router-mode", "round-robin", "--router-busy-exempt-overlap", "0.7"]))


def test_env_variable_sets_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    monkeypatch.setenv("DYN_ROUTER_BUSY_EXEMPT_OVERLAP", "0.25")
    p = argparse.ArgumentParser()
    add_router_flags(p)
    assert router_config_from_args(p.parse_args([])).busy_exempt_overlap == 0.25
