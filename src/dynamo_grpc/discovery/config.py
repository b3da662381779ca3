"""Where the Consul agent is and how to talk to it, read from the environment variables Consul's CLI uses."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_ADDR = "127.0.0.1:8500"


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "t", "true", "yes", "on")


@dataclass(frozen=True)
class ConsulSettings:
    """Connection settings for one agent. ``verify`` is False, True, or a CA bundle path."""

    host: str = "127.0.0.1"
    port: int = 8500
    scheme: str = "http"
    token: str | None = None
    verify: bool | str = True
    cert: tuple[str, str] | str | None = None
    #: where the token came from (``CONSUL_HTTP_TOKEN``, ``CONSUL_HTTP_TOKEN_FILE <path>``), for messages
    token_source: str = ""

    @property
    def address(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    @classmethod
    def from_addr(
        cls,
        addr: str,
        *,
        token: str | None = None,
        ssl: bool | None = None,
        verify: bool | str = True,
        cert: tuple[str, str] | str | None = None,
        token_source: str = "",
    ) -> ConsulSettings:
        """Parse ``host:port``, ``http://host:port`` or ``https://host:port`` (CONSUL_HTTP_ADDR's forms)."""
        text = addr.strip()
        if text.startswith("unix://"):
            raise ValueError(f"CONSUL_HTTP_ADDR {addr!r}: unix sockets are not supported")
        parsed = urllib.parse.urlsplit(text if "//" in text else f"//{text}")
        scheme = parsed.scheme or "http"
        if scheme not in ("http", "https"):
            raise ValueError(f"CONSUL_HTTP_ADDR {addr!r}: scheme must be http or https")
        if ssl is not None:
            scheme = "https" if ssl else "http"
        try:
            port = parsed.port or (443 if scheme == "https" and parsed.scheme else 8500)
        except ValueError as exc:
            raise ValueError(f"CONSUL_HTTP_ADDR {addr!r}: {exc}") from None
        if not parsed.hostname:
            raise ValueError(f"CONSUL_HTTP_ADDR {addr!r}: missing host")
        return cls(
            host=parsed.hostname,
            port=port,
            scheme=scheme,
            token=token or None,
            verify=verify,
            cert=cert,
            token_source=token_source if token else "",
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, addr: str | None = None) -> ConsulSettings:
        """CONSUL_HTTP_ADDR, CONSUL_HTTP_TOKEN(_FILE), CONSUL_HTTP_SSL(_VERIFY), CONSUL_CACERT,
        CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY, with the defaults of Consul's own CLI. ``addr`` (e.g.
        a ``--consul`` flag) replaces CONSUL_HTTP_ADDR; token and TLS still come from the environment."""
        env = os.environ if env is None else env
        token = env.get("CONSUL_HTTP_TOKEN") or None
        source = "CONSUL_HTTP_TOKEN"
        if token is None and env.get("CONSUL_HTTP_TOKEN_FILE"):
            source = f"CONSUL_HTTP_TOKEN_FILE {env['CONSUL_HTTP_TOKEN_FILE']}"
            with open(env["CONSUL_HTTP_TOKEN_FILE"], encoding="utf-8") as fh:
                token = fh.read().strip() or None
        ssl = _truthy(env["CONSUL_HTTP_SSL"]) if env.get("CONSUL_HTTP_SSL") else None
        verify: bool | str = True
        if env.get("CONSUL_HTTP_SSL_VERIFY"):
            verify = _truthy(env["CONSUL_HTTP_SSL_VERIFY"])
        if verify is not False and env.get("CONSUL_CACERT"):
            verify = env["CONSUL_CACERT"]
        cert: tuple[str, str] | str | None = None
        client_cert, client_key = env.get("CONSUL_CLIENT_CERT"), env.get("CONSUL_CLIENT_KEY")
        if client_cert and client_key:
            cert = (client_cert, client_key)
        elif client_cert:
            cert = client_cert
        elif client_key:
            raise ValueError("CONSUL_CLIENT_KEY is set without CONSUL_CLIENT_CERT")
        return cls.from_addr(
            addr or env.get("CONSUL_HTTP_ADDR") or DEFAULT_ADDR,
            token=token,
            ssl=ssl,
            verify=verify,
            cert=cert,
            token_source=source,
        )
