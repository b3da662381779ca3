"""What a reader of the discovery plane accepts: bounded worker registrations and sealed model cards.

Consul ACLs keep anonymous writers out; this is the defence behind them. A registration whose Meta is
out of bounds (``dp_size=2000000`` would make the router allocate per rank) or unparseable is skipped
with one log line naming the instance and the field. A model card carries a sha256 of its content
(``checksum``) and the KV entry's ``Session`` must be the one the worker names in its service Meta
(``card_session``): Consul's locks are advisory, so a plain PUT that replaced a card is ignored here.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

#: Meta the worker writes; the limits a reader enforces (Consul's own: 64 keys, 128-char keys, 512-char values)
MAX_META_KEYS = 64
MAX_META_KEY_LEN = 128
MAX_META_VALUE_LEN = 512
MAX_ID_LEN = 256
MAX_DP_SIZE = 1024
MAX_BLOCK_SIZE = 4096
MAX_KV_BLOCKS = 1 << 31
#: the card's own hash, and the KV entry's session as ``_parse_cards`` hands it to readers
CHECKSUM_KEY = "checksum"
SESSION_KEY = "_kv_session"
#: the worker's service Meta entry naming the session that holds its cards
CARD_SESSION_META = "card_session"

_INT_RANGES = {"dp_size": (1, MAX_DP_SIZE), "block_size": (1, MAX_BLOCK_SIZE), "kv_blocks": (0, MAX_KV_BLOCKS)}


class InvalidRegistration(ValueError):
    """A registration a reader refuses; ``field`` names the offending entry."""

    def __init__(self, instance_id: str, field: str, why: str) -> None:
        super().__init__(f"registration {instance_id!r} skipped: {field}: {why}")
        self.instance_id = instance_id
        self.field = field


def parse_host_port(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` with a port in 1..65535; raises ValueError naming what is wrong."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not host:port")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{value!r}: unbalanced brackets")
        ipaddress.IPv6Address(host[1:-1])
        host = host[1:-1]
    elif not all(c.isalnum() or c in ".-_" for c in host):
        raise ValueError(f"{value!r}: host has characters a hostname cannot")
    if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise ValueError(f"{value!r}: port must be 1..65535")
    return host, int(port_s)


def _check_endpoint(value: str) -> None:
    if value.startswith("tcp://"):
        parse_host_port(value[len("tcp://") :])
    elif not value.startswith(("ipc://", "inproc://")):
        raise ValueError(f"{value!r} is not a tcp://, ipc:// or inproc:// endpoint")


def check_registration(instance_id: str, port: int, meta: Mapping[str, str]) -> None:
    """Raise InvalidRegistration unless a ``dynamo-worker`` registration is within bounds."""

    def bad(field: str, why: str) -> InvalidRegistration:
        return InvalidRegistration(instance_id[:MAX_ID_LEN], field, why)

    if not instance_id or len(instance_id) > MAX_ID_LEN or "/" in instance_id:
        raise bad("ID", f"must be 1..{MAX_ID_LEN} characters without '/'")
    if not 0 <= port <= 65535:
        raise bad("Port", f"{port} is not 0..65535")
    if len(meta) > MAX_META_KEYS:
        raise bad("Meta", f"{len(meta)} keys (at most {MAX_META_KEYS})")
    for k, v in meta.items():
        if len(k) > MAX_META_KEY_LEN or len(v) > MAX_META_VALUE_LEN:
            raise bad(f"Meta[{k[:40]}]", f"key ≤ {MAX_META_KEY_LEN} and value ≤ {MAX_META_VALUE_LEN} characters")
    for key, (lo, hi) in _INT_RANGES.items():
        if key in meta:
            try:
                n = int(meta[key])
            except ValueError:
                raise bad(key, f"{meta[key]!r} is not an integer") from None
            if not lo <= n <= hi:
                raise bad(key, f"{n} is outside {lo}..{hi}")
    try:
        if meta.get("grpc_address"):
            parse_host_port(meta["grpc_address"])
        elif not port:
            raise ValueError("no grpc_address and no port")
    except ValueError as e:
        raise bad("grpc_address", str(e)) from None
    if meta.get("zmq_endpoint"):
        try:
            _check_endpoint(meta["zmq_endpoint"])
        except ValueError as e:
            raise bad("zmq_endpoint", str(e)) from None


class RegistrationFilter:
    """Drops invalid registrations from a snapshot; ``reasons`` says why for each (the caller logs them
    through its WorkerView, once per distinct reason)."""

    def __init__(self) -> None:
        self.reasons: dict[str, str] = {}
        #: registrations skipped, counted once per (instance, reason)
        self.skipped_total = 0

    def valid(self, instances: list[Any]) -> list[Any]:
        out, reasons = [], {}
        for inst in instances:
            try:
                check_registration(str(inst.instance_id), int(inst.port), inst.meta or {})
            except InvalidRegistration as e:
                reasons[inst.instance_id] = str(e)
                if self.reasons.get(inst.instance_id) != str(e):
                    self.skipped_total += 1
                continue
            out.append(inst)
        self.reasons = reasons
        return out


# -- model cards ---------------------------------------------------------------------------------


def card_checksum(card: Mapping[str, Any]) -> str:
    """sha256 of the card's canonical JSON, without the checksum and the reader's session entry."""
    body = {k: v for k, v in card.items() if k not in (CHECKSUM_KEY, SESSION_KEY)}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal_card(card: Mapping[str, Any]) -> dict[str, Any]:
    """The card with its ``checksum``, as a worker publishes it."""
    out = {k: v for k, v in card.items() if k not in (CHECKSUM_KEY, SESSION_KEY)}
    out[CHECKSUM_KEY] = card_checksum(out)
    return out


def card_problem(card: Mapping[str, Any], meta: Mapping[str, str] | None) -> str | None:
    """Why a card read from KV is not to be trusted for the instance with ``meta`` (None: it is).

    ``meta`` None checks the checksum only (the instance is not known yet)."""
    if card.get(CHECKSUM_KEY) != card_checksum(card):
        return "checksum does not match its content"
    if meta is not None:
        want = meta.get(CARD_SESSION_META, "")
        if not want:
            return f"the registration names no {CARD_SESSION_META}"
        if card.get(SESSION_KEY) != want:
            return f"KV entry not held by the registration's session {want}"
    return None
