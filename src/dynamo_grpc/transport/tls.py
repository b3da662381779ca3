"""TLS / mTLS material for servers and channels, read from files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TlsConfig:
    """PEM files. With ``ca_file`` on a server, clients must present a certificate (mTLS)."""

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None

    def _read(self, path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    def server_credentials(self) -> grpc.ServerCredentials:
        cert, key = self._read(self.cert_file), self._read(self.key_file)
        if cert is None or key is None:
            raise ValueError("a TLS server needs both cert_file and key_file")
        ca = self._read(self.ca_file)
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self._read(self.ca_file),
            private_key=self._read(self.key_file),
            certificate_chain=self._read(self.cert_file),
        )
