"""KvTransferService: a prefill worker serves its leased KV blocks; a decode worker pulls them.

Server side (``KvTransferServicer``): ``Pull`` claims the lease once (a second pull is
FAILED_PRECONDITION, an unknown or expired lease NOT_FOUND, both through errors.py), streams the
blocks from ``first_block`` on in chunks of several blocks (every layer, K and V, in one message:
``[layers, 2, blocks, block_size, kv_heads, head_dim]``), and frees the lease when the stream ends,
whatever way it ends. On the gRPC stream one chunk at a time is copied out of the cache into a message;
on the data socket nothing is: each chunk is written straight from the cache's memory (``export_views``,
a gather write). Engines that hold no
tensors (the mocker) send empty chunks that take the time the model card's KV size and
``--kv-transfer-gbps`` imply. ``Release`` frees a lease early and is idempotent.

Client side (``pull``): checks the handle's layout against the decoder's own before any byte lands,
then writes each chunk as it arrives into the blocks the decoder reserved for the pull
(:class:`ReservedBlocks`, over ``CoreEngine.reserve_kv``): over the data socket ``recv_into`` the
cache's own memory, over gRPC one message copied into the blocks. Nothing outside the cache holds more
than one chunk (the socket path: none at all), whatever the prompt's length. On failure or
cancellation the caller cancels the reservation: its blocks go back unregistered.

Byte path (``--kv-transfer-path``, default socket): the decoder asks for a data socket; the server's
first response names a one-shot port and token (kv_socket.py) and the chunks go over that socket, TLS
like the gRPC listener. When the decoder cannot connect, the server streams the chunks over gRPC after
``accept_timeout_s``; a server or client with the path set to grpc never opens one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from dynamo_grpc import errors
from dynamo_grpc.engines.core.driver import CoreEngine
from dynamo_grpc.engines.core.kv_manager import KvReservation
from dynamo_grpc.models.card import ModelCard
from dynamo_grpc.observability import spans
from dynamo_grpc.transport import ChannelOptions, open_channel
from dynamo_grpc.transport.channel import default_tls
from dynamo_grpc.transport.tls import TlsConfig
from dynamo_grpc.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc
from dynamo_grpc.worker import kv_socket

log = logging.getLogger(__name__)

#: target bytes per Pull message (measured in `dynamo-grpc bench disagg`: several MiB keeps the stream
#: near the socket bound; one message per block per layer does not)
CHUNK_BYTES = 8 << 20
#: the same over the data socket: no message is built (the bytes go from the prefill cache's memory into
#: the decoder's cache, no buffer between), so larger chunks cost no memory and mean larger, fewer
#: recv_into calls per layer (~1.5x faster than 8 MiB chunks in a loopback micro-benchmark)
SOCKET_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class KvGeometry:
    """What one block is on the wire; a decoder refuses a handle whose layout differs from its own."""

    dtype: str
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    #: whether the engine moves real bytes (torch) or models the transfer time (mocker)
    moves_bytes: bool = True

    @property
    def block_nbytes(self) -> int:
        elem = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}.get(self.dtype, 0)
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def layout(self, num_blocks: int = 0) -> kv_transfer_pb2.KvLayout:
        shape = [self.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim]
        return kv_transfer_pb2.KvLayout(
            dtype=self.dtype,
            shape=shape if num_blocks else [],
            num_layers=self.num_layers,
            block_size=self.block_size,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
        )

    def mismatch(self, layout: kv_transfer_pb2.KvLayout) -> str | None:
        """Why KV in ``layout`` cannot go into this cache, or None."""
        mine = self.layout()
        for name in ("dtype", "num_layers", "block_size", "num_kv_heads", "head_dim"):
            theirs, ours = getattr(layout, name), getattr(mine, name)
            if theirs != ours:
                return f"{name} {theirs!r} there, {ours!r} here"
        return None


class KvTransferServicer(kv_transfer_pb2_grpc.KvTransferServiceServicer):
    """Pull and Release over an engine core's leases."""

    def __init__(
        self,
        engine: CoreEngine,
        geometry: KvGeometry,
        transfer_gbps: float = 0.0,
        path: str = "socket",
        host: str = "127.0.0.1",
        tls: TlsConfig | None = None,
        accept_timeout_s: float = 3.0,
    ) -> None:
        self.engine = engine
        self.geometry = geometry
        #: mocker: modelled link speed in GB/s (0: transfers take no time)
        self.transfer_gbps = transfer_gbps
        #: "socket": offer a data socket to decoders that ask; "grpc": always stream over gRPC
        self.path = path
        #: where data sockets listen (the gRPC listener's host) and their TLS (the listener's)
        self.host = host
        self.tls = tls
        #: how long a data socket waits for its decoder before the chunks go over gRPC instead
        self.accept_timeout_s = accept_timeout_s
        self.blocks_sent = 0
        self.bytes_sent = 0
        self.socket_pulls = 0
        self.socket_fallbacks = 0

    async def _chunks(self, ids: list[int], first: int, per: int) -> AsyncIterator[tuple[int, int, bytes, int]]:
        """(block index, blocks, data, nbytes) per chunk, one chunk copied out of the cache at a time."""
        g = self.geometry
        for start in range(first, len(ids), per):
            part = ids[start : start + per]
            n = len(part)
            if g.moves_bytes:
                data = await asyncio.to_thread(self.engine.export_blocks, part)
                nbytes = len(data)
            else:
                data, nbytes = b"", n * g.block_nbytes
                if self.transfer_gbps > 0:
                    await asyncio.sleep(nbytes / (self.transfer_gbps * 1e9))
            self.blocks_sent += n
            self.bytes_sent += nbytes
            yield start, n, data, nbytes

    def _send_all(self, conn: socket.socket, ids: list[int], first: int, per: int) -> None:
        """Every chunk straight from the cache's memory (the lease keeps those blocks unwritten)."""
        for start in range(first, len(ids), per):
            part = ids[start : start + per]
            length = kv_socket.send_views(conn, start, len(part), self.engine.export_views(part))
            self.blocks_sent += len(part)
            self.bytes_sent += length

    async def _over_socket(
        self, listener: kv_socket.DataListener, ids: list[int], first: int, per: int, context: grpc.aio.ServicerContext
    ) -> bool:
        """Send over the data socket; False when no decoder connected in time (the caller falls back)."""

        def send_all(conn: socket.socket) -> None:  # the handshake's thread copies nothing and writes every chunk
            self._send_all(conn, ids, first, per)

        try:
            conn = await listener.accept(self.accept_timeout_s, send_all if self.geometry.moves_bytes else None)
        except OSError as e:  # from send_all: the handshake's own failures only refuse that connection
            self.socket_pulls += 1
            await errors.abort(context, errors.Unavailable(f"KV data socket broke: {e}"))
        if conn is None:
            self.socket_fallbacks += 1
            log.warning("KV data socket on port %d: no decoder came; streaming over gRPC", listener.port)
            return False
        self.socket_pulls += 1
        if self.geometry.moves_bytes:
            return True  # sent and closed in the handshake's thread
        try:
            async for start, n, data, nbytes in self._chunks(ids, first, per):
                await asyncio.to_thread(kv_socket.send_chunk, conn, start, n, nbytes, data)
        except OSError as e:
            await errors.abort(context, errors.Unavailable(f"KV data socket broke: {e}"))
        finally:
            conn.close()
        return True

    async def Pull(
        self, request: kv_transfer_pb2.PullRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[kv_transfer_pb2.PullResponse]:
        lease_id = request.handle.handle_id
        try:
            lease = self.engine.begin_pull(lease_id)
        except errors.DynamoError as e:
            await errors.abort(context, e)
        try:
            g = self.geometry
            total = len(lease.blocks)
            first = request.first_block
            if first > total:
                await errors.abort(
                    context, errors.InvalidArgument(f"first_block {first} is past the lease's {total} blocks")
                )
            per = request.blocks_per_chunk or max(1, CHUNK_BYTES // max(g.block_nbytes, 1))
            per_socket = request.blocks_per_chunk or max(1, SOCKET_CHUNK_BYTES // max(g.block_nbytes, 1))
            ids = list(lease.block_ids)
            with spans.span("kv_transfer.send", request_id=lease_id, blocks=total - first) as sp:
                if request.data_socket and self.path == "socket" and first < total:
                    listener = kv_socket.DataListener(self.host, self.tls)
                    try:
                        offer = kv_transfer_pb2.DataSocket(port=listener.port, token=listener.token)
                        yield kv_transfer_pb2.PullResponse(
                            block_index=first, layout=g.layout(total - first), data_socket=offer
                        )
                        sent = await self._over_socket(listener, ids, first, per_socket, context)
                    finally:
                        listener.close()
                    spans.set_attributes(sp, path="socket" if sent else "grpc-fallback")
                    if sent:
                        return
                async for start, n, data, nbytes in self._chunks(ids, first, per):
                    yield kv_transfer_pb2.PullResponse(
                        block_index=start, data=data, layout=g.layout(n), num_blocks=n, nbytes=nbytes
                    )
        finally:
            self.engine.end_pull(lease_id)  # pulled, failed or cancelled: the blocks go back either way

    async def Release(
        self, request: kv_transfer_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> kv_transfer_pb2.ReleaseResponse:
        self.engine.release_lease(request.handle_id)
        return kv_transfer_pb2.ReleaseResponse()


class Channels:
    """One channel per peer KvTransfer address (TLS from the process default, like every client here)."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = open_channel(address, ChannelOptions())
        return ch

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close(None)
        self._channels.clear()


@dataclass
class ReservedBlocks:
    """A pull's sink: the handle's block ``i`` is the reservation's block ``i`` (the blocks before
    ``first_block`` are the decoder's cached prefix and are never written)."""

    engine: CoreEngine
    reservation: KvReservation

    def views(self, index: int, n: int) -> list[memoryview]:
        blocks = self.reservation.blocks[index : index + n]
        return self.engine.import_views([b.block_id for b in blocks])


@dataclass
class PullResult:
    blocks: int
    bytes: int
    seconds: float


async def pull(
    channel: grpc.aio.Channel,
    handle: kv_transfer_pb2.KvHandle,
    first_block: int,
    geometry: KvGeometry,
    sink: kv_socket.BlockSink,
    timeout: float | None = None,
    blocks_per_chunk: int = 0,
    path: str = "socket",
) -> PullResult:
    """Pull a handle's blocks from ``first_block`` on into ``sink``, chunk by chunk (errors.py classes
    on failure; what was written by then is the caller's to discard).

    ``path="socket"`` asks for the data socket (TLS from the process default, like the channel); when
    connecting fails before any byte arrived the server's gRPC fallback stream is read instead.
    """
    if handle.HasField("layout"):
        why = geometry.mismatch(handle.layout)
        if why is not None:
            raise errors.FailedPrecondition(f"KV layout of handle {handle.handle_id!r} does not fit: {why}")
    stub = kv_transfer_pb2_grpc.KvTransferServiceStub(channel)
    t0 = time.perf_counter()
    nbytes = 0
    end = -(-handle.num_tokens // geometry.block_size)
    block_nbytes = geometry.block_nbytes if geometry.moves_bytes else 0
    at = first_block  # the next block expected
    req = kv_transfer_pb2.PullRequest(
        handle=handle, first_block=first_block, blocks_per_chunk=blocks_per_chunk, data_socket=path == "socket"
    )
    call = stub.Pull(req, timeout=timeout)
    try:
        async for chunk in call:
            why = geometry.mismatch(chunk.layout)
            if why is not None:
                raise errors.FailedPrecondition(f"KV chunk from {handle.address} does not fit: {why}")
            if chunk.HasField("data_socket"):
                over = await _receive(handle.address, chunk.data_socket, at, end - at, sink, block_nbytes, timeout)
                if over is not None:
                    at += over.blocks
                    nbytes += over.nbytes
                continue
            why = kv_socket.chunk_error(chunk.block_index, chunk.num_blocks, len(chunk.data), at, end, block_nbytes)
            if why is not None:
                raise errors.FailedPrecondition(f"KV chunk from {handle.address} does not fit: {why}")
            if chunk.data:
                kv_socket.write_views(sink.views(chunk.block_index, chunk.num_blocks), chunk.data)
            at += chunk.num_blocks
            nbytes += chunk.nbytes
    except grpc.aio.AioRpcError as e:
        raise errors.from_grpc(e, f"KV pull from {handle.address}") from None
    finally:
        call.cancel()
    if at != end:
        got, want = at - first_block, end - first_block
        raise errors.Unavailable(f"KV pull from {handle.address} ended after {got} of {want} blocks")
    return PullResult(end - first_block, nbytes, time.perf_counter() - t0)


async def _receive(
    address: str,
    offer: kv_transfer_pb2.DataSocket,
    first: int,
    blocks: int,
    sink: kv_socket.BlockSink,
    block_nbytes: int,
    timeout: float | None,
) -> kv_socket.Received | None:
    """The blocks over the offered data socket; None when it could not be reached (the server falls back).

    Cancelled, it stops the receiving thread and waits for it, so no byte is written after it returns.
    """
    host = address.rsplit(":", 1)[0]
    rx = kv_socket.Receiver(host, offer.port, offer.token, default_tls(), timeout or kv_socket.IO_TIMEOUT_S)
    fut = asyncio.get_running_loop().run_in_executor(None, rx.run, first, blocks, sink, block_nbytes)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        rx.abort()
        while not fut.done():  # even if cancelled again: the thread must stop writing first
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([fut])
        if not fut.cancelled():
            fut.exception()  # retrieved: an aborted receive's OSError is expected
        raise
    except OSError as e:
        got: kv_socket.Received | None = getattr(e, "received", None)
        if got is not None and got.started:
            raise errors.Unavailable(f"KV data socket {host}:{offer.port} broke mid-transfer: {e}") from None
        log.warning("KV data socket %s:%d unreachable (%s); reading the gRPC fallback", host, offer.port, e)
        return None


async def release(channel: grpc.aio.Channel, handle: kv_transfer_pb2.KvHandle, timeout: float = 5.0) -> None:
    """Release a lease (best effort: the lease expires anyway)."""
    stub = kv_transfer_pb2_grpc.KvTransferServiceStub(channel)
    try:
        await stub.Release(kv_transfer_pb2.ReleaseRequest(handle_id=handle.handle_id), timeout=timeout)
    except grpc.aio.AioRpcError as e:
        log.info("release of KV lease %s at %s failed: %s", handle.handle_id, handle.address, e.code().name)


def geometry_for(engine: object, card: ModelCard) -> KvGeometry | None:
    """The block geometry of an engine that can lease and move blocks (the engine core), else None.

    The torch engine's cache says it exactly; the mocker holds no tensors and takes it from the model
    card (layers, KV heads, head size, KV dtype), which is all the transfer-time model needs.
    """
    if not isinstance(engine, CoreEngine):
        return None
    cache = getattr(engine, "kv", None)
    shape = getattr(cache, "block_shape", None)
    if shape is not None:
        layers, _, bs, heads, dim = shape
        return KvGeometry(card.kv_dtype, layers, bs, heads, dim, moves_bytes=True)
    return KvGeometry(
        card.kv_dtype, card.num_layers, engine.block_size, card.num_kv_heads, card.head_dim, moves_bytes=False
    )
