"""One TLS configuration for every listener and client of a process.

Built from flags or ``DYN_TLS_*`` environment variables (flags win), like Consul's
``CONSUL_CACERT`` family, so a deployment sets the variables once for all roles:

==========================  ======================  ==========================================
flag                        environment             meaning
==========================  ======================  ==========================================
``--tls-cert``              ``DYN_TLS_CERT``        this process's certificate (PEM); turns TLS on
``--tls-key``               ``DYN_TLS_KEY``         its private key
``--tls-ca``                ``DYN_TLS_CA``          CA bundle: verifies peers; internal listeners
                                                    then require client certificates (mTLS)
``--tls-client-cert``       ``DYN_TLS_CLIENT_CERT`` certificate presented when dialling peers
                                                    (default: the server pair)
``--tls-client-key``        ``DYN_TLS_CLIENT_KEY``  its key
``--tls-server-name``       ``DYN_TLS_SERVER_NAME`` name checked in peers' certificates instead of
                                                    the dialled host (tests, IP-only certificates)
``--tls-client-auth``       ``DYN_TLS_CLIENT_AUTH`` public listeners only: none | optional | require
``--tls-reload-interval``   ``DYN_TLS_RELOAD_S``    seconds between checks of the files' mtimes
``--health-port``           ``DYN_HEALTH_PORT``     plaintext grpc.health.v1-only listener for probes
==========================  ======================  ==========================================

Internal listeners (router, worker, KvTransfer, ...) verify clients whenever a CA is given. The
public ones (KServe gRPC, OpenAI HTTP) follow ``--tls-client-auth`` (default none: tritonclient
users bring a CA, not a certificate).
"""

from __future__ import annotations

import argparse
import enum
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import grpc

from dynamo_grpc.transport.reload import CertReloader, TlsFileError

__all__ = ["ClientAuth", "TlsConfig", "TlsFileError", "add_tls_flags"]


class ClientAuth(enum.StrEnum):
    """Whether a listener asks TLS clients for a certificate."""

    NONE = "none"
    OPTIONAL = "optional"  # verified when presented (HTTP only: gRPC Python cannot request without requiring)
    REQUIRE = "require"


@dataclass(frozen=True)
class _Setting:
    dest: str
    flag: str
    env: str
    help: str
    public_only: bool = False


#: the one table of TLS flags and their environment variables
SETTINGS = (
    _Setting("cert_file", "--tls-cert", "DYN_TLS_CERT", "certificate (PEM) of this process; turns TLS on"),
    _Setting("key_file", "--tls-key", "DYN_TLS_KEY", "private key (PEM) of --tls-cert"),
    _Setting(
        "ca_file",
        "--tls-ca",
        "DYN_TLS_CA",
        "CA bundle (PEM) that verifies peers; internal listeners then require client certificates (mTLS)",
    ),
    _Setting(
        "client_cert_file",
        "--tls-client-cert",
        "DYN_TLS_CLIENT_CERT",
        "certificate presented when dialling other processes (default: --tls-cert)",
    ),
    _Setting("client_key_file", "--tls-client-key", "DYN_TLS_CLIENT_KEY", "private key of --tls-client-cert"),
    _Setting(
        "server_name",
        "--tls-server-name",
        "DYN_TLS_SERVER_NAME",
        "name to verify in peers' certificates instead of the dialled host",
    ),
    _Setting(
        "client_auth",
        "--tls-client-auth",
        "DYN_TLS_CLIENT_AUTH",
        "client certificates on the public listeners: none | optional (HTTP only) | require",
        public_only=True,
    ),
    _Setting("reload_interval_s", "--tls-reload-interval", "DYN_TLS_RELOAD_S", "seconds between checks of the files"),
)
HEALTH_PORT = _Setting(
    "health_port",
    "--health-port",
    "DYN_HEALTH_PORT",
    "also serve grpc.health.v1 (only) in plaintext on this port, for probes that carry no certificate",
)


def add_tls_flags(parser: argparse.ArgumentParser, public: bool, env: Mapping[str, str] | None = None) -> None:
    """Add the TLS flags (and ``--health-port``) to a role's parser; the environment gives the defaults.

    ``public`` adds ``--tls-client-auth`` (the frontend's KServe and OpenAI listeners).
    """
    env = os.environ if env is None else env
    group = parser.add_argument_group("TLS (flags override the DYN_TLS_* environment)")
    for s in SETTINGS:
        if s.public_only and not public:
            continue
        kw: dict[str, Any] = {"dest": s.dest, "default": env.get(s.env) or None, "help": f"{s.help} [{s.env}]"}
        if s.dest == "client_auth":
            kw["choices"] = [c.value for c in ClientAuth]
        if s.dest == "reload_interval_s":
            kw["type"] = float
        group.add_argument(s.flag, **kw)
    # a string default goes through type=int like a flag would, so a bad DYN_HEALTH_PORT is named by argparse
    group.add_argument(
        HEALTH_PORT.flag,
        dest=HEALTH_PORT.dest,
        type=int,
        default=env.get(HEALTH_PORT.env) or None,
        help=f"{HEALTH_PORT.help} [{HEALTH_PORT.env}]",
    )


@dataclass(frozen=True)
class TlsConfig:
    """PEM file paths and policy; the bytes live in :attr:`certs`, which reloads them in place.

    Two configs from the same settings compare equal (the loaded material is not compared).
    """

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    client_cert_file: str | None = None
    client_key_file: str | None = None
    server_name: str | None = None
    client_auth: ClientAuth = ClientAuth.NONE
    reload_interval_s: float = 5.0
    certs: CertReloader = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise TlsFileError("--tls-cert and --tls-key go together")
        if bool(self.client_cert_file) != bool(self.client_key_file):
            raise TlsFileError("--tls-client-cert and --tls-client-key go together")
        if not (self.cert_file or self.ca_file):
            raise TlsFileError("TLS needs --tls-cert/--tls-key (a server) or --tls-ca (a client)")
        try:
            auth = ClientAuth(self.client_auth)
        except ValueError:  # argparse checks the flag's choices, not a DYN_TLS_CLIENT_AUTH default
            choices = " | ".join(c.value for c in ClientAuth)
            raise TlsFileError(f"--tls-client-auth must be {choices}, not {self.client_auth!r}") from None
        object.__setattr__(self, "client_auth", auth)
        if auth is not ClientAuth.NONE and not self.ca_file:
            raise TlsFileError(f"--tls-client-auth {auth.value} needs --tls-ca to verify client certificates")
        if self.reload_interval_s <= 0:
            raise TlsFileError("--tls-reload-interval must be positive")
        server = (self.cert_file, self.key_file) if self.cert_file and self.key_file else None
        client = server
        if self.client_cert_file and self.client_key_file:
            client = (self.client_cert_file, self.client_key_file)
        object.__setattr__(self, "certs", CertReloader(server, client, self.ca_file, self.reload_interval_s))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_args(cls, args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> TlsConfig | None:
        """The config of a parser that had :func:`add_tls_flags`; None when no TLS setting is given.

        With ``parser``, a bad setting exits through ``parser.error`` (usage and the message, exit 2)
        instead of raising :class:`TlsFileError`.
        """
        try:
            return cls._from_args(args)
        except TlsFileError as exc:
            if parser is None:
                raise
            parser.error(str(exc))

    @classmethod
    def _from_args(cls, args: argparse.Namespace) -> TlsConfig | None:
        names = [f.name for f in fields(cls) if f.init]
        values = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
        files = ("cert_file", "key_file", "ca_file", "client_cert_file", "client_key_file")
        if not any(values.get(k) for k in files):
            stray = [s.flag for s in SETTINGS if s.dest in values and values[s.dest] != ClientAuth.NONE.value]
            if stray:
                raise TlsFileError(f"{', '.join(stray)} given but TLS is off (no --tls-cert or --tls-ca)")
            return None
        return cls(**values)

    @classmethod
    def from_env(cls, public: bool = False, env: Mapping[str, str] | None = None) -> TlsConfig | None:
        """The same config from ``DYN_TLS_*`` variables alone (processes without a TLS parser)."""
        parser = argparse.ArgumentParser(add_help=False)
        add_tls_flags(parser, public, env)
        return cls.from_args(parser.parse_args([]))

    # ------------------------------------------------------------------ policy
    def client_auth_for(self, public: bool) -> ClientAuth:
        """Internal listeners require a client certificate whenever a CA is configured."""
        if public:
            return self.client_auth
        return ClientAuth.REQUIRE if self.ca_file else ClientAuth.NONE

    # ------------------------------------------------------------------ gRPC
    def server_credentials(self, public: bool = False) -> grpc.ServerCredentials:
        """Credentials for ``add_secure_port``; new handshakes pick up reloaded certificates."""
        auth = self.client_auth_for(public)
        if auth is ClientAuth.OPTIONAL:
            raise TlsFileError(
                "--tls-client-auth optional is not available on gRPC listeners (grpc Python can only require a "
                "client certificate or not ask for one); use none or require"
            )
        require = auth is ClientAuth.REQUIRE
        return grpc.dynamic_ssl_server_credentials(
            self.certs.grpc_certificate_configuration(with_ca=require),
            self.certs.grpc_fetcher(with_ca=require),
            require_client_authentication=require,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for dialling a peer: the CA (system roots when none) and the client pair."""
        pair = self.certs.client_pair
        return grpc.ssl_channel_credentials(
            root_certificates=self.certs.ca,
            private_key=pair.key_pem if pair else None,
            certificate_chain=pair.cert_pem if pair else None,
        )

    def channel_args(self) -> list[tuple[str, str]]:
        """Channel arguments that go with :meth:`channel_credentials` (the server-name override)."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    # ------------------------------------------------------------------ aiohttp / ssl
    def ssl_context_server(self, public: bool = False) -> ssl.SSLContext:
        """An ``ssl_context`` for ``web.TCPSite``; reloaded in place with the files."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.certs.server_pair is None:
            raise TlsFileError("a TLS server needs --tls-cert and --tls-key")
        auth = self.client_auth_for(public)
        ctx.verify_mode = {
            ClientAuth.NONE: ssl.CERT_NONE,
            ClientAuth.OPTIONAL: ssl.CERT_OPTIONAL,
            ClientAuth.REQUIRE: ssl.CERT_REQUIRED,
        }[auth]
        return self.certs.track(ctx, "server")

    def ssl_context_client(self) -> ssl.SSLContext:
        """An ``ssl`` context for aiohttp clients: verifies the server against the CA, presents the client pair.

        With :attr:`server_name` set, pass ``server_hostname=config.server_name`` to the request.
        """
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if self.certs.ca is None:
            ctx.load_default_certs()
        return self.certs.track(ctx, "client")
