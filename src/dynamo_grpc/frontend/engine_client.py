"""gRPC clients for the processes a request crosses: the worker's DecodeService and ModelFilesService.

Channels are kept per address. gRPC failures become `dynamo_grpc.errors` classes here (`errors.from_grpc`),
so the route session reads from the error itself whether to migrate, re-route or report.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator

import grpc

from dynamo_grpc import errors
from dynamo_grpc.transport import ChannelOptions, open_channel
from dynamo_grpc.v1 import worker_pb2, worker_pb2_grpc


def worker_error(e: grpc.aio.AioRpcError, address: str) -> errors.DynamoError:
    """A worker's failure: INTERNAL/UNKNOWN mean the worker broke (migrate), whatever class it named."""
    err = errors.from_grpc(e, f"worker {address}")
    if isinstance(err, errors.Internal):
        return errors.WorkerLost(err.message)
    return err


class ChannelPool:
    """One channel per peer address, closed together."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = open_channel(address, ChannelOptions())
            self._channels[address] = ch
        return ch

    async def drop(self, address: str, grace: float | None = None) -> None:
        """Close the channel to a peer that left; calls still on it get ``grace`` seconds to finish."""
        ch = self._channels.pop(address, None)
        if ch is not None:
            await ch.close(grace)

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close(None)
        self._channels.clear()


class WorkerClient:
    """Calls workers: Decode (streamed tokens) and GetModelFile (tokenizer bytes)."""

    def __init__(self, pool: ChannelPool | None = None) -> None:
        self.pool = pool or ChannelPool()

    async def decode(
        self, address: str, request: worker_pb2.DecodeRequest, timeout: float | None = None
    ) -> AsyncGenerator[worker_pb2.DecodeResponse, None]:
        """Stream a worker's Decode responses; closing the iterator cancels the call (the worker frees KV)."""
        stub = worker_pb2_grpc.DecodeServiceStub(self.pool.get(address))
        call = stub.Decode(request, timeout=timeout, wait_for_ready=False)
        try:
            async for resp in call:
                yield resp
        except grpc.aio.AioRpcError as e:
            raise worker_error(e, address) from None
        finally:
            call.cancel()

    async def get_file(self, address: str, model: str, name: str, sha256: str, timeout: float = 30.0) -> bytes:
        """A model file from a worker, checked against the card's sha256."""
        stub = worker_pb2_grpc.ModelFilesServiceStub(self.pool.get(address))
        parts: list[bytes] = []
        try:
            async for chunk in stub.GetModelFile(
                worker_pb2.GetModelFileRequest(model=model, name=name, sha256=sha256), timeout=timeout
            ):
                parts.append(chunk.data)
        except grpc.aio.AioRpcError as e:
            raise errors.from_grpc(e, f"GetModelFile {name} from {address}") from None
        data = b"".join(parts)
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise errors.Internal(f"{name} from {address} has sha256 {got}, card says {sha256}")
        return data
