"""gRPC client side of KvEventsService.Replay, as a plain async iterator of (batch, full_dump)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from dynamo_grpc.transport import ChannelOptions, open_channel
from dynamo_grpc.v1 import events_pb2, events_pb2_grpc


class GrpcReplayClient:
    """Keeps one channel per worker address; ``replay(address, from_seq)`` streams the answer."""

    def __init__(self, timeout_s: float = 30.0) -> None:
        self.timeout_s = timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _stub(self, address: str) -> events_pb2_grpc.KvEventsServiceStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = open_channel(address, ChannelOptions())
            self._channels[address] = ch
        return events_pb2_grpc.KvEventsServiceStub(ch)

    async def replay(
        self, address: str, from_seq: int, full_dump: bool = False
    ) -> AsyncIterator[tuple[events_pb2.KvEventBatch, bool]]:
        call = self._stub(address).Replay(
            events_pb2.ReplayRequest(from_seq=from_seq, full_dump=full_dump), timeout=self.timeout_s
        )
        async for resp in call:
            yield resp.batch, resp.full_dump

    async def forget(self, address: str) -> None:
        ch = self._channels.pop(address, None)
        if ch is not None:
            await ch.close()

    async def close(self) -> None:
        for addr in list(self._channels):
            await self.forget(addr)
