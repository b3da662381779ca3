"""Certificate material that can be replaced while a process runs.

A :class:`CertReloader` holds the PEM bytes every listener and channel of a process uses. It
re-reads the files on SIGHUP or when their mtime/size/inode changes (polled; no extra
dependency), validates the new pair (the key must match the certificate) and only then swaps it
in, so a half-written file or a wrong key never replaces a working certificate: the error is
logged and the old one stays.

After a swap, *new* handshakes use the new certificate and established connections (and their
streams) keep running: gRPC servers ask :meth:`grpc_fetcher`'s callback before each handshake,
live ``ssl.SSLContext`` objects (aiohttp servers and clients) get ``load_cert_chain`` on the same
context, and new gRPC channels read :attr:`client_pair` when they are opened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

# cryptography is imported where files are parsed, so a plaintext process never needs it
log = logging.getLogger(__name__)

#: (st_mtime_ns, st_size, st_ino) of a file, or None when it is missing
_Stamp = tuple[int, int, int] | None


class TlsFileError(ValueError):
    """A certificate, key or CA file is missing, unreadable or inconsistent; the message names it."""


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate chain and its private key, with the files they came from."""

    cert_file: str
    key_file: str
    cert_pem: bytes
    key_pem: bytes

    @property
    def serial(self) -> int:
        from cryptography import x509

        return x509.load_pem_x509_certificate(self.cert_pem).serial_number


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsFileError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from exc
    if b"-----BEGIN" not in data:
        raise TlsFileError(f"{what} {path!r} is not PEM")
    return data


def load_pair(cert_file: str, key_file: str) -> KeyPair:
    """Read and check a certificate/key pair: both parse and the key belongs to the certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_pem, key_pem = _read(cert_file, "certificate"), _read(key_file, "private key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise TlsFileError(f"certificate {cert_file!r} does not parse: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TlsFileError(f"private key {key_file!r} does not parse (encrypted keys are unsupported): {exc}") from exc
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise TlsFileError(f"private key {key_file!r} does not belong to certificate {cert_file!r}")
    return KeyPair(cert_file, key_file, cert_pem, key_pem)


def load_ca(ca_file: str) -> bytes:
    """Read a CA bundle and check that it holds at least one certificate."""
    from cryptography import x509

    data = _read(ca_file, "CA file")
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise TlsFileError(f"CA file {ca_file!r} does not parse: {exc}") from exc
    return data


def _stamp(path: str) -> _Stamp:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class CertReloader:
    """The current server pair, client pair and CA of one process, reloaded in place."""

    def __init__(
        self,
        server: tuple[str, str] | None,
        client: tuple[str, str] | None,
        ca_file: str | None,
        poll_interval_s: float = 5.0,
    ) -> None:
        self._server_files, self._client_files, self._ca_file = server, client, ca_file
        self.poll_interval_s = poll_interval_s
        self.generation = 0
        self.server_pair: KeyPair | None = None
        self.client_pair: KeyPair | None = None
        self.ca: bytes | None = None
        self._contexts: weakref.WeakKeyDictionary[ssl.SSLContext, str] = weakref.WeakKeyDictionary()
        self._users = 0
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stamps = self._current_stamps()
        self._load()

    def _paths(self) -> list[str]:
        paths = [*(self._server_files or ()), *(self._client_files or ())]
        return paths + ([self._ca_file] if self._ca_file else [])

    def _current_stamps(self) -> dict[str, _Stamp]:
        return {p: _stamp(p) for p in self._paths()}

    def _load(self) -> None:
        server = load_pair(*self._server_files) if self._server_files else None
        client = load_pair(*self._client_files) if self._client_files else None
        ca = load_ca(self._ca_file) if self._ca_file else None
        self.server_pair, self.client_pair, self.ca = server, client, ca
        self.generation += 1

    # ------------------------------------------------------------------ reload
    def reload(self) -> bool:
        """Re-read every file now (SIGHUP). Returns whether the new material was taken."""
        self._stamps = self._current_stamps()
        try:
            self._load()
        except TlsFileError as exc:
            log.error("TLS reload refused, keeping the current certificates: %s", exc)
            return False
        for ctx, role in list(self._contexts.items()):
            try:
                self._fill_context(ctx, role)
            except (ssl.SSLError, OSError) as exc:  # files replaced again since _load: next poll retries
                log.error("TLS reload of an SSL context failed: %s", exc)
                self._stamps = {}
        serial = self.server_pair.serial if self.server_pair else None
        log.info("TLS certificates reloaded (generation %d, server serial %s)", self.generation, serial)
        return True

    def poll(self) -> bool:
        """Reload if a file changed since the last load; cheap (one stat per file)."""
        if self._current_stamps() == self._stamps:
            return False
        return self.reload()

    # ------------------------------------------------------------------ users
    def grpc_certificate_configuration(self, with_ca: bool) -> grpc.ServerCertificateConfiguration:
        if self.server_pair is None:
            raise TlsFileError("a TLS server needs --tls-cert and --tls-key")
        pair = self.server_pair
        return grpc.ssl_server_certificate_configuration([(pair.key_pem, pair.cert_pem)], self.ca if with_ca else None)

    def grpc_fetcher(self, with_ca: bool) -> Callable[[], grpc.ServerCertificateConfiguration | None]:
        """gRPC calls this before every handshake: a new configuration after a reload, else None."""
        served = self.generation

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            nonlocal served
            if self.generation == served:
                return None
            served = self.generation
            return self.grpc_certificate_configuration(with_ca)

        return fetch

    def track(self, ctx: ssl.SSLContext, role: str) -> ssl.SSLContext:
        """Load ``role``'s pair ("server" or "client") and the CA into ``ctx``, and again on every reload."""
        self._fill_context(ctx, role)
        self._contexts[ctx] = role
        return ctx

    def _fill_context(self, ctx: ssl.SSLContext, role: str) -> None:
        pair = self.server_pair if role == "server" else self.client_pair
        if pair is not None:
            ctx.load_cert_chain(pair.cert_file, pair.key_file)
        if self.ca is not None:
            ctx.load_verify_locations(cadata=self.ca.decode())

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Watch the files (mtime poll) and SIGHUP from the running loop; counted, so every
        listener of a process can call it and the last :meth:`stop` ends the watch."""
        self._users += 1
        if self._users > 1:
            return
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._task = loop.create_task(self._watch(), name="tls-reload")
        try:
            loop.add_signal_handler(signal.SIGHUP, self.reload)
        except (RuntimeError, ValueError, NotImplementedError):  # not the main thread: mtime polling only
            log.debug("SIGHUP reload unavailable outside the main thread; polling files only")
            self._loop = None

    async def stop(self) -> None:
        self._users = max(0, self._users - 1)
        if self._users:
            return
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGHUP)
            self._loop = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            self.poll()
