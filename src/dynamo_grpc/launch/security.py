"""Throwaway TLS and CURVE material for a mesh on one machine (``run-local --tls/--curve``, tests).

Everything reaches the children as environment variables (the ``DYN_TLS_*`` and ``DYN_ZMQ_CURVE_*``
families every role reads), so the mesh's command lines stay the same with security on or off.

CURVE: one key pair per role (worker, router, frontend). Publishers (workers' KV events, routers'
active-sequence sync) admit only the subscribers' public keys (routers and the frontend), written to
one allow-list directory; workers never subscribe, so their key is not on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dynamo_grpc.events.curve import ENV_ALLOW, ENV_SECRET_KEY, generate_keypair
from dynamo_grpc.transport.certs import CertPaths, write_local_certs

#: roles that subscribe to event sockets: their public keys form the allow-list
SUBSCRIBERS = ("router", "frontend")
ROLES = ("worker", "router", "frontend")


@dataclass
class CurveKeys:
    """Per-role key pairs and the allow-list directory."""

    secret: dict[str, Path]
    public: dict[str, Path]
    allow_dir: Path

    def env(self, role: str) -> dict[str, str]:
        """The variables a process of ``role`` gets (a frontend binds nothing, so no allow-list)."""
        out = {ENV_SECRET_KEY: str(self.secret[role])}
        if role != "frontend":
            out[ENV_ALLOW] = str(self.allow_dir)
        return out


def make_curve_keys(directory: Path) -> CurveKeys:
    """A key pair per role under ``directory/keys`` and the subscribers' public keys under ``directory/allow``."""
    keys, allow = directory / "keys", directory / "allow"
    allow.mkdir(parents=True, exist_ok=True)
    secret: dict[str, Path] = {}
    public: dict[str, Path] = {}
    for role in ROLES:
        public[role], secret[role] = generate_keypair(keys, role)
        if role in SUBSCRIBERS:
            (allow / public[role].name).write_bytes(public[role].read_bytes())
    return CurveKeys(secret, public, allow)


@dataclass
class MeshSecurity:
    """What a secured mesh hands its children, per role, and what its own probes dial with."""

    tls: CertPaths | None = None
    curve: CurveKeys | None = None
    common_env: dict[str, str] = field(default_factory=dict)

    def env(self, role: str) -> dict[str, str]:
        out = dict(self.common_env)
        if self.tls is not None:
            out.update(self.tls.env())
        if self.curve is not None and role in ROLES:
            out.update(self.curve.env(role))
        return out


def local_security(directory: Path, tls: bool, curve: bool) -> MeshSecurity:
    """Generate what ``tls``/``curve`` ask for under ``directory`` (certs/ and curve/)."""
    return MeshSecurity(
        tls=write_local_certs(directory / "certs") if tls else None,
        curve=make_curve_keys(directory / "curve") if curve else None,
    )
