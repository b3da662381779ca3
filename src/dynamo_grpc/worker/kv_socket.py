"""The KV byte path beside gRPC: a one-shot TCP connection per Pull (TLS when the process has TLS).

gRPC carries the control (Pull's first response names a port and a one-time token); the bytes go over
a plain socket with large writes and no per-chunk protobuf, the way NIXL keeps bytes off its control
plane. On this box a gRPC stream tops out near 500 MB/s while a loopback socket moves several GB/s
(``dynamo-grpc bench disagg``).

Server side (:class:`DataListener`): listens on an ephemeral port of the gRPC listener's host, accepts
until one connection presents the token (others are closed), then the caller writes chunks. Client side
(:func:`receive`): connects, sends the token, reads chunks until it has the blocks it expects. Blocking
sockets run in threads. No copy on either side beyond the kernel's: the server gathers the cache's own
memory into each write (:func:`send_views`), the client receives (``recv_into``) straight into the
decoder's cache, into the blocks reserved for the pull (a :class:`BlockSink`'s views): no buffer outside
the cache holds KV bytes, whatever the prompt's length, and the blocks are resident already (a fresh
receive buffer costs as much in page faults as the transfer).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from dynamo_grpc.transport.tls import TlsConfig

log = logging.getLogger(__name__)

#: per chunk: block_index, num_blocks, nbytes (modelled size on the mocker), data length
HEADER = struct.Struct("<IIQQ")
TOKEN_BYTES = 32
#: seconds a blocked send or receive may stall before the transfer is given up
IO_TIMEOUT_S = 60.0
#: largest single recv: big reads keep the per-call overhead negligible
RECV_BYTES = 4 << 20

#: buffers per gather write (Linux's IOV_MAX)
IOV_MAX = 1024

PATHS = ("grpc", "socket")


def _tcp(sock: socket.socket, timeout: float = IO_TIMEOUT_S) -> None:
    """Blocking mode with the stall limit in the kernel (SO_SNDTIMEO/SO_RCVTIMEO): a Python-level
    timeout turns every large send into poll + partial-send rounds, several times slower on loopback."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(None)
    tv = struct.pack("ll", int(timeout), int((timeout % 1) * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)


class DataListener:
    """One Pull's listening socket; :meth:`accept` returns the connection that showed the token."""

    def __init__(self, host: str, tls: TlsConfig | None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, 0), family=family, backlog=4)
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self._ctx = tls.ssl_context_server() if tls is not None else None
        self.refused = 0

    def _handshake(self, conn: socket.socket, deadline: float) -> socket.socket | None:
        conn.setblocking(True)
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            if self._ctx is not None:
                conn = self._ctx.wrap_socket(conn, server_side=True)
            got = b""
            while len(got) < TOKEN_BYTES:
                part = conn.recv(TOKEN_BYTES - len(got))
                if not part:
                    break
                got += part
        except (OSError, ssl.SSLError) as e:
            log.info("KV data socket: handshake on port %d failed: %s", self.port, e)
            conn.close()
            self.refused += 1
            return None
        if not hmac.compare_digest(got, self.token):
            log.warning("KV data socket: a connection on port %d presented a wrong token; closed", self.port)
            conn.close()
            self.refused += 1
            return None
        _tcp(conn)
        return conn

    async def accept(self, timeout: float, then: Callable[[socket.socket], None] | None = None) -> socket.socket | None:
        """The authenticated connection, or None when none came within ``timeout`` seconds.

        ``then``: run on the connection in the handshake's thread, which then closes it (one thread hop
        fewer per pull: on a loaded box each hop waits for a core); its OSError propagates.
        """
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                conn, _ = await asyncio.wait_for(loop.sock_accept(self.sock), left)
            except TimeoutError:
                return None
            ok = await asyncio.to_thread(self._handshake_then, conn, deadline, then)
            if ok is not None:
                return ok
        return None

    def _handshake_then(
        self, conn: socket.socket, deadline: float, then: Callable[[socket.socket], None] | None
    ) -> socket.socket | None:
        ok = self._handshake(conn, deadline)
        if ok is not None and then is not None:
            with ok:
                then(ok)
        return ok

    def close(self) -> None:
        self.sock.close()


def send_chunk(conn: socket.socket, block_index: int, num_blocks: int, nbytes: int, data: bytes) -> None:
    """Write one chunk (blocking: run it in a thread)."""
    conn.sendall(HEADER.pack(block_index, num_blocks, nbytes, len(data)))
    if data:
        conn.sendall(data)


def send_views(conn: socket.socket, block_index: int, num_blocks: int, views: list[memoryview]) -> int:
    """Write one chunk whose bytes are ``views`` in order, without joining them (blocking: run it in a
    thread). On a plain socket one gather write (``sendmsg``) sends the header and the cache's own
    memory; TLS encrypts anyway, so there each view is written in turn. Returns the data length."""
    length = sum(len(v) for v in views)
    head = memoryview(HEADER.pack(block_index, num_blocks, length, length))
    if isinstance(conn, ssl.SSLSocket):  # no sendmsg on TLS sockets
        conn.sendall(head)
        for v in views:
            conn.sendall(v)
        return length
    _sendmsg_all(conn, [head, *views])
    return length


def _sendmsg_all(conn: socket.socket, bufs: list[memoryview]) -> None:
    """``sendall`` for a list of buffers: gather writes until every byte went (a write may be partial)."""
    pending = [b for b in bufs if len(b)]
    while pending:
        sent = conn.sendmsg(pending[:IOV_MAX])
        if sent <= 0:
            raise ConnectionError("data socket accepted no bytes")
        done = 0
        while done < len(pending) and sent >= len(pending[done]):
            sent -= len(pending[done])
            done += 1
        pending = pending[done:]
        if sent:
            pending[0] = pending[0][sent:]


class BlockSink(Protocol):
    """Where pulled blocks land: writable views of the receiving cache's own memory."""

    def views(self, index: int, n: int) -> list[memoryview]:
        """Views of the handle's blocks ``index .. index + n`` in the wire layout (their lengths add up
        to the chunk's bytes)."""
        ...


def chunk_error(index: int, n: int, length: int, expect_index: int, end: int, block_nbytes: int) -> str | None:
    """Why a chunk header cannot be written where the pull expects the next blocks, or None.

    Checked before any of its bytes land: chunks come in order, inside the pulled range, and carry
    exactly ``n`` blocks of this cache's size (none on engines that move no bytes).
    """
    if index != expect_index or n <= 0 or index + n > end:
        return f"blocks {index}..{index + n} where {expect_index}..{end} were expected next"
    if length != n * block_nbytes:
        return f"{length} bytes for {n} blocks of {block_nbytes}"
    return None


def write_views(views: list[memoryview], data: bytes) -> None:
    """Copy one chunk's bytes (a gRPC message) into the views, in order."""
    pos = 0
    src = memoryview(data)
    for v in views:
        v[:] = src[pos : pos + len(v)]
        pos += len(v)
    if pos != len(src):
        raise ValueError(f"{len(src)} bytes for views of {pos}")


@dataclass
class Received:
    blocks: int
    nbytes: int
    #: whether any byte arrived (a failure before the first one can fall back to the gRPC stream)
    started: bool


def _recv_into(conn: socket.socket, view: memoryview) -> None:
    n = len(view)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:], min(RECV_BYTES, n - got))
        if not k:
            raise ConnectionError(f"data socket closed after {got} of {n} bytes")
        got += k


def _recv_exact(conn: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    _recv_into(conn, memoryview(buf))
    return buf


class Receiver:
    """The decode side of one data-socket pull: :meth:`run` (in a thread) reads chunks into a sink;
    :meth:`abort` (any thread) stops it, so a cancelled pull's thread stops writing before its blocks
    are freed."""

    def __init__(self, host: str, port: int, token: bytes, tls: TlsConfig | None, timeout: float = IO_TIMEOUT_S):
        self.host = host.strip("[]")
        self.port = port
        self.token = token
        self.tls = tls
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._aborted = False
        self._lock = threading.Lock()

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)  # a blocked recv returns at once
                except OSError:
                    pass

    def run(self, first: int, blocks: int, sink: BlockSink, block_nbytes: int) -> Received:
        """Connect, authenticate and write the handle's blocks ``first .. first + blocks`` into ``sink``.

        ``block_nbytes``: one block's bytes (0 on engines that move none: only headers arrive).
        Raises OSError (ConnectionError, ssl.SSLError, TimeoutError); ``started`` on the exception's
        ``received`` attribute says whether any chunk had arrived.
        """
        out = Received(0, 0, False)
        try:
            raw = socket.create_connection((self.host, self.port), timeout=min(self.timeout, 10.0))
            with self._lock:
                self._sock = raw
                if self._aborted:
                    raw.close()
                    raise ConnectionAbortedError("pull cancelled")
            conn: socket.socket = raw
            if self.tls is not None:
                ctx = self.tls.ssl_context_client()
                conn = ctx.wrap_socket(raw, server_hostname=self.tls.server_name or self.host)
                with self._lock:
                    self._sock = conn  # the TLS socket took over the descriptor
                    if self._aborted:
                        conn.close()
                        raise ConnectionAbortedError("pull cancelled")
            with conn:
                _tcp(conn, self.timeout)
                conn.sendall(self.token)
                end = first + blocks
                while out.blocks < blocks:
                    index, n, nbytes, length = HEADER.unpack(_recv_exact(conn, HEADER.size))
                    out.started = True
                    why = chunk_error(index, n, length, first + out.blocks, end, block_nbytes)
                    if why is not None:
                        raise ConnectionError(f"bad KV chunk on the data socket: {why}")
                    if length:
                        for view in sink.views(index, n):  # straight into the cache's blocks
                            _recv_into(conn, view)
                    out.nbytes += nbytes
                    out.blocks += n
        except OSError as e:
            e.received = out  # type: ignore[attr-defined]
            raise
        return out


def receive(
    host: str,
    port: int,
    token: bytes,
    first: int,
    blocks: int,
    sink: BlockSink,
    block_nbytes: int,
    tls: TlsConfig | None,
    timeout: float = IO_TIMEOUT_S,
) -> Received:
    """One pull's blocks into ``sink`` (blocking: run in a thread; see :class:`Receiver`)."""
    return Receiver(host, port, token, tls, timeout).run(first, blocks, sink, block_nbytes)
