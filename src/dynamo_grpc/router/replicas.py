"""Router replicas share active sequences over the event plane (``active.<model>``).

Each replica binds a PUB socket (its Consul Meta ``zmq_endpoint``) and subscribes to every
other replica (``dynamo-router`` instances, or the ``dynamo-frontend`` instances whose embedded
routers sync), so load routed by one replica counts in all of them: every decision, prefill
completion and free is published as it happens (Dynamo's AddRequest / MarkPrefillCompleted / Free).
Every ``snapshot_interval_s`` each replica also publishes its whole active set: a replica that starts
late (or lost messages to a full queue) catches up from it, and a replica whose snapshots stop for
``3 * snapshot_interval_s`` is taken for dead and the load it routed is expired everywhere else.
Several embedded routers of one process (one per model) share one PUB socket (``shared``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping

import zmq
import zmq.asyncio

from dynamo_grpc.events.curve import CurveConfig, CurveError
from dynamo_grpc.events.sockets import BoundPub, bind_pub, connect_sub, open_sub
from dynamo_grpc.events.topics import active_topic, pack_seq, unpack_seq
from dynamo_grpc.router.router import ActiveChange, Router
from dynamo_grpc.v1 import events_pb2

log = logging.getLogger(__name__)

_KIND_TO_PB = {
    "added": events_pb2.ACTIVE_SEQUENCE_EVENT_KIND_ADDED,
    "prefill_done": events_pb2.ACTIVE_SEQUENCE_EVENT_KIND_PREFILL_DONE,
    "freed": events_pb2.ACTIVE_SEQUENCE_EVENT_KIND_FREED,
}
_PB_TO_KIND = {v: k for k, v in _KIND_TO_PB.items()}


class ActiveSync:
    """PUB our router's active-sequence changes; SUB to the other replicas'."""

    def __init__(
        self,
        router: Router,
        model: str,
        bind_host: str = "127.0.0.1",
        curve: CurveConfig | None = None,
        port: int = 0,
        shared: BoundPub | None = None,
        snapshot_interval_s: float = 1.0,
    ) -> None:
        self.router = router
        self.topic = active_topic(model)
        self.curve = curve
        ctx = zmq.asyncio.Context.instance()
        self._owns_pub = shared is None
        self._bound = shared if shared is not None else bind_pub(ctx, bind_host, port, curve=curve)
        self._pub = self._bound.sock
        self.endpoint = self._bound.endpoint
        #: Consul Meta of this replica: ``zmq_endpoint`` (+ ``zmq_public_key`` with CURVE)
        self.meta = self._bound.meta()
        self._sub = open_sub(ctx, [self.topic])
        self._peers: dict[str, str] = {}
        self._seq = 0
        self._task: asyncio.Task[None] | None = None  # the receive loop
        self._tasks: list[asyncio.Task[None]] = []
        self.snapshot_interval_s = snapshot_interval_s
        #: router_id -> monotonic time of its last message (snapshots keep it fresh)
        self.last_seen: dict[str, float] = {}
        self.received = 0
        #: replicas declared dead (silent for 3 snapshot intervals) and the sequences expired with them
        self.expired_replicas = 0
        self.expired_sequences = 0
        #: malformed messages dropped (frame count, topic, seq frame, payload)
        self.bad_messages = 0

    def _send(self, msg: events_pb2.ActiveSequences) -> None:
        self._seq += 1
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart([self.topic, pack_seq(self._seq), msg.SerializeToString()], flags=zmq.NOBLOCK)

    def publish(self, change: ActiveChange) -> None:
        """Hooked as ``router.on_active_change`` (called on the loop thread)."""
        msg = events_pb2.ActiveSequences(
            router_id=self.router.router_id,
            events=[
                events_pb2.ActiveSequenceEvent(
                    request_id=change.request_id,
                    kind=_KIND_TO_PB[change.kind],
                    instance_id=change.instance_id,
                    dp_rank=change.dp_rank,
                    prefill_blocks=change.prefill_blocks,
                    decode_blocks=change.decode_blocks,
                    timestamp=time.time(),
                )
            ],
        )
        self._send(msg)

    def publish_snapshot(self) -> None:
        """Our whole active set, for late joiners and as a sign of life."""
        now = time.time()
        events = []
        for rid, seq in self.router.active.of_router(self.router.router_id):
            iid, rank = seq.worker if isinstance(seq.worker, tuple) else (str(seq.worker), 0)
            events.append(
                events_pb2.ActiveSequenceEvent(
                    request_id=rid,
                    kind=events_pb2.ACTIVE_SEQUENCE_EVENT_KIND_ADDED,
                    instance_id=iid,
                    dp_rank=rank,
                    prefill_blocks=seq.prefill_blocks,
                    decode_blocks=seq.decode_blocks,
                    timestamp=now,
                )
            )
        self._send(events_pb2.ActiveSequences(router_id=self.router.router_id, events=events, snapshot=True))

    def expire_silent(self) -> int:
        """Drop the load of replicas not heard from for 3 snapshot intervals; returns how many."""
        cutoff = time.monotonic() - 3 * self.snapshot_interval_s
        dead = [rid for rid, t in self.last_seen.items() if t < cutoff]
        for rid in dead:
            del self.last_seen[rid]
            n = self.router.drop_replica(rid)
            self.expired_replicas += 1
            self.expired_sequences += n
            log.warning("router replica %s silent for %.1fs: expired its %d in-flight sequences",
                        rid, 3 * self.snapshot_interval_s, n)
        return len(dead)

    def set_peers(self, peers: Mapping[str, str]) -> None:
        """Follow exactly these replicas: ``{zmq_endpoint: zmq_public_key ("" if plain)}``."""
        wanted = {ep: key for ep, key in peers.items() if ep != self.endpoint}
        for ep in [ep for ep in self._peers if self._peers[ep] != wanted.get(ep)]:
            with contextlib.suppress(zmq.ZMQError):
                self._sub.disconnect(ep)
            del self._peers[ep]
        for ep, key in wanted.items():
            if ep in self._peers:
                continue
            try:
                connect_sub(self._sub, ep, self.curve, key)
            except CurveError as exc:
                log.error("not following router replica at %s: %s", ep, exc)
                continue
            self._peers[ep] = key

    def start(self) -> None:
        self._task = asyncio.create_task(self._recv(), name="active-sync")
        self._tasks = [self._task, asyncio.create_task(self._tick(), name="active-sync-snapshots")]

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.snapshot_interval_s)
            try:
                self.publish_snapshot()
                self.expire_silent()
            except Exception:  # one bad round must not end replica sync
                log.exception("active-sequence snapshot failed")

    def _apply(self, msg: events_pb2.ActiveSequences) -> None:
        if msg.router_id == self.router.router_id:
            return
        self.last_seen[msg.router_id] = time.monotonic()
        changes = []
        for ev in msg.events:
            kind = _PB_TO_KIND.get(ev.kind)
            if kind is None:
                continue
            changes.append(
                ActiveChange(kind, ev.request_id, ev.instance_id, ev.dp_rank, ev.prefill_blocks, ev.decode_blocks)
            )
        if msg.snapshot:
            self.router.apply_remote_snapshot(changes, msg.router_id)
        else:
            for change in changes:
                self.router.apply_remote(change, msg.router_id)
        self.received += len(changes)

    async def _recv(self) -> None:
        while True:
            frames = await self._sub.recv_multipart()
            try:
                if len(frames) != 3:
                    raise ValueError(f"{len(frames)} frames, topic {frames[0][:40]!r}")
                unpack_seq(frames[1])
                if frames[0] != self.topic:
                    if frames[0].startswith(self.topic):
                        continue  # another model whose name extends ours (ZMQ topics are prefixes)
                    raise ValueError(f"topic {frames[0][:40]!r}")
                self._apply(events_pb2.ActiveSequences.FromString(frames[2]))
            except Exception as exc:
                self.bad_messages += 1
                log.warning("bad ActiveSequences message dropped (%d so far): %s", self.bad_messages, exc)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._owns_pub:
            self._bound.close()
        self._sub.close(linger=0)
