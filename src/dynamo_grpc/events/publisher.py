"""A worker's ZeroMQ PUB socket for KV events and load metrics, with a replay ring buffer.

No broker: the worker binds, advertises :attr:`KvEventPublisher.endpoint` in its Consul Meta,
and routers connect. Publishing never blocks the engine: the PUB socket drops messages past
its send high-water mark, and subscribers see the hole as a seq gap and call Replay, which is
served from :attr:`ring` (recent batches) or a full dump of the engine's blocks.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence

import zmq

from dynamo_grpc.events import codec
from dynamo_grpc.events.curve import CurveConfig
from dynamo_grpc.events.kv import KvEvent, KvStored, LoadMetrics
from dynamo_grpc.events.sockets import DEFAULT_SNDHWM, MAX_EVENT_FRAME_BYTES, bind_pub, check_topic
from dynamo_grpc.events.topics import kv_topic, load_topic, pack_seq
from dynamo_grpc.v1 import events_pb2

log = logging.getLogger(__name__)

DEFAULT_RING_SIZE = 4096


class KvEventPublisher:
    """Publishes one worker rank's KV events (``kv.<model>``) and load (``load.<model>``).

    Thread-safe: engines call :meth:`publish_kv` from their own thread. A lock serialises
    numbering, the ring buffer and the (non-blocking) send, so seq order on the wire is
    the order of the ring.
    """

    def __init__(
        self,
        instance_id: str,
        model: str,
        block_size: int,
        dp_rank: int = 0,
        bind_host: str = "127.0.0.1",
        ring_size: int = DEFAULT_RING_SIZE,
        *,
        port: int = 0,
        sndhwm: int = DEFAULT_SNDHWM,
        context: zmq.Context | None = None,  # type: ignore[type-arg]
        curve: CurveConfig | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        if ring_size <= 0:
            raise ValueError("ring_size must be positive")
        self.instance_id = instance_id
        self.model = model
        self.block_size = block_size
        self.dp_rank = dp_rank
        #: random per start; subscribers that see it change know this worker restarted
        self.epoch = secrets.randbits(63) + 1
        self._kv_topic = check_topic(kv_topic(model))
        self._load_topic = check_topic(load_topic(model))
        self._lock = threading.Lock()
        self._seq = 0
        self._load_seq = 0
        self._ring: deque[events_pb2.KvEventBatch] = deque(maxlen=ring_size)
        self._closed = False
        #: batches the PUB socket refused (HWM reached); subscribers recover them by Replay
        self.dropped = 0
        #: batches too large for one frame (MAX_EVENT_FRAME_BYTES); subscribers recover them by Replay
        self.oversized = 0
        self._pub = bind_pub(context or zmq.Context.instance(), bind_host, port, curve, sndhwm)
        self._sock = self._pub.sock
        #: what subscribers connect to; the worker puts it in Consul Meta ``zmq_endpoint``
        self.endpoint = self._pub.endpoint
        #: Z85 CURVE public key ("" when plain); the worker puts it in Consul Meta ``zmq_public_key``
        self.public_key = self._pub.public_key
        log.info("KV event publisher %s rank %d on %s (epoch %d)", instance_id, dp_rank, self.endpoint, self.epoch)

    def meta(self) -> dict[str, str]:
        """Consul Meta entries for this publisher: ``zmq_endpoint`` (+ ``zmq_public_key`` with CURVE)."""
        return self._pub.meta()

    @property
    def seq(self) -> int:
        """Seq of the last published KV batch (0 before the first)."""
        with self._lock:
            return self._seq

    def publish_kv(self, events: Sequence[KvEvent]) -> int:
        """Number, record and send one batch; returns its seq (0 if empty or closed)."""
        if not events:
            return 0
        now = time.time()
        with self._lock:
            if self._closed:
                return 0
            self._seq += 1
            batch = codec.make_batch(
                self.instance_id, self.dp_rank, self._seq, self.epoch, self.block_size, events, now
            )
            self._ring.append(batch)
            self._send(self._kv_topic, self._seq, batch.SerializeToString())
            return self._seq

    def publish_load(self, metrics: LoadMetrics) -> None:
        """Send the current load (not replayed: the next one supersedes it)."""
        msg = codec.load_to_pb(self.instance_id, self.dp_rank, metrics, time.time())
        with self._lock:
            if self._closed:
                return
            self._load_seq += 1
            self._send(self._load_topic, self._load_seq, msg.SerializeToString())

    def _send(self, topic: bytes, seq: int, payload: bytes) -> None:
        if len(payload) > MAX_EVENT_FRAME_BYTES:
            self.oversized += 1
            log.warning("%s seq %d: %d-byte message left to Replay (frame limit)", topic.decode(), seq, len(payload))
            return
        try:
            self._sock.send_multipart([topic, pack_seq(seq), payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1

    def replay_since(self, from_seq: int) -> list[events_pb2.KvEventBatch] | None:
        """Ring batches with seq > from_seq, or None when the ring no longer covers them."""
        with self._lock:
            if from_seq > self._seq:
                return None  # a seq from a previous epoch: the caller needs a dump
            if from_seq == self._seq:
                return []
            if not self._ring or self._ring[0].seq > from_seq + 1:
                return None
            start = from_seq + 1 - self._ring[0].seq
            return [self._ring[i] for i in range(start, len(self._ring))]

    def dump_batches(
        self, stored: Iterable[KvStored], seq: int, max_events: int = 4096
    ) -> list[events_pb2.KvEventBatch]:
        """A full dump as batches numbered ``seq`` (the seq taken *before* reading the blocks).

        Events after ``seq`` are replayed on top; stores and removals are idempotent, so a
        dump that already includes some of them converges to the same view.
        """
        now = time.time()
        out: list[events_pb2.KvEventBatch] = []
        chunk: list[KvEvent] = []
        for ev in stored:
            chunk.append(ev)
            if len(chunk) >= max_events:
                out.append(
                    codec.make_batch(self.instance_id, self.dp_rank, seq, self.epoch, self.block_size, chunk, now)
                )
                chunk = []
        if chunk or not out:
            out.append(codec.make_batch(self.instance_id, self.dp_rank, seq, self.epoch, self.block_size, chunk, now))
        return out

    async def close(self) -> None:
        """Stop publishing and close the socket (safe to call twice)."""
        self.close_sync()

    def close_sync(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._pub.close()
