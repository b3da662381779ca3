"""The KV data socket beside KvTransfer.Pull: same bytes as the gRPC stream, token checked, TLS, fallback.

A real engine core's leases over a real (small, random-filled) torch paged cache, served by a real gRPC
server on 127.0.0.1; only the model forward is absent (the server only serves leases).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from dynamo_grpc import errors
from dynamo_grpc.engines.core import CoreConfig, EngineCore
from dynamo_grpc.engines.core.driver import CoreEngine
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


def _engine() -> CoreEngine:
    from dynamo_grpc.bench.disagg import LeaseOnlyExecutor
    from dynamo_grpc.engines.torch.kv_cache import KvCache

    cache = KvCache(_Geometry(), NBLOCKS, BLOCK, torch.float32)  # type: ignore[arg-type]
    for t in (*cache.k, *cache.v):
        t.normal_()

    core = EngineCore(CoreConfig(BLOCK, NBLOCKS, 1 << 20, 2, kv_lease_seconds=600.0), LeaseOnlyExecutor(cache))
    blocks = core.kv.pool.allocate(-(-TOKENS // BLOCK))
    for i in range(4):
        core.kv.pool.touch(blocks)
        core.leases.create(f"lease-{i}", blocks, TOKENS, [])
    return CoreEngine(core, threaded=True)


GEOMETRY = KvGeometry("float32", LAYERS, BLOCK, HEADS, DIM)


async def _serve(tls: TlsConfig | None = None, **kw: Any) -> tuple[GrpcServer, KvTransferServicer, str]:
    servicer = KvTransferServicer(_engine(), GEOMETRY, host="127.0.0.1", tls=tls, **kw)
    server = GrpcServer(ServerOptions(host="127.0.0.1", port=0, tls=tls))
    server.add(
        kv_transfer_pb2_grpc.add_KvTransferServiceServicer_to_server, servicer, "dynamo_grpc.v1.KvTransferService"
    )
    return server, servicer, await server.start()


async def _pull(address: str, lease: str, path: str, first: int = 0) -> kv_transfer.PullResult:
    ch = kv_transfer.open_channel(address, kv_transfer.ChannelOptions())
    try:
        handle = kv_transfer_pb2.KvHandle(handle_id=lease, address=address, num_tokens=TOKENS)
        return await kv_transfer.pull(ch, handle, first, GEOMETRY, timeout=30, blocks_per_chunk=3, path=path)
    finally:
        await ch.close(None)


def _joined(res: kv_transfer.PullResult) -> list[tuple[int, int, bytes]]:
    return [(i, n, bytes(d)) for i, n, d in res.kv.chunks]


@pytest.fixture
async def served() -> AsyncIterator[tuple[KvTransferServicer, str]]:
    server, servicer, address = await _serve(accept_timeout_s=0.5)
    try:
        yield servicer, address
    finally:
        await server.stop()


async def test_socket_path_moves_the_same_bytes_as_the_grpc_stream(served: Any) -> None:
    servicer, address = served
    over_grpc = await _pull(address, "lease-0", "grpc", first=2)
    over_socket = await _pull(address, "lease-1", "socket", first=2)
    assert _joined(over_socket) == _joined(over_grpc)
    assert sum(n for _, n, _ in over_socket.kv.chunks) == 11 - 2  # the partial last block included
    assert over_socket.bytes == over_grpc.bytes == 9 * GEOMETRY.block_nbytes
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
        got = await asyncio.to_thread(kv_socket.receive, "127.0.0.1", offer.port, offer.token, 11, None)
        assert sum(n for _, n, _ in got.chunks) == 11
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
    real = kv_socket.receive

    def to_closed_port(host: str, port: int, *args: Any, **kw: Any) -> kv_socket.Received:
        return real(host, dead_port, *args, **kw)

    reference = await _pull(address, "lease-0", "grpc")
    monkeypatch.setattr(kv_socket, "receive", to_closed_port)
    res = await _pull(address, "lease-1", "socket")
    assert _joined(res) == _joined(reference)
    assert (servicer.socket_pulls, servicer.socket_fallbacks) == (0, 1)
    assert servicer.engine.lease_counts()["active"] == 2


async def test_the_data_socket_uses_mtls(tmp_path: Path) -> None:
    from dynamo_grpc.transport.certs import write_local_certs

    paths = write_local_certs(tmp_path)
    tls = TlsConfig(cert_file=str(paths.server_cert), key_file=str(paths.server_key), ca_file=str(paths.ca))
    client = TlsConfig(cert_file=str(paths.client_cert), key_file=str(paths.client_key), ca_file=str(paths.ca))
    server, servicer, address = await _serve(tls, accept_timeout_s=5.0)
    use_tls(client)
    try:
        res = await _pull(address, "lease-0", "socket")
        assert sum(n for _, n, _ in res.kv.chunks) == 11
        assert (servicer.socket_pulls, servicer.socket_fallbacks) == (1, 0)
        # a plaintext client gets no token check at all: the TLS handshake fails first
        req = kv_transfer_pb2.PullRequest(handle=kv_transfer_pb2.KvHandle(handle_id="lease-1"), data_socket=True)
        ch = kv_transfer.open_channel(address, kv_transfer.ChannelOptions())
        try:
            call = kv_transfer_pb2_grpc.KvTransferServiceStub(ch).Pull(req, timeout=30)
            offer = (await call.read()).data_socket
            with pytest.raises(OSError):
                await asyncio.to_thread(kv_socket.receive, "127.0.0.1", offer.port, offer.token, 11, None, 3.0)
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
        reference = await _pull(address, "lease-0", "grpc")
        res = await _pull(address, "lease-1", "socket")
        assert _joined(res) == _joined(reference)
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


def test_the_receive_pool_reuses_a_buffer_only_once_its_views_are_gone() -> None:
    pool = kv_socket.ReceivePool(cap_bytes=1000)
    first = pool.take(600)
    first[:3] = b"abc"
    second = pool.take(500)  # the first is still viewed (a pull's chunks): a new buffer
    assert (pool.reused, pool.allocated) == (0, 2)
    assert pool.held_bytes <= 1000  # the second did not fit under the cap beside the first: not kept
    second[:3] = b"xyz"
    assert bytes(first[:3]) == b"abc"
    chunk = first[100:200]  # a chunk sliced from the pull's buffer keeps it in use
    del first
    pool.take(300)
    assert pool.reused == 0
    del chunk
    again = pool.take(300)  # no view of the kept buffer left: reused, no new allocation
    assert (pool.reused, pool.allocated, len(again)) == (1, 3, 300)
    assert pool.take(5000) is not None and pool.held_bytes <= 1000  # larger than the cap: never kept
    assert kv_socket.ReceivePool(0).take(10) is not None and kv_socket.ReceivePool(0).held_bytes == 0


async def test_a_socket_pull_lands_in_the_pool_and_frees_it_for_the_next(
    served: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two socket pulls in a row: the second lands in the first's buffer (the chunks are gone by then),
    and the bytes still match the gRPC stream's."""
    pool = kv_socket.ReceivePool(cap_bytes=1 << 20)
    monkeypatch.setattr(kv_socket, "RECEIVE_POOL", pool)
    _, address = served
    reference = _joined(await _pull(address, "lease-0", "grpc"))
    assert _joined(await _pull(address, "lease-1", "socket")) == reference
    assert (pool.reused, pool.allocated) == (0, 1)
    assert _joined(await _pull(address, "lease-2", "socket")) == reference
    assert (pool.reused, pool.allocated) == (1, 1)
    assert pool.held_bytes == 11 * GEOMETRY.block_nbytes


def test_a_negative_receive_pool_is_refused_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    from dynamo_grpc.worker.main import main

    with pytest.raises(SystemExit) as exc:
        main(["--kv-recv-pool-mb", "-1"])
    assert exc.value.code == 2
    assert "--kv-recv-pool-mb must be >= 0" in capsys.readouterr().err
