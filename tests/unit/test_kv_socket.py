"""KvTransfer.Pull into the decoder's reserved blocks: the bytes in its cache equal the prefill side's over
the data socket and the gRPC stream, the token is checked, TLS, fallback, bounded memory, cut pulls.

Real engine cores over real (small) torch paged caches — the prefill side's random-filled, serving
leases from a real gRPC server on 127.0.0.1, the decode side's zero-filled, reserving blocks and
receiving into them; only the model forward is absent (neither side runs one).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from dynamo_grpc import errors
from dynamo_grpc.engines.core import CoreConfig, EngineCore
from dynamo_grpc.engines.core.driver import CoreEngine
from dynamo_grpc.engines.core.kv_manager import KvReservation
from dynamo_grpc.engines.core.request import Request
from dynamo_grpc.transport import GrpcServer, ServerOptions
from dynamo_grpc.transport.channel import use_tls
from dynamo_grpc.transport.tls import TlsConfig
from dynamo_grpc.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc
from dynamo_grpc.worker import kv_socket, kv_transfer
from dynamo_grpc.worker.kv_transfer import KvGeometry, KvTransferServicer

torch = pytest.importorskip("torch")

LAYERS, HEADS, DIM, BLOCK, NBLOCKS = 2, 2, 8, 4, 12
TOKENS = 4 * 10 + 3  # ten full blocks and a partial one


class _Geometry:
    num_hidden_layers, num_key_value_heads, head_dim = LAYERS, HEADS, DIM


def _engine(nblocks: int = NBLOCKS, tokens: int = TOKENS, geometry: type = _Geometry, leases: int = 4) -> CoreEngine:
    """The prefill side: ``leases`` leases on the same random-filled blocks covering ``tokens`` tokens."""
    from dynamo_grpc.bench.disagg import LeaseOnlyExecutor
    from dynamo_grpc.engines.torch.kv_cache import KvCache

    cache = KvCache(geometry(), nblocks, BLOCK, torch.float32)  # type: ignore[arg-type]
    for t in (*cache.k, *cache.v):
        t.normal_()

    core = EngineCore(CoreConfig(BLOCK, nblocks, 1 << 20, 2, kv_lease_seconds=600.0), LeaseOnlyExecutor(cache))
    blocks = core.kv.pool.allocate(-(-tokens // BLOCK))
    for i in range(leases):
        core.kv.pool.touch(blocks)
        core.leases.create(f"lease-{i}", blocks, tokens, [])
    return CoreEngine(core, threaded=True)


def _decoder(nblocks: int = NBLOCKS, geometry: type = _Geometry) -> CoreEngine:
    """The decode side: an engine core over a zero-filled cache whose blocks pulls are written into."""
    from dynamo_grpc.bench.disagg import LeaseOnlyExecutor
    from dynamo_grpc.engines.torch.kv_cache import KvCache

    cache = KvCache(geometry(), nblocks, BLOCK, torch.float32)  # type: ignore[arg-type]
    core = EngineCore(CoreConfig(BLOCK, nblocks, 1 << 20, 2), LeaseOnlyExecutor(cache))
    return CoreEngine(core, threaded=True)


GEOMETRY = KvGeometry("float32", LAYERS, BLOCK, HEADS, DIM)


async def _serve(
    tls: TlsConfig | None = None, engine: CoreEngine | None = None, **kw: Any
) -> tuple[GrpcServer, KvTransferServicer, str]:
    servicer = KvTransferServicer(engine or _engine(), GEOMETRY, host="127.0.0.1", tls=tls, **kw)
    server = GrpcServer(ServerOptions(host="127.0.0.1", port=0, tls=tls))
    server.add(
        kv_transfer_pb2_grpc.add_KvTransferServiceServicer_to_server, servicer, "dynamo_grpc.v1.KvTransferService"
    )
    return server, servicer, await server.start()


class Pulled:
    """A decoder's pull: its reservation, and the blocks' bytes as they are in its cache afterwards."""

    def __init__(self, decoder: CoreEngine, res: KvReservation, result: kv_transfer.PullResult) -> None:
        self.decoder, self.res, self.result = decoder, res, result

    def cache_bytes(self) -> bytes:
        return b"".join(self.decoder.import_views(self.res.fill_block_ids))


async def _pull(
    address: str,
    lease: str,
    path: str,
    first: int = 0,
    decoder: CoreEngine | None = None,
    tokens: int = TOKENS,
    geometry: KvGeometry = GEOMETRY,
    per: int = 3,
) -> Pulled:
    """Reserve blocks on the decoder (``first`` blocks of the prompt already cached there) and pull into them."""
    decoder = decoder or _decoder()
    prompt = list(range(2, 2 + tokens))
    if first:
        _cache_prefix(decoder, prompt, first)
    res = decoder.reserve_kv(prompt)
    assert res is not None and res.first_block == first
    ch = kv_transfer.open_channel(address, kv_transfer.ChannelOptions())
    try:
        handle = kv_transfer_pb2.KvHandle(handle_id=lease, address=address, num_tokens=tokens)
        sink = kv_transfer.ReservedBlocks(decoder, res)
        got = await kv_transfer.pull(ch, handle, first, geometry, sink, timeout=30, blocks_per_chunk=per, path=path)
        return Pulled(decoder, res, got)
    except BaseException:
        decoder.cancel_reservation(res)
        raise
    finally:
        await ch.close(None)


def _cache_prefix(decoder: CoreEngine, prompt: list[int], blocks: int) -> None:
    """Leave the prompt's first ``blocks`` blocks in the decoder's prefix cache (computed earlier, now free)."""
    probe = Request("warm", prompt)
    probe.update_block_hashes(BLOCK)
    pool = decoder.core.kv.pool
    table = pool.allocate(blocks)
    pool.register_chain(table, probe.block_hashes, probe.tokens_hashes, 0, blocks)
    pool.free(reversed(table))


def _lease_bytes(servicer: KvTransferServicer, first: int = 0, tokens: int = TOKENS) -> bytes:
    """What the prefill side holds for the lease's blocks from ``first`` on."""
    return servicer.engine.export_blocks(list(range(first, -(-tokens // BLOCK))))


@pytest.fixture
async def served() -> AsyncIterator[tuple[KvTransferServicer, str]]:
    server, servicer, address = await _serve(accept_timeout_s=0.5)
    try:
        yield servicer, address
    finally:
        await server.stop()


async def test_both_paths_write_the_prefill_sides_bytes_into_the_reserved_blocks(served: Any) -> None:
    servicer, address = served
    want = _lease_bytes(servicer, first=2)
    over_grpc = await _pull(address, "lease-0", "grpc", first=2)
    over_socket = await _pull(address, "lease-1", "socket", first=2)
    assert over_grpc.cache_bytes() == want  # in the decoder's cache, block for block
    assert over_socket.cache_bytes() == want
    assert over_socket.result.blocks == 11 - 2  # the partial last block included
    assert over_socket.result.bytes == over_grpc.result.bytes == 9 * GEOMETRY.block_nbytes
    assert (servicer.socket_pulls, servicer.socket_fallbacks) == (1, 0)
    assert servicer.engine.lease_counts()["active"] == 2  # both pulled leases are freed
    with pytest.raises(errors.FailedPrecondition):  # pulled twice
        await _pull(address, "lease-1", "socket")
    with pytest.raises(errors.NotFound):
        await _pull(address, "no-such-lease", "socket")


async def test_a_wrong_token_is_refused_and_the_right_one_still_served(served: Any) -> None:
    servicer, address = served
    stub_ch = grpc.aio.insecure_channel(address)
    try:
        stub = kv_transfer_pb2_grpc.KvTransferServiceStub(stub_ch)
        req = kv_transfer_pb2.PullRequest(handle=kv_transfer_pb2.KvHandle(handle_id="lease-0"), data_socket=True)
        call = stub.Pull(req, timeout=30)
        first = await call.read()
        offer = first.data_socket
        with socket.create_connection(("127.0.0.1", offer.port)) as bad:
            bad.sendall(bytes(kv_socket.TOKEN_BYTES))  # a guess: not the token
            bad.settimeout(5)
            assert await asyncio.to_thread(bad.recv, 1) == b""  # closed without a byte of KV
        decoder = _decoder()
        res = decoder.reserve_kv(list(range(TOKENS)))
        assert res is not None
        sink = kv_transfer.ReservedBlocks(decoder, res)
        got = await asyncio.to_thread(
            kv_socket.receive, "127.0.0.1", offer.port, offer.token, 0, 11, sink, GEOMETRY.block_nbytes, None
        )
        assert got.blocks == 11
        assert b"".join(decoder.import_views(res.fill_block_ids)) == _lease_bytes(servicer)
        assert await call.read() is grpc.aio.EOF  # no chunk on the stream: the socket carried them
        assert await call.code() == grpc.StatusCode.OK
    finally:
        await stub_ch.close(None)
    assert (servicer.socket_pulls, servicer.socket_fallbacks) == (1, 0)


async def test_an_unreachable_data_socket_falls_back_to_the_grpc_stream(
    served: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    servicer, address = served
    closed = socket.create_server(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    real = kv_socket.Receiver.__init__

    def to_closed_port(self: kv_socket.Receiver, host: str, port: int, *args: Any, **kw: Any) -> None:
        real(self, host, dead_port, *args, **kw)

    monkeypatch.setattr(kv_socket.Receiver, "__init__", to_closed_port)
    res = await _pull(address, "lease-1", "socket")
    assert res.cache_bytes() == _lease_bytes(servicer)
    assert (servicer.socket_pulls, servicer.socket_fallbacks) == (0, 1)
    assert servicer.engine.lease_counts()["active"] == 3


async def test_the_data_socket_uses_mtls(tmp_path: Path) -> None:
    from dynamo_grpc.transport.certs import write_local_certs

    paths = write_local_certs(tmp_path)
    tls = TlsConfig(cert_file=str(paths.server_cert), key_file=str(paths.server_key), ca_file=str(paths.ca))
    client = TlsConfig(cert_file=str(paths.client_cert), key_file=str(paths.client_key), ca_file=str(paths.ca))
    server, servicer, address = await _serve(tls, accept_timeout_s=5.0)
    use_tls(client)
    try:
        res = await _pull(address, "lease-0", "socket")
        assert res.cache_bytes() == _lease_bytes(servicer)
        assert (servicer.socket_pulls, servicer.socket_fallbacks) == (1, 0)
        # a plaintext client gets no token check at all: the TLS handshake fails first
        req = kv_transfer_pb2.PullRequest(handle=kv_transfer_pb2.KvHandle(handle_id="lease-1"), data_socket=True)
        ch = kv_transfer.open_channel(address, kv_transfer.ChannelOptions())
        try:
            call = kv_transfer_pb2_grpc.KvTransferServiceStub(ch).Pull(req, timeout=30)
            offer = (await call.read()).data_socket
            rx = kv_socket.Receiver("127.0.0.1", offer.port, offer.token, None, 3.0)
            decoder = _decoder()
            res2 = decoder.reserve_kv(list(range(TOKENS)))
            assert res2 is not None
            with pytest.raises(OSError):
                await asyncio.to_thread(rx.run, 0, 11, kv_transfer.ReservedBlocks(decoder, res2), GEOMETRY.block_nbytes)
            call.cancel()
        finally:
            await ch.close(None)
    finally:
        use_tls(None)
        await server.stop()


async def test_a_server_on_the_grpc_path_streams_even_when_asked_for_a_socket() -> None:
    """--kv-transfer-path grpc on the prefill side: no data socket is offered; the decoder takes the stream."""
    server, servicer, address = await _serve(path="grpc")
    try:
        res = await _pull(address, "lease-1", "socket")
        assert res.cache_bytes() == _lease_bytes(servicer)
        assert (servicer.socket_pulls, servicer.socket_fallbacks) == (0, 0)
    finally:
        await server.stop()


# ------------------------------------------------------------------ the copy-free paths


def test_export_views_are_export_blocks_without_the_copy() -> None:
    """The zero-copy views hold the same bytes as the joined export, also for scattered block ids."""
    from dynamo_grpc.engines.torch.kv_cache import KvCache

    cache = KvCache(_Geometry(), NBLOCKS, BLOCK, torch.bfloat16)  # type: ignore[arg-type]
    for t in (*cache.k, *cache.v):
        t.normal_()
    ids = [7, 2, 3, 4, 9]
    views = cache.export_views(ids)
    before = cache.export_blocks(ids)
    assert b"".join(views) == before
    assert sum(len(v) for v in views) == len(ids) * cache.block_nbytes
    cache.k[0][2 * BLOCK].fill_(1.0)  # views, not copies: a write to the cache shows through
    assert b"".join(views) != before
    assert b"".join(views) == cache.export_blocks(ids)


def test_send_views_survives_partial_gather_writes() -> None:
    """A small send buffer makes every sendmsg partial; the reader still gets header + bytes in order."""
    payload = [memoryview(bytes([i]) * (1000 + 37 * i)) for i in range(40)]
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        want = b"".join(payload)
        got = bytearray()

        def read() -> None:
            need = kv_socket.HEADER.size + len(want)
            while len(got) < need:
                got.extend(b.recv(need - len(got)))

        reader = threading.Thread(target=read)
        reader.start()
        assert kv_socket.send_views(a, 5, 3, payload) == len(want)
        reader.join(10)
    index, n, nbytes, length = kv_socket.HEADER.unpack(bytes(got[: kv_socket.HEADER.size]))
    assert (index, n, nbytes, length) == (5, 3, len(want), len(want))
    assert bytes(got[kv_socket.HEADER.size :]) == want


# ------------------------------------------------------------------ bounded memory, cut and refused pulls


class _Big:
    """A geometry whose pull spans many chunks: 16 KiB blocks, 512 of them (8 MiB), 8 blocks a chunk."""

    num_hidden_layers, num_key_value_heads, head_dim = 2, 2, 128


BIG = KvGeometry("float32", 2, BLOCK, 2, 128)
BIG_BLOCKS = 512
BIG_TOKENS = BIG_BLOCKS * BLOCK


@pytest.mark.parametrize("path", ["socket", "grpc"])
async def test_memory_outside_the_cache_does_not_grow_with_the_pull(path: str) -> None:
    """Pulls of 2 MiB and 8 MiB in chunks of 128 KiB (16 and 64 chunks): the Python heap's peak during the
    pull (server and decoder both run in this process) is the same for both, under two chunks apart, and
    a small fraction of the pull: the decoder writes each chunk into the cache's blocks as it arrives
    (over the socket: receives into them), nothing accumulates a whole prompt."""
    prefill = _engine(BIG_BLOCKS, BIG_TOKENS, _Big, leases=2)
    servicer = KvTransferServicer(prefill, BIG, host="127.0.0.1", accept_timeout_s=5.0)
    server = GrpcServer(ServerOptions(host="127.0.0.1", port=0))
    server.add(kv_transfer_pb2_grpc.add_KvTransferServiceServicer_to_server, servicer, "k")
    address = await server.start()
    chunk = 8 * BIG.block_nbytes
    peaks = []
    try:
        for lease, first in (("lease-0", BIG_BLOCKS - 128), ("lease-1", 0)):
            decoder = _decoder(BIG_BLOCKS + 1, _Big)  # the prompt and one generated token must fit
            tracemalloc.start()
            try:
                pulled = await _pull(address, lease, path, first, decoder, BIG_TOKENS, BIG, per=8)
                peaks.append(tracemalloc.get_traced_memory()[1])
            finally:
                tracemalloc.stop()
            assert pulled.result.bytes == (BIG_BLOCKS - first) * BIG.block_nbytes
            assert pulled.cache_bytes() == prefill.export_blocks(list(range(first, BIG_BLOCKS)))
    finally:
        await server.stop()
    small, large = peaks
    assert large < small + 2 * chunk, f"peaks {peaks}, chunk {chunk}"
    assert large < BIG_BLOCKS * BIG.block_nbytes / 8, f"peaks {peaks}"


def _send_then(n_chunks: int, then: Any) -> Any:
    """A server-side ``_send_all`` that writes the first ``n_chunks`` chunks, then calls ``then(conn)``."""

    def send_all(self: KvTransferServicer, conn: socket.socket, ids: list[int], first: int, per: int) -> None:
        for k, start in enumerate(range(first, len(ids), per)):
            if k == n_chunks:
                then(conn)
                return
            part = ids[start : start + per]
            kv_socket.send_views(conn, start, len(part), self.engine.export_views(part))

    return send_all


def _nothing_registered(decoder: CoreEngine) -> None:
    kv = decoder.core.kv
    assert kv.pool.num_active == 0 and not kv.reservations and kv.pool.num_cached == 0
    assert not kv.take_events()


async def test_a_pull_cut_mid_stream_frees_the_reserved_blocks(served: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The socket closes after 2 of 4 chunks: Unavailable; cancelling (what the decode servicer does) frees
    every reserved block unregistered. The same over the gRPC stream, cut by a failing export."""
    servicer, address = served
    monkeypatch.setattr(KvTransferServicer, "_send_all", _send_then(2, lambda conn: None))
    decoder = _decoder()
    with pytest.raises(errors.Unavailable, match="broke mid-transfer"):
        await _pull(address, "lease-0", "socket", decoder=decoder)
    _nothing_registered(decoder)

    real = servicer.engine.export_blocks
    calls = []

    def export_then_fail(ids: list[int]) -> bytes:
        calls.append(ids)
        if len(calls) > 2:
            raise RuntimeError("prefill worker lost its cache")
        return real(ids)

    monkeypatch.setattr(servicer.engine, "export_blocks", export_then_fail)
    with pytest.raises(errors.DynamoError):
        await _pull(address, "lease-1", "grpc", decoder=decoder)
    _nothing_registered(decoder)
    assert servicer.engine.lease_counts()["active"] == 2  # both leases ended on the prefill side too


async def test_a_cancelled_pull_stops_writing_before_it_returns(served: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client goes away mid-transfer: the receiving thread is stopped and joined before the pull's
    task ends, so no byte can land in blocks that are freed (and maybe reused) right after."""
    servicer, address = served
    stall, tried = threading.Event(), threading.Event()

    def stall_then_send_the_rest(conn: socket.socket) -> None:
        stall.wait(30)
        try:  # the decoder is gone: whatever still comes must not land in its (freed) blocks
            kv_socket.send_views(conn, 3, 8, servicer.engine.export_views(list(range(3, 11))))
        except OSError:
            pass
        tried.set()

    monkeypatch.setattr(KvTransferServicer, "_send_all", _send_then(1, stall_then_send_the_rest))
    decoder = _decoder()
    task = asyncio.create_task(_pull(address, "lease-0", "socket", decoder=decoder))
    everything = list(range(NBLOCKS))
    for _ in range(1000):  # until the first chunk landed and the receiver waits for the second
        await asyncio.sleep(0.01)
        if any(b"".join(decoder.import_views(everything))):
            break
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)  # returns without the server sending another byte
    _nothing_registered(decoder)
    after = b"".join(decoder.import_views(everything))
    stall.set()
    assert await asyncio.to_thread(tried.wait, 10)
    await asyncio.sleep(0.1)
    assert b"".join(decoder.import_views(everything)) == after


async def test_a_chunk_that_does_not_fit_is_refused_before_its_bytes_land(
    served: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header announcing more bytes than its blocks hold: refused on the header, the blocks stay zero."""
    _, address = served

    def lying_header(conn: socket.socket) -> None:
        conn.sendall(kv_socket.HEADER.pack(0, 3, 0, 3 * GEOMETRY.block_nbytes + 4))
        conn.sendall(b"\x01" * (3 * GEOMETRY.block_nbytes + 4))

    monkeypatch.setattr(KvTransferServicer, "_send_all", _send_then(0, lying_header))
    decoder = _decoder()
    res = decoder.reserve_kv(list(range(TOKENS)))
    assert res is not None
    ch = kv_transfer.open_channel(address, kv_transfer.ChannelOptions())
    try:
        handle = kv_transfer_pb2.KvHandle(handle_id="lease-0", address=address, num_tokens=TOKENS)
        with pytest.raises(errors.Unavailable, match="bytes for 3 blocks"):
            await kv_transfer.pull(
                ch, handle, 0, GEOMETRY, kv_transfer.ReservedBlocks(decoder, res), timeout=30, blocks_per_chunk=3
            )
    finally:
        await ch.close(None)
    assert not any(b"".join(decoder.import_views(res.fill_block_ids)))  # not a byte written
    decoder.cancel_reservation(res)
    _nothing_registered(decoder)
