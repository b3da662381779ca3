"""gRPC clients for the processes a request crosses: the worker's DecodeService and ModelFilesService.

Channels are kept per address. gRPC failures become the frontend's own errors here, so the pipeline
can tell a dead worker (`WorkerLost`: migrate) from a refused request (`FrontendError`: report).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator

import grpc

from dynamo_grpc.frontend.errors import Code, FrontendError, WorkerLost
from dynamo_grpc.transport import ChannelOptions, open_channel
from dynamo_grpc.v1 import worker_pb2, worker_pb2_grpc

# Statuses that mean "this worker is gone or broke the connection", not "this request is wrong".
_LOST = frozenset(
    [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.ABORTED]
)
_PASS = {
    grpc.StatusCode.INVALID_ARGUMENT: Code.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Code.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED: Code.DEADLINE_EXCEEDED,
    grpc.StatusCode.NOT_FOUND: Code.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION: Code.FAILED_PRECONDITION,
}


def translate(e: grpc.aio.AioRpcError, what: str) -> Exception:
    """A worker-side gRPC error as WorkerLost (retry elsewhere) or FrontendError (tell the client)."""
    code = e.code()
    if code in _LOST:
        return WorkerLost(f"{what}: {code.name}: {e.details()}")
    if code == grpc.StatusCode.CANCELLED:
        # Cancelled by the worker (drain/shutdown) is a lost worker; our own cancel never reaches here.
        return WorkerLost(f"{what}: cancelled by the worker: {e.details()}")
    return FrontendError(_PASS.get(code, Code.INTERNAL), f"{what}: {e.details()}")


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

    async def drop(self, address: str) -> None:
        ch = self._channels.pop(address, None)
        if ch is not None:
            await ch.close(None)

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
            raise translate(e, f"worker {address}") from None
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
            raise translate(e, f"GetModelFile {name} from {address}") from None
        data = b"".join(parts)
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise FrontendError(Code.INTERNAL, f"{name} from {address} has sha256 {got}, card says {sha256}")
        return data
