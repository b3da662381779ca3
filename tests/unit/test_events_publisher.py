"""KvEventPublisher and KvEventsServicer: wire format, thread safety, ring buffer, Replay over gRPC."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
import zmq

from dynamo_grpc.events import KvEventPublisher
from dynamo_grpc.events.codec import event_from_pb, event_to_pb
from dynamo_grpc.events.kv import KvCleared, KvRemoved, KvStored, LoadMetrics, StoredBlock
from dynamo_grpc.events.service import KvEventsServicer
from dynamo_grpc.events.topics import unpack_seq
from dynamo_grpc.transport import GrpcServer, ServerOptions, open_channel
from dynamo_grpc.v1 import events_pb2, events_pb2_grpc


def stored(*hashes: int, parent: int | None = None) -> KvStored:
    return KvStored(parent, [StoredBlock(h, h ^ 0xFF) for h in hashes])


def _sub(endpoint: str, topic: bytes = b"") -> zmq.Socket:  # type: ignore[type-arg]
    s = zmq.Context.instance().socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 3000)
    s.setsockopt(zmq.SUBSCRIBE, topic)
    s.connect(endpoint)
    return s


def _wait_joined(pub: KvEventPublisher, sub: zmq.Socket) -> None:  # type: ignore[type-arg]
    """PUB/SUB joins asynchronously: publish load probes until one arrives."""
    sub.setsockopt(zmq.RCVTIMEO, 50)
    for _ in range(100):
        pub.publish_load(LoadMetrics(0, 1, 0, 0))
        try:
            while True:
                if sub.recv_multipart()[0].startswith(b"load."):
                    sub.setsockopt(zmq.RCVTIMEO, 3000)
                    return
        except zmq.Again:
            continue
    raise AssertionError("subscriber never joined")


def test_codec_roundtrip() -> None:
    for ev in [stored(1, 2, 3), stored(5, parent=2**64 - 1), KvRemoved([7, 8]), KvCleared()]:
        assert event_from_pb(event_to_pb(ev)) == ev
    with pytest.raises(ValueError):
        event_from_pb(events_pb2.KvEvent())
    with pytest.raises(TypeError):
        event_to_pb("nope")  # type: ignore[arg-type]


def test_frames_topic_seq_epoch() -> None:
    pub = KvEventPublisher("w-1", "m", block_size=16)
    sub = _sub(pub.endpoint)
    try:
        _wait_joined(pub, sub)
        sub.setsockopt(zmq.UNSUBSCRIBE, b"")
        sub.setsockopt(zmq.SUBSCRIBE, b"kv.m")
        time.sleep(0.1)
        assert pub.publish_kv([]) == 0
        assert pub.publish_kv([stored(1, 2)]) == 1
        assert pub.publish_kv([KvRemoved([1]), KvCleared()]) == 2
        for want in (1, 2):
            topic, seq_frame, payload = sub.recv_multipart()
            assert topic == b"kv.m"
            assert len(seq_frame) == 8 and unpack_seq(seq_frame) == want
            batch = events_pb2.KvEventBatch.FromString(payload)
            assert (batch.instance_id, batch.seq, batch.epoch, batch.block_size) == ("w-1", want, pub.epoch, 16)
            assert batch.timestamp > 0
        assert pub.endpoint.startswith("tcp://127.0.0.1:")
    finally:
        sub.close()
        pub.close_sync()


def test_epoch_differs_per_start() -> None:
    a = KvEventPublisher("w", "m", 16)
    b = KvEventPublisher("w", "m", 16)
    try:
        assert a.epoch != b.epoch and a.epoch > 0
    finally:
        a.close_sync()
        b.close_sync()


def test_bad_args() -> None:
    with pytest.raises(ValueError):
        KvEventPublisher("w", "m", 0)
    with pytest.raises(ValueError):
        KvEventPublisher("w", "m", 16, ring_size=0)


def test_thread_safe_publish_numbers_in_wire_order() -> None:
    pub = KvEventPublisher("w", "m", 16, ring_size=100_000)
    sub = _sub(pub.endpoint, b"kv.m")
    try:
        _wait_joined_kv = _sub(pub.endpoint)
        _wait_joined(pub, _wait_joined_kv)
        _wait_joined_kv.close()
        time.sleep(0.2)
        n_threads, per = 8, 300

        def run(t: int) -> None:
            for i in range(per):
                pub.publish_kv([stored(t * 1_000_000 + i)])

        threads = [threading.Thread(target=run, args=(t,)) for t in range(n_threads)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        seqs = [unpack_seq(sub.recv_multipart()[1]) for _ in range(n_threads * per)]
        assert seqs == list(range(1, n_threads * per + 1))
        ring = pub.replay_since(0)
        assert ring is not None and [b.seq for b in ring] == seqs
        hashes = {b.events[0].stored.blocks[0].block_hash for b in ring}
        assert len(hashes) == n_threads * per
    finally:
        sub.close()
        pub.close_sync()


def test_ring_window() -> None:
    pub = KvEventPublisher("w", "m", 16, ring_size=4)
    try:
        assert pub.replay_since(0) == []
        for i in range(6):
            pub.publish_kv([stored(i + 1)])
        assert pub.replay_since(6) == []
        got = pub.replay_since(2)
        assert got is not None and [b.seq for b in got] == [3, 4, 5, 6]
        assert pub.replay_since(1) is None  # seq 2 fell out of the ring
        assert pub.replay_since(0) is None
        assert pub.replay_since(7) is None  # from a previous epoch
    finally:
        pub.close_sync()


def test_slow_subscriber_never_blocks() -> None:
    pub = KvEventPublisher("w", "m", 16, sndhwm=10, ring_size=10)
    sub = _sub(pub.endpoint)
    sub.setsockopt(zmq.RCVHWM, 10)
    try:
        _wait_joined(pub, sub)
        t0 = time.monotonic()
        for i in range(20_000):
            pub.publish_kv([stored(i + 1)])
        assert time.monotonic() - t0 < 10
        assert pub.seq == 20_000
    finally:
        sub.close()
        pub.close_sync()


def test_a_batch_over_the_frame_limit_goes_by_replay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Subscribers drop peers sending frames over MAX_EVENT_FRAME_BYTES, so the publisher never sends one."""
    from dynamo_grpc.events import publisher as publisher_module

    monkeypatch.setattr(publisher_module, "MAX_EVENT_FRAME_BYTES", 200)
    pub = KvEventPublisher("w", "m", 16)
    sub = _sub(pub.endpoint)
    try:
        _wait_joined(pub, sub)
        sub.setsockopt(zmq.UNSUBSCRIBE, b"")
        sub.setsockopt(zmq.SUBSCRIBE, b"kv.m")
        time.sleep(0.1)
        big = stored(*range(1, 40))  # well over 200 bytes
        assert pub.publish_kv([big]) == 1 and pub.oversized == 1
        assert pub.publish_kv([stored(99)]) == 2
        _topic, seq_frame, _payload = sub.recv_multipart()
        assert unpack_seq(seq_frame) == 2  # the subscriber sees a gap at 1 ...
        replayed = pub.replay_since(0)  # ... and Replay has it
        assert replayed is not None and [b.seq for b in replayed] == [1, 2]
        assert len(replayed[0].events[0].stored.blocks) == 39
    finally:
        sub.close()
        pub.close_sync()


async def test_close_is_idempotent_and_stops_publishing() -> None:
    pub = KvEventPublisher("w", "m", 16)
    await pub.close()
    await pub.close()
    assert pub.publish_kv([stored(1)]) == 0
    pub.publish_load(LoadMetrics(1, 2, 0, 0))


class _Engine:
    def __init__(self) -> None:
        self.blocks: list[KvStored] = []
        self.fail = False

    def cached_blocks(self) -> list[KvStored]:
        if self.fail:
            raise RuntimeError("engine exploded")
        return list(self.blocks)


async def _serve(pub: KvEventPublisher, engine: _Engine) -> tuple[GrpcServer, events_pb2_grpc.KvEventsServiceStub]:
    srv = GrpcServer(ServerOptions("127.0.0.1", 0))
    srv.add(
        events_pb2_grpc.add_KvEventsServiceServicer_to_server,
        KvEventsServicer(pub, engine.cached_blocks),
        "dynamo_grpc.v1.KvEventsService",
    )
    addr = await srv.start()
    return srv, events_pb2_grpc.KvEventsServiceStub(open_channel(addr))


async def test_replay_service_ring_dump_and_errors() -> None:
    pub = KvEventPublisher("w", "m", 16, ring_size=3)
    engine = _Engine()
    srv, stub = await _serve(pub, engine)
    try:
        for i in range(5):
            pub.publish_kv([stored(i + 1)])
        engine.blocks = [stored(1, 2, 3), stored(4, parent=3)]
        got = [r async for r in stub.Replay(events_pb2.ReplayRequest(from_seq=3))]
        assert [(r.batch.seq, r.full_dump) for r in got] == [(4, False), (5, False)]
        # seq 1 is gone: a full dump numbered with the current seq
        got = [r async for r in stub.Replay(events_pb2.ReplayRequest(from_seq=0))]
        assert got[0].full_dump and got[0].batch.seq == 5 and got[0].batch.epoch == pub.epoch
        assert [event_from_pb(e) for e in got[0].batch.events] == engine.blocks
        assert all(not r.full_dump for r in got[1:])
        # asked explicitly
        got = [r async for r in stub.Replay(events_pb2.ReplayRequest(from_seq=4, full_dump=True))]
        assert got[0].full_dump
        # an empty worker still answers with one (empty) dump batch
        engine.blocks = []
        got = [r async for r in stub.Replay(events_pb2.ReplayRequest(full_dump=True))]
        assert len(got) == 1 and got[0].full_dump and not got[0].batch.events
        engine.fail = True
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            _ = [r async for r in stub.Replay(events_pb2.ReplayRequest(full_dump=True))]
        assert ei.value.code() == grpc.StatusCode.INTERNAL
        assert "engine exploded" in (ei.value.details() or "")
    finally:
        await srv.stop(0)
        await pub.close()


async def test_dump_chunks_large_block_sets() -> None:
    pub = KvEventPublisher("w", "m", 16)
    engine = _Engine()
    engine.blocks = [stored(i + 1) for i in range(10_000)]
    srv, stub = await _serve(pub, engine)
    try:
        got = [r async for r in stub.Replay(events_pb2.ReplayRequest(full_dump=True))]
        assert len(got) == 3 and got[0].full_dump and not got[1].full_dump
        assert sum(len(r.batch.events) for r in got) == 10_000
    finally:
        await srv.stop(0)
        await pub.close()


async def test_async_dump_fn() -> None:
    pub = KvEventPublisher("w", "m", 16)

    async def dump() -> list[KvStored]:
        await asyncio.sleep(0)
        return [stored(9)]

    srv = GrpcServer(ServerOptions("127.0.0.1", 0))
    srv.add(events_pb2_grpc.add_KvEventsServiceServicer_to_server, KvEventsServicer(pub, dump), "x")
    stub = events_pb2_grpc.KvEventsServiceStub(open_channel(await srv.start()))
    try:
        got = [r async for r in stub.Replay(events_pb2.ReplayRequest(full_dump=True))]
        assert got[0].batch.events[0].stored.blocks[0].block_hash == 9
    finally:
        await srv.stop(0)
        await pub.close()
