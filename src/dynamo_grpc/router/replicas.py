"""Router replicas share active sequences over the event plane (``active.<model>``).

Each replica binds a PUB socket (its Consul Meta ``zmq_endpoint``) and subscribes to every
other ``dynamo-router`` instance, so load routed by one replica counts in all of them.
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
from dynamo_grpc.events.sockets import bind_pub, connect_sub, open_sub
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
    ) -> None:
        self.router = router
        self.topic = active_topic(model)
        self.curve = curve
        ctx = zmq.asyncio.Context.instance()
        self._bound = bind_pub(ctx, bind_host, port, curve=curve)
        self._pub = self._bound.sock
        self.endpoint = self._bound.endpoint
        #: Consul Meta of this replica: ``zmq_endpoint`` (+ ``zmq_public_key`` with CURVE)
        self.meta = self._bound.meta()
        self._sub = open_sub(ctx, [self.topic])
        self._peers: dict[str, str] = {}
        self._seq = 0
        self._task: asyncio.Task[None] | None = None
        self.received = 0
        #: malformed messages dropped (frame count, topic, seq frame, payload)
        self.bad_messages = 0

    def publish(self, change: ActiveChange) -> None:
        """Hooked as ``router.on_active_change`` (called on the loop thread)."""
        self._seq += 1
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
        with contextlib.suppress(zmq.Again):
            self._pub.send_multipart([self.topic, pack_seq(self._seq), msg.SerializeToString()], flags=zmq.NOBLOCK)

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

    async def _recv(self) -> None:
        while True:
            frames = await self._sub.recv_multipart()
            try:
                if len(frames) != 3 or frames[0] != self.topic:
                    raise ValueError(f"{len(frames)} frames, topic {frames[0][:40]!r}")
                unpack_seq(frames[1])
                msg = events_pb2.ActiveSequences.FromString(frames[2])
                for ev in msg.events:
                    kind = _PB_TO_KIND.get(ev.kind)
                    if kind is None:
                        continue
                    change = ActiveChange(
                        kind, ev.request_id, ev.instance_id, ev.dp_rank, ev.prefill_blocks, ev.decode_blocks
                    )
                    self.router.apply_remote(change, msg.router_id)
                    self.received += 1
            except Exception as exc:
                self.bad_messages += 1
                log.warning("bad ActiveSequences message dropped (%d so far): %s", self.bad_messages, exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._bound.close()
        self._sub.close(linger=0)
