"""KvEventsService: serves a worker's ring buffer or a full dump to subscribers that missed events."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import grpc

from dynamo_grpc.events.kv import KvStored
from dynamo_grpc.events.publisher import KvEventPublisher
from dynamo_grpc.v1 import events_pb2, events_pb2_grpc

log = logging.getLogger(__name__)

DumpFn = Callable[[], Iterable[KvStored] | Awaitable[Iterable[KvStored]]]


class KvEventsServicer(events_pb2_grpc.KvEventsServiceServicer):
    """Replay(from_seq): ring batches after from_seq, else a full dump then the batches after it.

    ``dump_fn`` is the engine's ``cached_blocks`` (sync or async).
    """

    def __init__(self, publisher: KvEventPublisher, dump_fn: DumpFn) -> None:
        self.publisher = publisher
        self.dump_fn = dump_fn

    async def Replay(
        self, request: events_pb2.ReplayRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[events_pb2.ReplayResponse]:
        if not request.full_dump:
            batches = self.publisher.replay_since(request.from_seq)
            if batches is not None:
                for b in batches:
                    yield events_pb2.ReplayResponse(batch=b)
                return
        seq = self.publisher.seq
        try:
            result = self.dump_fn()
            stored = await result if inspect.isawaitable(result) else result
            stored_list = list(stored)
        except Exception as exc:  # the engine failed; say so instead of sending a wrong view
            log.exception("KV dump failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"KV block dump failed: {exc}")
            return
        for i, b in enumerate(self.publisher.dump_batches(stored_list, seq)):
            yield events_pb2.ReplayResponse(batch=b, full_dump=(i == 0))
        after = self.publisher.replay_since(seq) or []
        for b in after:
            yield events_pb2.ReplayResponse(batch=b)
        log.info("Replay: sent full dump (%d chains) at seq %d plus %d batches", len(stored_list), seq, len(after))
