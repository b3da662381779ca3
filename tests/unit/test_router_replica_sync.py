"""Router replica sync over real ZMQ sockets in one process (router/replicas.py): load routed by one
replica counts in the other, a replica that joins late catches up from snapshots, frees it missed are
applied by the next snapshot, and a replica that goes silent has its load expired."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.replicas import ActiveSync
from dynamo_grpc.router.router import RouteInput, Router, WorkerInfo

BS = 16
INTERVAL = 0.1


def _router(name: str) -> Router:
    r = Router(RouterConfig(block_size=BS, mode="round-robin"), name)
    r.set_workers([WorkerInfo(f"w{i}", f"127.0.0.1:{9000 + i}", "m", BS) for i in range(2)])
    return r


def _replica(name: str) -> tuple[Router, ActiveSync]:
    r = _router(name)
    sync = ActiveSync(r, "m", snapshot_interval_s=INTERVAL)
    r.on_active_change = sync.publish
    sync.start()
    return r, sync


def _route(r: Router, rid: str) -> None:
    r.route(RouteInput(request_id=rid, model="m", token_ids=list(range(5 * BS))))


async def _until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def _scenario() -> None:
    a, sa = _replica("a")
    b, sb = _replica("b")
    c: Router | None = None
    sc: ActiveSync | None = None
    try:
        sa.set_peers({sb.endpoint: ""})
        sb.set_peers({sa.endpoint: ""})
        await _until(lambda: "b" in sa.last_seen and "a" in sb.last_seen)
        for i in range(3):
            _route(a, f"a{i}")
        _route(b, "b0")
        # every decision counts in both: same sequences, same per-worker load
        await _until(lambda: len(a.active) == 4 and len(b.active) == 4)
        for w in ("w0", "w1"):
            assert a.active.load((w, 0)) == b.active.load((w, 0))
        a.prefill_done("a0")
        a.free("a1")
        await _until(lambda: len(b.active) == 3 and b.active.get("a0") is not None)
        seq = b.active.get("a0")
        assert seq is not None and seq.prefill_blocks == 0

        # a replica that starts late has missed every event: snapshots bring it the others' load
        c, sc = _replica("c")
        sc.set_peers({sa.endpoint: "", sb.endpoint: ""})
        await _until(lambda: len(c.active) == 3)
        assert {rid for rid, _ in c.active.of_router("a")} == {"a0", "a2"}

        # a free lost on the way (here: never published) is corrected by the next snapshot
        a.on_active_change = None
        a.free("a2")
        a.on_active_change = sa.publish
        await _until(lambda: c.active.get("a2") is None and b.active.get("a2") is None)

        # b goes silent (dies): after 3 snapshot intervals its load is expired on the others
        await sb.close()
        await _until(lambda: a.active.get("b0") is None and c.active.get("b0") is None)
        assert b.active.get("b0") is not None  # b itself still holds it: only the others expired it
        assert sa.expired_sequences == 1 and sa.expired_replicas == 1
        assert len(a.active) == 1 and len(c.active) == 1  # a0, a's own, still counted everywhere
    finally:
        for s in (sa, sb, sc):
            if s is not None:
                await s.close()


def test_replicas_share_catch_up_correct_and_expire() -> None:
    asyncio.run(_scenario())
