"""Open channels to peers, with retries of UNAVAILABLE for idempotent calls.

A process sets its TLS config once (:func:`use_tls`, from the role's main); every channel opened
here afterwards dials with it unless its :class:`ChannelOptions` name another, so the call sites
that open channels (routing, engine clients, replay) need no TLS code of their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import grpc

from dynamo_grpc.observability.interceptors import client_interceptors
from dynamo_grpc.transport.options import DEFAULT_MAX_MESSAGE_BYTES, common_channel_args
from dynamo_grpc.transport.tls import TlsConfig


@dataclass
class ChannelOptions:
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    #: None: the process default set by :func:`use_tls` (plaintext when none was set)
    tls: TlsConfig | None = None
    #: full method names ("/pkg.Service/Method") or services ("pkg.Service") safe to retry
    idempotent: tuple[str, ...] = ()
    max_attempts: int = 4


_default_tls: TlsConfig | None = None


def use_tls(tls: TlsConfig | None) -> TlsConfig | None:
    """Make ``tls`` the config of every channel this process opens from now on (None: plaintext).

    Returns ``tls``, so a main can write ``tls = use_tls(TlsConfig.from_args(args, parser))``.
    """
    global _default_tls
    _default_tls = tls
    return tls


def default_tls() -> TlsConfig | None:
    return _default_tls


def _service_config(idempotent: tuple[str, ...], max_attempts: int) -> str:
    names = []
    for item in idempotent:
        item = item.lstrip("/")
        if "/" in item:
            service, method = item.split("/", 1)
            names.append({"service": service, "method": method})
        else:
            names.append({"service": item})
    if not names:
        return json.dumps({})
    policy = {
        "maxAttempts": max_attempts,
        "initialBackoff": "0.05s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


def open_channel(address: str, options: ChannelOptions | None = None) -> grpc.aio.Channel:
    """An aio channel to ``host:port``; idempotent methods retry on UNAVAILABLE."""
    o = options or ChannelOptions()
    args = common_channel_args(o.max_message_bytes, o.keepalive_time_s, o.keepalive_timeout_s) + [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", _service_config(o.idempotent, o.max_attempts)),  # type: ignore[list-item]
    ]
    tls = o.tls if o.tls is not None else _default_tls
    if tls is not None:
        opts = args + tls.channel_args()  # type: ignore[operator]
        creds = tls.channel_credentials()
        return grpc.aio.secure_channel(address, creds, options=opts, interceptors=client_interceptors())
    return grpc.aio.insecure_channel(address, options=args, interceptors=client_interceptors())
