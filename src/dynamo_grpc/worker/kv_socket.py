"""The KV byte path beside gRPC: a one-shot TCP connection per Pull (TLS when the process has TLS).

gRPC carries the control (Pull's first response names a port and a one-time token); the bytes go over
a plain socket with large writes and no per-chunk protobuf, the way NIXL keeps bytes off its control
plane. On this box a gRPC stream tops out near 500 MB/s while a loopback socket moves several GB/s
(``dynamo-grpc bench disagg``).

Server side (:class:`DataListener`): listens on an ephemeral port of the gRPC listener's host, accepts
until one connection presents the token (others are closed), then the caller writes chunks. Client side
(:func:`receive`): connects, sends the token, reads chunks until it has the blocks it expects. Blocking
sockets run in threads. No copy on either side beyond the kernel's: the server gathers the cache's own
memory into each write (:func:`send_views`), the client receives (``recv_into``) into a resident buffer kept from the
previous pull (:class:`ReceivePool`), since a fresh one costs as much in page faults as the transfer.
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
from typing import cast

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

    async def accept(
        self, timeout: float, then: Callable[[socket.socket], None] | None = None
    ) -> socket.socket | None:
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


class ReceivePool:
    """Receive buffers kept from one pull for the next, up to ``cap_bytes`` in all (0: keep none).

    Why: a fresh buffer for a 16k-token pull is ~377 MB of new pages, and faulting them in costs as much
    as moving the bytes (``dynamo-grpc bench disagg``: the raw socket with its buffer allocated inside
    the timer is 2-3x slower). A kept buffer is already resident. A buffer is free again once no view of
    it lives (the pull's chunks and the tensors the engine read them through): a ``bytearray`` refuses to
    resize while any view exists, which is the test. Pulls larger than what is left of the cap get a
    buffer of their own that goes when its views go, so memory stays bounded by the cap plus the pulls
    in flight.
    """

    def __init__(self, cap_bytes: int = 0) -> None:
        self.cap_bytes = cap_bytes
        self._bufs: list[bytearray] = []
        self._lock = threading.Lock()
        #: pulls served from a kept buffer / given a new one
        self.reused = 0
        self.allocated = 0

    @property
    def held_bytes(self) -> int:
        return sum(len(b) for b in self._bufs)

    def take(self, nbytes: int) -> memoryview:
        """A writable view of ``nbytes`` (thread-safe: pulls run in threads)."""
        if nbytes <= 0:
            return memoryview(bytearray(0))
        with self._lock:
            fits = [b for b in self._bufs if len(b) >= nbytes and _unviewed(b)]
            if fits:
                self.reused += 1
                return memoryview(min(fits, key=len))[:nbytes]
            self.allocated += 1
            buf = bytearray(nbytes)
            if self.cap_bytes > 0:
                idle = [b for b in self._bufs if _unviewed(b)]
                # make room: drop idle kept buffers (smallest first) until this one fits under the cap
                for old in sorted(idle, key=len):
                    if self.held_bytes + nbytes <= self.cap_bytes:
                        break
                    self._bufs.remove(old)
                if self.held_bytes + nbytes <= self.cap_bytes:
                    self._bufs.append(buf)
            return memoryview(buf)

    def clear(self) -> None:
        with self._lock:
            self._bufs.clear()


def _unviewed(buf: bytearray) -> bool:
    """Whether no view of ``buf`` exists: resizing a viewed bytearray raises BufferError (O(1) probe:
    dropping the last byte keeps the allocation, and putting it back fits in it)."""
    try:
        last = buf[-1]
        del buf[-1:]
    except BufferError:
        return False
    buf.append(last)
    return True


#: the process's pool (a decode worker sets the cap from --kv-recv-pool-mb)
RECEIVE_POOL = ReceivePool()


@dataclass
class Received:
    chunks: list[tuple[int, int, bytes]]
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
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:], min(RECV_BYTES, n - got))
        if not k:
            raise ConnectionError(f"data socket closed after {got} of {n} bytes")
        got += k
    return buf


def receive(
    host: str,
    port: int,
    token: bytes,
    blocks: int,
    tls: TlsConfig | None,
    timeout: float = IO_TIMEOUT_S,
    expect_bytes: int = 0,
) -> Received:
    """Connect, authenticate and read chunks until ``blocks`` blocks arrived (blocking: run in a thread).

    ``expect_bytes``: the pull's size when known; the chunks are then slices of one buffer.

    Raises OSError (ConnectionError, ssl.SSLError, TimeoutError); ``started`` on the exception's
    ``received`` attribute says whether any chunk had arrived.
    """
    out = Received([], 0, False)
    try:
        raw = socket.create_connection((host.strip("[]"), port), timeout=min(timeout, 10.0))
        conn: socket.socket = raw
        if tls is not None:
            conn = tls.ssl_context_client().wrap_socket(raw, server_hostname=tls.server_name or host.strip("[]"))
        with conn:
            _tcp(conn, timeout)
            conn.sendall(token)
            whole = RECEIVE_POOL.take(expect_bytes)  # one buffer for the pull; chunks are slices of it
            pos = got = 0
            while got < blocks:
                head = _recv_exact(conn, HEADER.size)
                out.started = True
                index, n, nbytes, length = HEADER.unpack(head)
                # no bytes() copy: the engine reads chunks through the buffer protocol only
                if pos + length <= len(whole):
                    view = whole[pos : pos + length]
                    _recv_into(conn, view)
                    pos += length
                    data = cast(bytes, view)
                else:
                    data = cast(bytes, _recv_exact(conn, length)) if length else b""
                out.chunks.append((index, n, data))
                out.nbytes += nbytes
                got += n
    except OSError as e:
        e.received = out  # type: ignore[attr-defined]
        raise
    return out
