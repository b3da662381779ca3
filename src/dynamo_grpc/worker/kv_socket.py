"""The KV byte path beside gRPC: a one-shot TCP connection per Pull (TLS when the process has TLS).

gRPC carries the control (Pull's first response names a port and a one-time token); the bytes go over
a plain socket with large writes and no per-chunk protobuf, the way NIXL keeps bytes off its control
plane. On this box a gRPC stream tops out near 500 MB/s while a loopback socket moves several GB/s
(``dynamo-grpc bench disagg``).

Server side (:class:`DataListener`): listens on an ephemeral port of the gRPC listener's host, accepts
until one connection presents the token (others are closed), then the caller writes chunks. Client side
(:func:`receive`): connects, sends the token, reads chunks until it has the blocks it expects. Blocking
sockets run in threads: ``recv_into`` a preallocated buffer is what makes the raw socket fast.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import socket
import ssl
import struct
import time
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

    async def accept(self, timeout: float) -> socket.socket | None:
        """The authenticated connection, or None when none came within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                conn, _ = await asyncio.wait_for(loop.sock_accept(self.sock), left)
            except TimeoutError:
                return None
            ok = await asyncio.to_thread(self._handshake, conn, deadline)
            if ok is not None:
                return ok
        return None

    def close(self) -> None:
        self.sock.close()


def send_chunk(conn: socket.socket, block_index: int, num_blocks: int, nbytes: int, data: bytes) -> None:
    """Write one chunk (blocking: run it in a thread)."""
    conn.sendall(HEADER.pack(block_index, num_blocks, nbytes, len(data)))
    if data:
        conn.sendall(data)


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
            whole = memoryview(bytearray(expect_bytes))  # one allocation for the pull; chunks are slices
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
