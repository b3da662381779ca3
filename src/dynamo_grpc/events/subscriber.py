"""Subscribe to many workers' KV events; detect gaps and restarts; recover with Replay.

One ZMQ SUB socket connects to every worker endpoint discovery reports. Per worker rank we
keep (epoch, last applied seq). A batch with the next seq is applied; a hole in seq, an
unknown worker or a new epoch starts a Replay (ring batches since our seq, or a full dump
that replaces our view), while live batches for that worker are buffered and applied after
it. A periodic Replay from the last seq also catches a lost *last* message, which no later
seq would reveal. A slow subscriber never blocks a worker: the PUB side drops, we replay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

import zmq
import zmq.asyncio

from dynamo_grpc.events.curve import CurveConfig, CurveError
from dynamo_grpc.events.sockets import connect_sub, open_sub
from dynamo_grpc.events.topics import kv_topic, load_topic, unpack_seq
from dynamo_grpc.v1 import events_pb2

log = logging.getLogger(__name__)

WorkerKey = tuple[str, int]  # (instance_id, dp_rank)


class ReplaySource(Protocol):
    """Where Replay is served (the gRPC client, or a fake in unit tests)."""

    def replay(
        self, address: str, from_seq: int, full_dump: bool = False
    ) -> AsyncIterator[tuple[events_pb2.KvEventBatch, bool]]: ...


class EventSink(Protocol):
    """What the subscriber feeds (the router's indexer adapter)."""

    def apply_batch(self, batch: events_pb2.KvEventBatch) -> None:
        """Apply a batch's events in order."""

    def clear_worker(self, instance_id: str, dp_rank: int) -> None:
        """Forget everything about this worker rank (before a full dump, or on restart)."""

    def remove_worker(self, instance_id: str) -> None:
        """The worker is gone."""

    def on_load(self, load: events_pb2.LoadMetrics) -> None:
        """Latest load of a worker rank."""


@dataclass
class SubscriberStats:
    """Counters for metrics."""

    batches_applied: int = 0
    events_applied: int = 0
    gaps: int = 0
    replays: int = 0
    full_dumps: int = 0
    epoch_changes: int = 0
    replay_errors: int = 0
    #: messages dropped as malformed (frame count, seq frame, payload, seq mismatch)
    bad_messages: int = 0
    #: workers not subscribed because their CURVE setting does not match ours
    refused_workers: int = 0
    last_lag_s: float = 0.0


@dataclass
class _RankState:
    epoch: int = 0
    last_seq: int = 0
    synced: bool = False
    syncing: bool = False
    buffer: list[tuple[int, events_pb2.KvEventBatch]] = field(default_factory=list)


@dataclass
class _Worker:
    instance_id: str
    endpoint: str
    grpc_address: str
    server_key: str = ""
    ranks: dict[int, _RankState] = field(default_factory=dict)


class KvEventSubscriber:
    """Keeps a sink in step with the KV events of every worker of one model."""

    def __init__(
        self,
        model: str,
        sink: EventSink,
        replay: ReplaySource,
        *,
        resync_interval_s: float = 2.0,
        on_lag: Callable[[float], None] | None = None,
        context: zmq.asyncio.Context | None = None,
        curve: CurveConfig | None = None,
    ) -> None:
        self.model = model
        self.sink = sink
        self.replay_source = replay
        self.resync_interval_s = resync_interval_s
        self.on_lag = on_lag
        self.stats = SubscriberStats()
        self._kv_topic = kv_topic(model)
        self._load_topic = load_topic(model)
        self.curve = curve
        self._ctx = context or zmq.asyncio.Context.instance()
        self._sock = open_sub(self._ctx, [self._kv_topic, self._load_topic])
        self._workers: dict[str, _Worker] = {}
        self._refused: dict[str, tuple[str, str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._recv_task: asyncio.Task[None] | None = None
        self._resync_task: asyncio.Task[None] | None = None

    # ---- worker membership -------------------------------------------------------------
    @property
    def workers(self) -> list[str]:
        return list(self._workers)

    def is_synced(self) -> bool:
        """Every known worker has had its first Replay applied."""
        return all(r.synced for w in self._workers.values() for r in w.ranks.values()) and all(
            w.ranks for w in self._workers.values()
        )

    def synced_workers(self) -> set[str]:
        """Workers whose every rank has had its Replay applied (the others are still retrying)."""
        return {iid for iid, w in self._workers.items() if w.ranks and all(r.synced for r in w.ranks.values())}

    def add_worker(
        self, instance_id: str, endpoint: str, grpc_address: str, dp_size: int = 1, server_key: str = ""
    ) -> None:
        """Connect to a worker and start its initial Replay (idempotent).

        ``server_key`` is the worker's advertised CURVE public key (Consul Meta ``zmq_public_key``).
        A worker whose CURVE setting does not match ours is logged and left out (its handshake
        could never succeed).
        """
        w = self._workers.get(instance_id)
        if w is not None and (w.endpoint, w.grpc_address, w.server_key) == (endpoint, grpc_address, server_key):
            return
        if w is not None:
            self.remove_worker(instance_id)
        if self._refused.get(instance_id) == (endpoint, server_key):
            return  # already said why
        try:
            connect_sub(self._sock, endpoint, self.curve, server_key)
        except CurveError as exc:
            self._refused[instance_id] = (endpoint, server_key)
            self.stats.refused_workers += 1
            log.error("not subscribing to %s: %s", instance_id, exc)
            return
        self._refused.pop(instance_id, None)
        w = _Worker(instance_id, endpoint, grpc_address, server_key)
        for rank in range(max(dp_size, 1)):
            w.ranks[rank] = _RankState()
        self._workers[instance_id] = w
        log.info("subscribed to %s at %s (replay via %s)", instance_id, endpoint, grpc_address)
        for rank in w.ranks:
            self._start_replay(w, rank, from_seq=0, reason="new worker")

    def remove_worker(self, instance_id: str) -> None:
        """Disconnect and drop a worker's state from the sink."""
        self._refused.pop(instance_id, None)
        w = self._workers.pop(instance_id, None)
        if w is None:
            return
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disconnect(w.endpoint)
        self.sink.remove_worker(instance_id)
        log.info("unsubscribed from %s", instance_id)

    def sync_workers(self, workers: list[tuple[str, str, str, int, str]]) -> None:
        """Make the subscribed workers ``[(instance_id, endpoint, grpc, dp_size, zmq_public_key)]``."""
        wanted = {w[0]: w for w in workers}
        for iid in list(self._workers):
            if iid not in wanted:
                self.remove_worker(iid)
        for iid, endpoint, grpc_address, dp_size, server_key in wanted.values():
            self.add_worker(iid, endpoint, grpc_address, dp_size, server_key)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._recv_task = asyncio.create_task(self._recv_loop(), name="kv-sub-recv")
        if self.resync_interval_s > 0:
            self._resync_task = asyncio.create_task(self._resync_loop(), name="kv-sub-resync")

    async def close(self) -> None:
        for t in [self._recv_task, self._resync_task, *self._tasks]:
            if t is not None:
                t.cancel()
        for t in [self._recv_task, self._resync_task, *self._tasks]:
            if t is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
        self._sock.close(linger=0)

    # ---- receiving -------------------------------------------------------------------------
    async def _recv_loop(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            try:
                self.handle_frames(frames)
            except Exception as exc:  # one bad message must not stop the plane
                self.stats.bad_messages += 1
                n = self.stats.bad_messages
                log.warning("bad event message dropped (%d so far): %s: %s", n, type(exc).__name__, exc)

    def handle_frames(self, frames: list[bytes]) -> None:
        """Process one multipart message (public for tests)."""
        if len(frames) != 3:
            raise ValueError(f"expected 3 frames, got {len(frames)}")
        topic, seq_frame, payload = frames
        seq = unpack_seq(seq_frame)
        if topic == self._load_topic:
            self.sink.on_load(events_pb2.LoadMetrics.FromString(payload))
            return
        if topic != self._kv_topic:
            return  # prefix match of another model's topic
        batch = events_pb2.KvEventBatch.FromString(payload)
        if batch.seq != seq:
            raise ValueError(f"seq frame {seq} != batch seq {batch.seq}")
        self._on_live_batch(batch)

    def _on_live_batch(self, batch: events_pb2.KvEventBatch) -> None:
        w = self._workers.get(batch.instance_id)
        if w is None:
            return  # not (yet) a discovered, passing worker
        st = w.ranks.setdefault(batch.dp_rank, _RankState())
        if st.syncing:
            st.buffer.append((batch.seq, batch))
            return
        if st.synced and st.epoch == 0:
            st.epoch = batch.epoch  # the first Replay was empty: adopt the live epoch
        if st.synced and batch.epoch != st.epoch:
            self.stats.epoch_changes += 1
            log.warning("%s rank %d restarted (epoch changed): resync", w.instance_id, batch.dp_rank)
            st.synced = False
            st.epoch = batch.epoch
            st.last_seq = 0
            self.sink.clear_worker(w.instance_id, batch.dp_rank)
            st.buffer.append((batch.seq, batch))
            self._start_replay(w, batch.dp_rank, from_seq=0, reason="epoch change")
            return
        if not st.synced:
            st.buffer.append((batch.seq, batch))
            self._start_replay(w, batch.dp_rank, from_seq=0, reason="unsynced")
            return
        if batch.seq <= st.last_seq:
            return  # already applied via Replay
        if batch.seq != st.last_seq + 1:
            self.stats.gaps += 1
            log.info("%s rank %d: gap %d..%d, replaying", w.instance_id, batch.dp_rank, st.last_seq + 1, batch.seq - 1)
            st.buffer.append((batch.seq, batch))
            self._start_replay(w, batch.dp_rank, from_seq=st.last_seq, reason="gap")
            return
        self._apply(st, batch)

    def _apply(self, st: _RankState, batch: events_pb2.KvEventBatch) -> None:
        self.sink.apply_batch(batch)
        st.last_seq = batch.seq
        self.stats.batches_applied += 1
        self.stats.events_applied += len(batch.events)
        if batch.timestamp:
            lag = max(time.time() - batch.timestamp, 0.0)
            self.stats.last_lag_s = lag
            if self.on_lag is not None:
                self.on_lag(lag)

    # ---- replay ----------------------------------------------------------------------------
    def _start_replay(self, w: _Worker, rank: int, from_seq: int, reason: str) -> None:
        st = w.ranks.setdefault(rank, _RankState())
        if st.syncing:
            return
        st.syncing = True
        task = asyncio.get_running_loop().create_task(self._replay(w, rank, from_seq, reason))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _replay(self, w: _Worker, rank: int, from_seq: int, reason: str) -> None:
        st = w.ranks[rank]
        delay = 0.1
        while self._workers.get(w.instance_id) is w:
            try:
                await self._replay_once(w, rank, st, from_seq)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.stats.replay_errors += 1
                log.warning("Replay from %s (%s) failed: %s; retrying in %.1fs", w.instance_id, reason, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                from_seq = st.last_seq if st.synced else 0
        st.syncing = False
        if self._workers.get(w.instance_id) is not w:
            return
        # Drain what arrived meanwhile; a hole left in it means another round.
        buffered = sorted(st.buffer, key=lambda x: x[0])
        st.buffer.clear()
        for i, (seq, batch) in enumerate(buffered):
            if batch.epoch != st.epoch:
                continue  # from before a restart we have already replayed past
            if seq <= st.last_seq:
                continue
            if seq != st.last_seq + 1:
                st.buffer.extend(buffered[i:])
                self.stats.gaps += 1
                self._start_replay(w, rank, st.last_seq, "gap after replay")
                return
            self._apply(st, batch)

    async def _replay_once(self, w: _Worker, rank: int, st: _RankState, from_seq: int) -> None:
        self.stats.replays += 1
        first = True
        restarted = False
        async for batch, full_dump in self.replay_source.replay(w.grpc_address, from_seq):
            if batch.dp_rank != rank:
                continue
            if first and full_dump:
                self.stats.full_dumps += 1
                self.sink.clear_worker(w.instance_id, rank)
                st.last_seq = 0
            elif first and st.epoch and batch.epoch != st.epoch:
                restarted = True  # the worker restarted since our last seq: our view is void
                break
            first = False
            st.epoch = batch.epoch
            if full_dump or batch.seq == st.last_seq:
                # dump chunks carry the dump's seq; apply them without moving it
                self.sink.apply_batch(batch)
                st.last_seq = batch.seq
                self.stats.events_applied += len(batch.events)
            elif batch.seq > st.last_seq:
                self._apply(st, batch)
        if restarted:
            self.stats.epoch_changes += 1
            self.sink.clear_worker(w.instance_id, rank)
            st.epoch = 0
            st.last_seq = 0
            await self._replay_once(w, rank, st, 0)
            return
        st.synced = True

    async def _resync_loop(self) -> None:
        """Anti-entropy: ask each synced worker for anything after our last seq."""
        while True:
            await asyncio.sleep(self.resync_interval_s)
            for w in list(self._workers.values()):
                for rank, st in list(w.ranks.items()):
                    if st.synced and not st.syncing:
                        self._start_replay(w, rank, st.last_seq, "periodic")
