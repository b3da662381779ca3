"""A subscriber pointed at a rogue PUB socket: garbage is logged, counted and dropped, never fatal.

Hypothesis builds batches of multipart messages (wrong frame counts, short or long seq frames,
undecodable payloads, batches whose seq disagrees with the seq frame, other models' topics); a
real PUB socket on 127.0.0.1 sends them to a real KvEventSubscriber, followed by a valid message
that must still arrive.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynamo_grpc.events.subscriber import KvEventSubscriber
from dynamo_grpc.events.topics import pack_seq
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.replicas import ActiveSync
from dynamo_grpc.router.router import ActiveChange, Router
from dynamo_grpc.v1 import events_pb2

MARKER = 123_456_789  # active_blocks of the final, valid load message

topics = st.sampled_from([b"kv.m", b"load.m", b"kv.mx", b"load.m.extra", b"kv."])
anything = st.lists(st.binary(max_size=16), min_size=1, max_size=6)
bad_seq = st.tuples(topics, st.binary(max_size=12).filter(lambda b: len(b) != 8), st.binary(max_size=24))
bad_payload = st.tuples(topics, st.integers(0, 2**64 - 1).map(pack_seq), st.binary(min_size=1, max_size=24))
seq_mismatch = st.tuples(st.integers(1, 2**32), st.integers(1, 2**32)).map(
    lambda s: (
        b"kv.m",
        pack_seq(s[0]),
        events_pb2.KvEventBatch(instance_id="rogue", seq=s[1] + (s[1] == s[0]), epoch=1).SerializeToString(),
    )
)
messages = st.lists(
    st.one_of(anything, bad_seq.map(list), bad_payload.map(list), seq_mismatch.map(list)), min_size=30, max_size=80
)


class _Sink:
    def __init__(self) -> None:
        self.loads: list[events_pb2.LoadMetrics] = []
        self.batches = 0

    def apply_batch(self, batch: events_pb2.KvEventBatch) -> None:
        self.batches += 1

    def clear_worker(self, instance_id: str, dp_rank: int) -> None:
        pass

    def remove_worker(self, instance_id: str) -> None:
        pass

    def on_load(self, load: events_pb2.LoadMetrics) -> None:
        self.loads.append(load)


class _NoReplay:
    async def replay(
        self, address: str, from_seq: int, full_dump: bool = False
    ) -> AsyncIterator[tuple[events_pb2.KvEventBatch, bool]]:
        return
        yield  # pragma: no cover


def _structurally_bad(frames: list[bytes]) -> bool:
    """Wrong for any reader of the wire format: frame count or seq frame length."""
    return len(frames) != 3 or len(frames[1]) != 8


async def _exercise(batch: list[list[bytes]]) -> None:
    ctx = zmq.asyncio.Context()
    rogue = ctx.socket(zmq.PUB)
    rogue.setsockopt(zmq.LINGER, 0)
    port = rogue.bind_to_random_port("tcp://127.0.0.1")
    sink = _Sink()
    sub = KvEventSubscriber("m", sink, _NoReplay(), resync_interval_s=0, context=ctx)
    sub.start()
    try:
        sub.add_worker("rogue", f"tcp://127.0.0.1:{port}", "rogue:1")
        probe = [b"load.m", pack_seq(1), events_pb2.LoadMetrics(instance_id="probe").SerializeToString()]
        deadline = time.monotonic() + 10
        while not sink.loads and time.monotonic() < deadline:  # PUB/SUB joins asynchronously
            await rogue.send_multipart(probe)
            await asyncio.sleep(0.02)
        assert sink.loads, "subscriber never joined the rogue publisher"
        before = sub.stats.bad_messages
        delivered = [f for f in batch if f[0].startswith((b"kv.m", b"load.m"))]  # the SUB filter's prefix match
        for frames in batch:
            await rogue.send_multipart(frames)
        marker = events_pb2.LoadMetrics(instance_id="rogue", active_blocks=MARKER).SerializeToString()
        await rogue.send_multipart([b"load.m", pack_seq(2), marker])
        recv = sub._recv_task
        assert recv is not None
        while not any(x.active_blocks == MARKER for x in sink.loads) and time.monotonic() < deadline + 10:
            assert not recv.done(), "the subscriber's receive loop died"
            await asyncio.sleep(0.01)
        assert any(x.active_blocks == MARKER for x in sink.loads), "the subscriber stopped processing"
        bad = sub.stats.bad_messages - before
        assert sum(_structurally_bad(f) for f in delivered) <= bad <= len(delivered)
        assert sink.batches == 0  # nothing from the rogue reached the index
    finally:
        await sub.close()
        rogue.close(linger=0)
        ctx.term()


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=messages)
def test_garbage_frames_are_counted_and_dropped(batch: list[list[bytes]]) -> None:
    asyncio.run(_exercise(batch))


def _active(request_id: str) -> bytes:
    ev = events_pb2.ActiveSequenceEvent(
        request_id=request_id, kind=events_pb2.ACTIVE_SEQUENCE_EVENT_KIND_ADDED, instance_id="w", decode_blocks=1
    )
    return events_pb2.ActiveSequences(router_id="rogue", events=[ev]).SerializeToString()


async def _exercise_replica_sync(batch: list[list[bytes]]) -> None:
    ctx = zmq.asyncio.Context.instance()
    rogue = ctx.socket(zmq.PUB)
    rogue.setsockopt(zmq.LINGER, 0)
    port = rogue.bind_to_random_port("tcp://127.0.0.1")
    router = Router(RouterConfig(), "me")
    seen: list[str] = []
    apply_remote = router.apply_remote

    def record(change: ActiveChange, router_id: str) -> None:
        seen.append(change.request_id)
        apply_remote(change, router_id)

    router.apply_remote = record  # type: ignore[method-assign]
    sync = ActiveSync(router, "m")
    sync.start()
    try:
        sync.set_peers({f"tcp://127.0.0.1:{port}": ""})
        deadline = time.monotonic() + 10
        while "probe" not in seen and time.monotonic() < deadline:
            await rogue.send_multipart([b"active.m", pack_seq(1), _active("probe")])
            await asyncio.sleep(0.02)
        assert "probe" in seen, "replica sync never joined the rogue publisher"
        before = sync.bad_messages
        garbage = [[b"active.m" + f[0][4:], *f[1:]] for f in batch]  # same shapes, on the replicas' topic
        for frames in garbage:
            await rogue.send_multipart(frames)
        await rogue.send_multipart([b"active.m", pack_seq(2), _active("marker")])
        while "marker" not in seen and time.monotonic() < deadline + 10:
            assert sync._task is not None and not sync._task.done(), "replica sync's receive loop died"
            await asyncio.sleep(0.01)
        assert "marker" in seen, "replica sync stopped processing"
        assert sync.bad_messages - before >= sum(_structurally_bad(f) for f in garbage)
    finally:
        await sync.close()
        rogue.close(linger=0)


@settings(max_examples=4, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=messages)
def test_replica_sync_drops_garbage(batch: list[list[bytes]]) -> None:
    asyncio.run(_exercise_replica_sync(batch))
