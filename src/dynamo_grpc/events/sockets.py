"""The event plane's ZeroMQ sockets: every limit and the CURVE setup in one place.

Both publishers (a worker's KV PUB, a router replica's active-sequence PUB) and subscribers are
built here, so the bounds below hold everywhere:

- A PUB keeps a trie of the subscriptions its peers send, ~48 bytes of heap per byte of
  subscription. An outsider sending huge subscription frames grew a worker by ~48x the bytes
  sent; :data:`PUB_MAX_INBOUND_BYTES` makes libzmq drop a peer at its first frame larger than a
  topic can be, and a small :data:`PUB_RCVHWM` stops reading from a peer that floods.
  (Many *small distinct* subscriptions still cost trie memory: only CURVE's allow-list keeps
  strangers from subscribing at all; see docs/security.md ("Event plane: ZeroMQ CURVE").)
- A SUB drops a peer sending a frame over :data:`MAX_EVENT_FRAME_BYTES`; publishers refuse to
  send one (the batch is recovered by Replay over gRPC).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import zmq

from dynamo_grpc.events.curve import (
    ZMQ_ENDPOINT_META,
    ZMQ_PUBLIC_KEY_META,
    CurveConfig,
    CurveError,
    forget_server,
    make_server,
    set_client,
)

#: largest frame a PUB accepts from a peer: a subscription is 1 byte + a topic (``kv.<model>``)
PUB_MAX_INBOUND_BYTES = 1024
#: longest topic a publisher may use (so that its subscribers' subscriptions fit the bound above)
MAX_TOPIC_BYTES = PUB_MAX_INBOUND_BYTES - 1
#: subscription messages queued per peer before libzmq stops reading from it
PUB_RCVHWM = 100
#: largest event frame on the wire (a KV batch of ~500k blocks); bigger ones go by Replay
MAX_EVENT_FRAME_BYTES = 16 * 1024 * 1024
DEFAULT_SNDHWM = 10_000
DEFAULT_SUB_RCVHWM = 100_000

_Sock = TypeVar("_Sock", bound="zmq.Socket[Any]")


def check_topic(topic: bytes) -> bytes:
    """A publisher's topic, refused when its subscribers' subscription frames would be over the bound."""
    if len(topic) > MAX_TOPIC_BYTES:
        raise ValueError(f"topic {topic[:40]!r}... is {len(topic)} bytes; the event plane allows {MAX_TOPIC_BYTES}")
    return topic


@dataclass
class BoundPub:
    """A bound PUB socket and what subscribers need to reach it."""

    sock: zmq.Socket  # type: ignore[type-arg]
    #: ``tcp://host:port``; Consul Meta ``zmq_endpoint``
    endpoint: str
    #: Z85 CURVE public key ("" when plain); Consul Meta ``zmq_public_key``
    public_key: str
    _zap_domain: str | None = None

    def meta(self) -> dict[str, str]:
        """The Consul Meta entries subscribers need: ``zmq_endpoint`` and, with CURVE, ``zmq_public_key``."""
        meta = {ZMQ_ENDPOINT_META: self.endpoint}
        if self.public_key:
            meta[ZMQ_PUBLIC_KEY_META] = self.public_key
        return meta

    def close(self) -> None:
        self.sock.close(linger=0)
        if self._zap_domain is not None:
            forget_server(self.sock, self._zap_domain)


def bind_pub(
    ctx: zmq.Context,  # type: ignore[type-arg]
    bind_host: str,
    port: int = 0,
    curve: CurveConfig | None = None,
    sndhwm: int = DEFAULT_SNDHWM,
) -> BoundPub:
    """A bounded PUB on ``bind_host:port`` (0: any free port), a CURVE server when ``curve`` is set."""
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    sock.setsockopt(zmq.RCVHWM, PUB_RCVHWM)
    sock.setsockopt(zmq.MAXMSGSIZE, PUB_MAX_INBOUND_BYTES)
    domain = None
    try:
        if curve is not None:
            domain = make_server(sock, curve)
        if port == 0:
            port = sock.bind_to_random_port(f"tcp://{bind_host}")
        else:
            sock.bind(f"tcp://{bind_host}:{port}")
    except BaseException:
        sock.close(linger=0)
        if domain is not None:
            forget_server(sock, domain)
        raise
    key = curve.public_key.decode() if curve is not None else ""
    return BoundPub(sock, f"tcp://{bind_host}:{port}", key, domain)


def open_sub(ctx: zmq.Context[_Sock], topics: Iterable[bytes], rcvhwm: int = DEFAULT_SUB_RCVHWM) -> _Sock:
    """A SUB on ``topics`` that drops any peer sending a frame over :data:`MAX_EVENT_FRAME_BYTES`."""
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, rcvhwm)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_EVENT_FRAME_BYTES)
    for t in topics:
        sock.setsockopt(zmq.SUBSCRIBE, check_topic(t))
    return sock


def connect_sub(
    sock: zmq.Socket,  # type: ignore[type-arg]
    endpoint: str,
    curve: CurveConfig | None,
    server_key: str,
) -> None:
    """Connect to a publisher; CurveError when its advertised key and our CURVE setting disagree.

    Both ways a handshake would fail forever (and the subscriber would wait for nothing), so we
    refuse up front with a message naming the flag.
    """
    if curve is None:
        if server_key:
            raise CurveError(f"{endpoint} requires ZeroMQ CURVE (it advertises a key); set --zmq-curve-secret-key")
    else:
        if not server_key:
            raise CurveError(f"{endpoint} advertises no zmq_public_key but CURVE is on here; refusing a plain link")
        set_client(sock, curve, server_key)
    sock.connect(endpoint)
