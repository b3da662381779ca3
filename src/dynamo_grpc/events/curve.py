"""ZeroMQ CURVE for the event plane: key files, the allow-list, the ZAP handler, and the flags.

CURVE is off unless the process is given its own key pair (``--zmq-curve-secret-key`` /
``DYN_ZMQ_CURVE_SECRET_KEY``). With it, every socket the process binds (a worker's KV event PUB,
a router replica's active-sequence PUB) is a CURVE server that admits only the subscriber public
keys of the allow-list (``--zmq-curve-allow`` / ``DYN_ZMQ_CURVE_ALLOW``), checked by a ZAP handler;
every socket it connects authenticates with its key pair and checks the publisher's public key,
which publishers advertise in Consul Meta under :data:`ZMQ_PUBLIC_KEY_META`.

Generate a key pair: ``python -m dynamo_grpc.events.curve gen DIR [--name NAME]``.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

#: Consul service Meta key of a publisher's endpoint (``tcp://host:port``)
ZMQ_ENDPOINT_META = "zmq_endpoint"
#: Consul service Meta key of a publisher's CURVE public key (Z85); absent for a plain publisher
ZMQ_PUBLIC_KEY_META = "zmq_public_key"
ENV_SECRET_KEY = "DYN_ZMQ_CURVE_SECRET_KEY"
ENV_ALLOW = "DYN_ZMQ_CURVE_ALLOW"
_Z85_KEY_LEN = 40
_LOGGED_REFUSALS = 100


class CurveError(ValueError):
    """Unusable CURVE key material or settings (a start-up error naming the flag)."""


def _is_z85_key(text: str) -> bool:
    if len(text) != _Z85_KEY_LEN:
        return False
    try:
        return len(zmq.utils.z85.decode(text.encode())) == 32
    except (ValueError, KeyError):
        return False


def generate_keypair(directory: str | os.PathLike[str], name: str = "dynamo") -> tuple[Path, Path]:
    """Write ``NAME.key`` (public, for allow-lists) and ``NAME.key_secret`` (for the process) in DIR."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(d, name)
    os.chmod(secret_file, 0o600)
    return Path(public_file), Path(secret_file)


def load_keypair(source: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 from a ``zmq.auth`` secret cert file, a file holding a Z85 secret, or a Z85 secret."""
    path = Path(source)
    if path.is_file():
        text = path.read_text().strip()
        if _is_z85_key(text):
            secret = text.encode()
            return zmq.curve_public(secret), secret
        try:
            public, maybe_secret = zmq.auth.load_certificate(path)
        except (ValueError, OSError) as exc:
            raise CurveError(f"--zmq-curve-secret-key {source}: not a CURVE certificate: {exc}") from exc
        if not maybe_secret:
            raise CurveError(f"--zmq-curve-secret-key {source}: holds no secret-key (a public .key file?)")
        return public, maybe_secret
    if _is_z85_key(source):
        secret = source.encode()
        return zmq.curve_public(secret), secret
    raise CurveError(f"--zmq-curve-secret-key {source!r}: neither a readable file nor a Z85 secret key")


def _public_keys_in_file(path: Path) -> set[bytes]:
    """A cert file's public key, or a file of Z85 public keys: the first word of each line (``#`` comments).

    ``#`` is a Z85 character, so a comment is a line (or a text after the key) whose first word is no key.
    """
    words = [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]
    keys = [w for w in words if _is_z85_key(w)]
    if keys and all(_is_z85_key(w) or w.startswith("#") for w in words):
        return {k.encode() for k in keys}
    try:
        public, _secret = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as exc:
        raise CurveError(f"--zmq-curve-allow {path}: neither Z85 keys one a line nor a certificate: {exc}") from exc
    return {public}


def load_allowed(source: str) -> frozenset[bytes]:
    """Allowed client public keys (Z85) from a directory of cert files (``*.key``) or one file."""
    path = Path(source)
    if path.is_dir():
        keys: set[bytes] = set()
        for f in sorted(path.iterdir()):
            if f.is_file() and f.suffix == ".key":
                keys |= _public_keys_in_file(f)
    elif path.is_file():
        keys = _public_keys_in_file(path)
    else:
        raise CurveError(f"--zmq-curve-allow {source!r}: no such file or directory")
    if not keys:
        raise CurveError(f"--zmq-curve-allow {source!r}: no public keys found (want *.key files or Z85 lines)")
    return frozenset(keys)


@dataclass(frozen=True)
class CurveConfig:
    """This process's CURVE key pair and who may subscribe to its sockets. ``None`` anywhere means plain."""

    public_key: bytes
    secret_key: bytes
    #: Z85 public keys allowed to connect to sockets we bind; None: this process may not bind a CURVE socket
    allowed: frozenset[bytes] | None = None

    @classmethod
    def load(cls, secret_key: str | None, allow: str | None) -> CurveConfig | None:
        """From the flag/env values; None when neither is set (CURVE off)."""
        if not secret_key:
            if allow:
                raise CurveError("--zmq-curve-allow needs --zmq-curve-secret-key (this process's own key pair)")
            return None
        public, secret = load_keypair(secret_key)
        return cls(public, secret, load_allowed(allow) if allow else None)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CurveConfig | None:
        """From the namespace :func:`add_curve_flags` defined."""
        return cls.load(args.zmq_curve_secret_key, args.zmq_curve_allow)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> CurveConfig | None:
        e = os.environ if env is None else env
        return cls.load(e.get(ENV_SECRET_KEY) or None, e.get(ENV_ALLOW) or None)


def add_curve_flags(parser: argparse.ArgumentParser) -> None:
    """``--zmq-curve-secret-key`` and ``--zmq-curve-allow`` (defaults from DYN_ZMQ_CURVE_*)."""
    g = parser.add_argument_group("event plane security (ZeroMQ CURVE; off unless a key is given)")
    g.add_argument(
        "--zmq-curve-secret-key",
        default=os.environ.get(ENV_SECRET_KEY) or None,
        metavar="FILE",
        help=f"this process's CURVE key pair: a zmq cert .key_secret file or a Z85 secret [${ENV_SECRET_KEY}]",
    )
    g.add_argument(
        "--zmq-curve-allow",
        default=os.environ.get(ENV_ALLOW) or None,
        metavar="DIR|FILE",
        help=f"public keys allowed to subscribe to our ZMQ sockets: a directory of .key files or a file [${ENV_ALLOW}]",
    )


def public_key_from_meta(meta: Mapping[str, str]) -> str:
    """The publisher key a Consul instance advertises ("" for a plain publisher)."""
    return meta.get(ZMQ_PUBLIC_KEY_META, "")


# ---- ZAP: one authenticator thread per libzmq context, one domain per bound socket ----------


class _AllowList:
    """A ZAP credentials provider: admits the Z85 keys of one socket's allow-list.

    A refused peer reconnects every 100 ms, so each refused key is logged once (the first
    :data:`_LOGGED_REFUSALS` keys), and all refusals are counted.
    """

    def __init__(self, allowed: frozenset[bytes]) -> None:
        self.allowed = allowed
        self.refused = 0
        self._logged: set[bytes] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed:
            return True
        self.refused += 1
        if key not in self._logged and len(self._logged) < _LOGGED_REFUSALS:
            self._logged.add(key)
            log.warning("ZMQ CURVE: refused client key %s on %s (not in --zmq-curve-allow)", key.decode(), domain)
        return False


_auth_lock = threading.Lock()
_authenticators: dict[int, ThreadAuthenticator] = {}
_domains = itertools.count(1)


def _authenticator(ctx: zmq.Context) -> ThreadAuthenticator:  # type: ignore[type-arg]
    with _auth_lock:
        auth = _authenticators.get(ctx.underlying)
        if auth is None:
            auth = ThreadAuthenticator(ctx, log=logging.getLogger("dynamo_grpc.events.zap"))
            auth.start()
            _authenticators[ctx.underlying] = auth
        return auth


def make_server(sock: zmq.Socket, curve: CurveConfig) -> str:  # type: ignore[type-arg]
    """Make ``sock`` (before bind) a CURVE server admitting ``curve.allowed``; returns its ZAP domain."""
    if curve.allowed is None:
        raise CurveError("CURVE is on (--zmq-curve-secret-key) but --zmq-curve-allow is unset: nobody could connect")
    domain = f"dynamo-{os.getpid()}-{next(_domains)}"
    _authenticator(sock.context).configure_curve_callback(domain, _AllowList(curve.allowed))
    sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret_key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public_key)
    return domain


def forget_server(sock: zmq.Socket, domain: str) -> None:  # type: ignore[type-arg]
    """Drop a closed socket's ZAP domain."""
    with _auth_lock:
        auth = _authenticators.get(sock.context.underlying)
    if auth is not None:
        auth.credentials_providers.pop(domain, None)


def set_client(sock: zmq.Socket, curve: CurveConfig, server_key: str) -> None:  # type: ignore[type-arg]
    """Before each connect: authenticate as ``curve`` to the publisher whose public key is ``server_key``."""
    if not _is_z85_key(server_key):
        raise CurveError(f"publisher key {server_key!r} is not a Z85 CURVE public key")
    sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret_key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public_key)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_key.encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynamo_grpc.events.curve", description="ZeroMQ CURVE key tools.")
    sub = p.add_subparsers(dest="cmd", required=True)
    gen = sub.add_parser("gen", help="write NAME.key (public) and NAME.key_secret (0600) into DIR")
    gen.add_argument("dir")
    gen.add_argument("--name", default="dynamo")
    args = p.parse_args(argv)
    public_file, secret_file = generate_keypair(args.dir, args.name)
    public, _ = zmq.auth.load_certificate(public_file)
    print(f"public  {public_file}  {public.decode()}")
    print(f"secret  {secret_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
