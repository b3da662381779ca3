"""gRPC clients for the processes a request crosses: the worker's DecodeService and ModelFilesService.

Channels are kept per address. gRPC failures become `dynamo_grpc.errors` classes here (`errors.from_grpc`),
so the route session reads from the error itself whether to migrate, re-route or report.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass

import grpc

from dynamo_grpc import errors
from dynamo_grpc.frontend.decode_stream import StreamUnsupported, WorkerStream, worker_error
from dynamo_grpc.transport import ChannelOptions, open_channel
from dynamo_grpc.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Peer:
    """A peer's channel and the calls on it now (``idle`` is set when the last one ends)."""

    channel: grpc.aio.Channel
    inflight: int = 0
    idle: asyncio.Event | None = None


class ChannelPool:
    """One channel per peer address, closed together.

    A channel is closed only once the calls on it ended (or ``drop``'s grace ran out): grpc.aio's own
    close grace cannot see a streaming call, and it *cancels* a call that is just starting, whose reader
    then gets a bare CancelledError. A worker leaves discovery as it starts draining, exactly when its
    last requests are still starting, so closing on its departure cut them (the request hang of
    docs/frontend.md, "A worker that leaves").
    """

    def __init__(self) -> None:
        self._channels: dict[str, _Peer] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        peer = self._channels.get(address)
        if peer is None:
            peer = self._channels[address] = _Peer(open_channel(address, ChannelOptions()))
        return peer.channel

    @contextlib.contextmanager
    def lease(self, address: str) -> Iterator[grpc.aio.Channel]:
        """The channel to ``address``, counted as in use until the block ends (``drop`` waits for it)."""
        self.get(address)
        peer = self._channels[address]
        peer.inflight += 1
        try:
            yield peer.channel
        finally:
            peer.inflight -= 1
            if not peer.inflight and peer.idle is not None:
                peer.idle.set()

    def inflight(self, address: str) -> int:
        peer = self._channels.get(address)
        return peer.inflight if peer is not None else 0

    async def drop(self, address: str, grace: float | None = None) -> None:
        """Close the channel to a peer that left; calls still on it get ``grace`` seconds to finish.

        New calls to the address open a fresh channel at once. A call still running past the grace is
        cancelled, and its caller gets WorkerLost (migrate), never silence.
        """
        peer = self._channels.pop(address, None)
        if peer is None:
            return
        if peer.inflight and grace:
            peer.idle = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(peer.idle.wait(), grace)
        await peer.channel.close(None)

    async def close(self) -> None:
        for peer in self._channels.values():
            await peer.channel.close(None)
        self._channels.clear()


#: how a frontend sends Decode to workers (``--decode-transport``)
DECODE_TRANSPORTS = ("stream", "call")


class WorkerClient:
    """Calls workers: Decode (streamed tokens) and GetModelFile (tokenizer bytes).

    ``transport`` "stream": every request to a worker rides one DecodeStream (frontend/decode_stream.py), with
    Decode calls for a worker that lacks it; "call": one Decode call per request (each carries its own gRPC
    metadata, e.g. a trace's context).
    """

    def __init__(self, pool: ChannelPool | None = None, transport: str = "stream") -> None:
        if transport not in DECODE_TRANSPORTS:
            raise ValueError(f"decode transport {transport!r}: one of {', '.join(DECODE_TRANSPORTS)}")
        self.pool = pool or ChannelPool()
        self.transport = transport
        self._streams: dict[str, WorkerStream] = {}
        self._no_stream: set[str] = set()  # workers that answered DecodeStream with UNIMPLEMENTED

    async def forget(self, address: str, grace: float | None = None) -> None:
        """A worker left discovery: its channel closes once its requests end (`ChannelPool.drop`), and whatever
        next serves at this address is asked for DecodeStream afresh (it may be another release)."""
        self._no_stream.discard(address)
        self._streams.pop(address, None)  # requests still on it keep it; new ones open a stream on a new channel
        await self.pool.drop(address, grace)

    async def close(self) -> None:
        """End the workers' streams (requests still on them fail as on a lost worker), then close the channels."""
        streams, self._streams = list(self._streams.values()), {}
        await asyncio.gather(*(ws.close() for ws in streams), return_exceptions=True)
        await self.pool.close()

    def decode(
        self, address: str, request: worker_pb2.DecodeRequest, timeout: float | None = None
    ) -> AsyncGenerator[worker_pb2.DecodeResponse, None]:
        """Stream a worker's Decode responses; closing the iterator cancels the request (the worker frees KV)."""
        if self.transport == "stream" and address not in self._no_stream:
            return self._via_stream(address, request, timeout)
        return self._via_call(address, request, timeout)

    def _stream(self, address: str, channel: grpc.aio.Channel) -> WorkerStream:
        """The worker's stream on its current channel (a new one once it broke, closed while idle, or its channel
        was replaced)."""
        ws = self._streams.get(address)
        if ws is None or not ws.usable or ws.channel is not channel:
            ws = self._streams[address] = WorkerStream(channel, address)
        return ws

    async def _via_stream(
        self, address: str, request: worker_pb2.DecodeRequest, timeout: float | None
    ) -> AsyncGenerator[worker_pb2.DecodeResponse, None]:
        with self.pool.lease(address) as channel:
            ws = self._stream(address, channel)
            box = ws.open(request, timeout)
            finished = False
            try:
                while True:
                    resp = await box.take()
                    finished = bool(resp.finish_reason)
                    yield resp
                    if finished:
                        return
            except StreamUnsupported:
                self._no_stream.add(address)  # nothing was sent for this request: a Decode call takes it
            except errors.DynamoError:
                finished = box.failure is None  # the worker ended it (a DecodeStreamEnd): nothing to cancel there
                raise
            finally:
                ws.release(box, finished)
        async for resp in self._via_call(address, request, timeout):
            yield resp

    async def _via_call(
        self, address: str, request: worker_pb2.DecodeRequest, timeout: float | None
    ) -> AsyncGenerator[worker_pb2.DecodeResponse, None]:
        with self.pool.lease(address) as channel:
            call = worker_pb2_grpc.DecodeServiceStub(channel).Decode(request, timeout=timeout, wait_for_ready=False)
            try:
                responses = call.__aiter__()
                async for resp in responses:
                    if resp.finish_reason:
                        # the worker's OK status follows its last message at once: read the call to its end, so
                        # it ends OK (on the worker's metrics, and its client span closes) before the reader's
                        # close could cancel it
                        try:
                            async for _ in responses:
                                pass
                        except grpc.aio.AioRpcError as e:  # the answer is whole: a late failure loses nothing
                            log.debug("worker %s: Decode ended %s after its last message", address, e.code())
                    yield resp
            except grpc.aio.AioRpcError as e:
                raise worker_error(e, address) from None
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # our caller went away
                # grpc.aio ends a call cancelled on this side (its channel closed) with a bare CancelledError:
                # re-raised, it would end the reader silently and leave the request waiting forever
                raise errors.WorkerLost(f"worker {address}: the call was cancelled as its channel closed") from None
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
