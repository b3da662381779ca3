"""consul-dev's state: one node's catalog, TTL checks, KV store and sessions, with Consul's index rules.

Every write that changes what a reader can see takes the next Raft-like index. Readers get per-resource
indexes the way Consul computes them (a per-service index for health queries, the newest entry or
tombstone under a KV prefix), so a blocking query only wakes for changes that concern it. The module has
no HTTP in it: ``http_api`` adapts requests to these methods and formats the results.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PASSING, WARNING, CRITICAL = "passing", "warning", "critical"
STATUSES = (PASSING, WARNING, CRITICAL)
SERF_CHECK = "serfHealth"
MAX_CHECK_OUTPUT = 4096
KV_MAX_VALUE_SIZE = 512 * 1024
META_MAX_PAIRS, META_KEY_MAX, META_VALUE_MAX = 64, 128, 512
DEREGISTER_MIN = 60.0  # Consul's check_deregister_interval_min
REAP_INTERVAL = 30.0  # Consul's check_reap_interval
CHECK_UPDATE_INTERVAL = 300.0  # output-only changes are synced this often
SESSION_TTL_MIN, SESSION_TTL_MAX = 10.0, 86400.0
SESSION_TTL_MULTIPLIER = 2.0  # Consul invalidates a TTL session only after 2x its TTL
MAX_LOCK_DELAY = 60.0
_META_KEY_RE = re.compile(r"^[a-zA-Z0-9_-]+$")


class ConsulError(Exception):
    """An error with the HTTP status and plain-text message a real Consul agent answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def validate_meta(meta: dict[str, str]) -> None:
    """Consul's metadata limits: 64 pairs, keys [a-zA-Z0-9_-]{1,128} not starting with consul-,
    values of at most 512 characters."""
    if len(meta) > META_MAX_PAIRS:
        raise ValueError(f"Node metadata cannot contain more than {META_MAX_PAIRS} key/value pairs")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise ValueError(f"Couldn't load metadata pair ('{key}', {value!r}): Value must be a string")
        err = None
        if key == "":
            err = "Key cannot be blank"
        elif not _META_KEY_RE.match(key):
            err = "Key contains invalid characters"
        elif len(key) > META_KEY_MAX:
            err = f"Key is too long (limit: {META_KEY_MAX} characters)"
        elif key.startswith("consul-"):
            err = "Key prefix 'consul-' is reserved for internal use"
        elif len(value) > META_VALUE_MAX:
            err = f"Value is too long (limit: {META_VALUE_MAX} characters)"
        if err:
            raise ValueError(f"Couldn't load metadata pair ('{key}', '{value}'): {err}")


def truncate_output(output: str) -> str:
    """Consul keeps at most 4 KiB of check output and says how much it dropped."""
    raw = output.encode()
    if len(raw) <= MAX_CHECK_OUTPUT:
        return output
    kept = raw[:MAX_CHECK_OUTPUT].decode(errors="ignore")
    return f"{kept}\n...\nCaptured {MAX_CHECK_OUTPUT} of {len(raw)} bytes"


@dataclass
class Service:
    id: str
    name: str
    tags: list[str]
    address: str
    port: int
    meta: dict[str, str]
    weights: dict[str, int]
    enable_tag_override: bool
    create_index: int = 0
    modify_index: int = 0
    agent_owned: bool = True

    def same_as(self, other: Service) -> bool:
        return (
            self.name,
            self.tags,
            self.address,
            self.port,
            self.meta,
            self.weights,
            self.enable_tag_override,
        ) == (
            other.name,
            other.tags,
            other.address,
            other.port,
            other.meta,
            other.weights,
            other.enable_tag_override,
        )


@dataclass
class Check:
    id: str
    name: str
    service_id: str
    service_name: str
    status: str
    output: str
    notes: str
    ttl: float | None
    deregister_after: float | None  # already clamped to the minimum and time-scaled
    definition: dict[str, Any]
    create_index: int = 0
    modify_index: int = 0
    local_output: str = ""
    synced_at: float = 0.0
    critical_since: float | None = None
    timer: asyncio.TimerHandle | None = None


@dataclass
class KVEntry:
    key: str
    value: bytes | None
    flags: int
    lock_index: int
    session: str
    create_index: int
    modify_index: int


@dataclass
class Session:
    id: str
    name: str
    node: str
    node_checks: list[str]
    service_checks: list[str]
    behavior: str
    ttl: str
    lock_delay: float
    create_index: int
    modify_index: int
    timer: asyncio.TimerHandle | None = None

    @property
    def checks(self) -> list[str]:
        return self.node_checks + self.service_checks


@dataclass
class Store:
    """The agent's state. All methods run on the event loop thread; none of them blocks."""

    node: str = "consul-dev"
    datacenter: str = "dc1"
    address: str = "127.0.0.1"
    time_scale: float = 1.0
    node_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    index: int = 0
    catalog_index: int = 0
    kvs_index: int = 0
    sessions_index: int = 0
    svc_index: dict[str, int] = field(default_factory=dict)
    services: dict[str, Service] = field(default_factory=dict)
    checks: dict[str, Check] = field(default_factory=dict)
    kv: dict[str, KVEntry] = field(default_factory=dict)
    tombstones: dict[str, int] = field(default_factory=dict)
    sessions: dict[str, Session] = field(default_factory=dict)
    lock_delays: dict[str, float] = field(default_factory=dict)
    writes: int = 0
    ttl_updates: int = 0
    #: time.monotonic() of the last write, for the agent's answer trace (trace.py)
    committed_at: float = 0.0

    def __post_init__(self) -> None:
        self._changed = asyncio.Event()
        self._reaper: asyncio.Task[None] | None = None
        # The node and its serfHealth check, and the "consul" service every dev agent registers.
        idx = self._commit()
        self.node_index = idx
        self.checks[SERF_CHECK] = Check(
            id=SERF_CHECK,
            name="Serf Health Status",
            service_id="",
            service_name="",
            status=PASSING,
            output="Agent alive and reachable",
            notes="",
            ttl=None,
            deregister_after=None,
            definition={},
            create_index=idx,
            modify_index=idx,
        )
        self.services["consul"] = Service(
            id="consul",
            name="consul",
            tags=[],
            address="",
            port=8300,
            meta={},
            weights={"Passing": 1, "Warning": 1},
            enable_tag_override=False,
            create_index=idx,
            modify_index=idx,
            agent_owned=False,
        )
        self.catalog_index = self.svc_index["consul"] = idx

    # -- index bookkeeping -------------------------------------------------------------------------------

    def _commit(self) -> int:
        """Take the next index and wake every blocked reader so it can re-check its own index."""
        self.index += 1
        self.writes += 1
        self.committed_at = time.monotonic()
        self._changed.set()
        self._changed = asyncio.Event()
        return self.index

    def _touch_service(self, name: str, idx: int) -> None:
        self.svc_index[name] = idx
        self.catalog_index = idx

    async def block(self, current: Callable[[], int], min_index: int, wait: float) -> None:
        """Consul's blocking rule: return once the resource's index differs from ``min_index`` or after
        ``wait``. An index above the current one (the agent restarted) returns at once so the client
        sees the lower index and resets."""
        if min_index <= 0 or current() != min_index:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while current() == min_index:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            changed = self._changed
            try:
                # asyncio.timeout, not wait_for: no task per wake-up (a change wakes every blocked reader)
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                return

    async def next_commit(self) -> None:
        """Return after the next write (any resource): what a per-query watch re-checks on (query_watch.py)."""
        await self._changed.wait()

    def service_index(self, name: str) -> int:
        return max(1, self.svc_index.get(name, self.catalog_index))

    def prefix_index(self, prefix: str) -> int:
        idx = 0
        for key, entry in self.kv.items():
            if key.startswith(prefix) and entry.modify_index > idx:
                idx = entry.modify_index
        for key, tomb in self.tombstones.items():
            if key.startswith(prefix) and tomb > idx:
                idx = tomb
        return max(1, idx or self.kvs_index)

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._reaper = asyncio.get_running_loop().create_task(self._reap_loop())

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for chk in self.checks.values():
            if chk.timer:
                chk.timer.cancel()
        for sess in self.sessions.values():
            if sess.timer:
                sess.timer.cancel()

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL * self.time_scale)
            self.reap()

    def reap(self) -> list[str]:
        """Deregister services whose check has been critical for its DeregisterCriticalServiceAfter."""
        now = time.monotonic()
        doomed = []
        for chk in self.checks.values():
            if (
                chk.deregister_after is not None
                and chk.critical_since is not None
                and now - chk.critical_since >= chk.deregister_after
                and chk.service_id in self.services
            ):
                doomed.append(chk.service_id)
        for sid in dict.fromkeys(doomed):
            self.deregister_service(sid)
        return doomed

    # -- services and checks -----------------------------------------------------------------------------

    def register_service(self, svc: Service, checks: list[Check], replace_existing_checks: bool) -> None:
        """Add or replace a service; checks keep their status across re-registration like Consul's."""
        old = self.services.get(svc.id)
        if old is not None and not old.agent_owned:
            raise ConsulError(400, f'Service ID "{svc.id}" is reserved')
        prev_checks = {c.id: c for c in self.checks.values() if c.service_id == svc.id}
        new_ids = {c.id for c in checks}
        for chk in checks:
            other = self.checks.get(chk.id)
            if other is not None and other.service_id != svc.id:
                raise ConsulError(400, f'Check ID "{chk.id}" is already registered for another service')
        changed = old is None or not old.same_as(svc)
        removed = [cid for cid in prev_checks if cid not in new_ids] if replace_existing_checks else []
        now = time.monotonic()
        added: set[str] = set()
        redefined: set[str] = set()
        for chk in checks:
            prev = prev_checks.get(chk.id)
            if prev is not None:
                # Restore the previous state, as Consul does from its check snapshot.
                chk.status, chk.output, chk.local_output = prev.status, prev.output, prev.local_output
                chk.critical_since, chk.create_index = prev.critical_since, prev.create_index
                chk.modify_index, chk.synced_at = prev.modify_index, prev.synced_at
                if prev.timer:
                    prev.timer.cancel()
                if (prev.name, prev.ttl, prev.deregister_after, prev.notes) != (
                    chk.name,
                    chk.ttl,
                    chk.deregister_after,
                    chk.notes,
                ):
                    changed = True
                    redefined.add(chk.id)
            else:
                chk.critical_since = now if chk.status == CRITICAL else None
                chk.synced_at = now
                added.add(chk.id)
                changed = True
        if removed:
            changed = True
        if not changed:
            for chk in checks:
                self.checks[chk.id] = chk
                self._arm_ttl(chk)
            return
        idx = self._commit()
        svc.create_index = old.create_index if old else idx
        svc.modify_index = idx if (old is None or not old.same_as(svc)) else old.modify_index
        if old is not None and old.name != svc.name:
            self._touch_service(old.name, idx)
        self.services[svc.id] = svc
        for chk in checks:
            chk.service_name = svc.name
            if chk.id in added:
                chk.create_index = chk.modify_index = idx
            elif chk.id in redefined:
                chk.modify_index = idx
            self.checks[chk.id] = chk
            self._arm_ttl(chk)
        for cid in removed:
            self._drop_check(cid, idx)
        self._touch_service(svc.name, idx)

    def deregister_service(self, service_id: str) -> None:
        svc = self.services.get(service_id)
        if svc is None or not svc.agent_owned:
            raise ConsulError(
                404,
                f'Unknown service ID "{service_id}". '
                "Ensure that the service ID is passed, not the service name.",
            )
        idx = self._commit()
        del self.services[service_id]
        for cid in [c.id for c in self.checks.values() if c.service_id == service_id]:
            self._drop_check(cid, idx)
        self._touch_service(svc.name, idx)

    def _drop_check(self, check_id: str, idx: int) -> None:
        chk = self.checks.pop(check_id)
        if chk.timer:
            chk.timer.cancel()
        self._invalidate_sessions_for(check_id, idx)

    def _arm_ttl(self, chk: Check) -> None:
        if chk.timer:
            chk.timer.cancel()
            chk.timer = None
        if chk.ttl is not None:
            chk.timer = asyncio.get_running_loop().call_later(chk.ttl, self._ttl_expired, chk.id)

    def _ttl_expired(self, check_id: str) -> None:
        chk = self.checks.get(check_id)
        if chk is None:
            return
        chk.timer = None
        last = chk.local_output
        out = f"TTL expired (last output before timeout follows): {last}" if last else "TTL expired"
        self._set_status(chk, CRITICAL, out)

    def update_ttl_check(self, check_id: str, status: str, output: str) -> None:
        """A TTL heartbeat (pass/warn/fail/update): restart the TTL timer and record the status."""
        chk = self.checks.get(check_id)
        if chk is None:
            raise ConsulError(
                404, f'Unknown check ID "{check_id}". Ensure that the check ID is passed, not the check name.'
            )
        if chk.ttl is None:
            raise ConsulError(500, f'CheckID "{check_id}" does not have associated TTL')
        self.ttl_updates += 1
        self._arm_ttl(chk)
        self._set_status(chk, status, truncate_output(output))

    def _set_status(self, chk: Check, status: str, output: str) -> None:
        now = time.monotonic()
        chk.local_output = output
        if status == chk.status and (
            output == chk.output or now - chk.synced_at < CHECK_UPDATE_INTERVAL * self.time_scale
        ):
            return  # nothing a reader can see changed: no write, no index, no wake-ups
        if status != chk.status:
            chk.critical_since = now if status == CRITICAL else None
        idx = self._commit()
        chk.status, chk.output, chk.modify_index, chk.synced_at = status, output, idx, now
        if chk.service_id:
            self._touch_service(chk.service_name, idx)
        if status == CRITICAL:
            self._invalidate_sessions_for(chk.id, idx)

    # -- reads -------------------------------------------------------------------------------------------

    def service_entries(self, name: str) -> list[tuple[Service, list[Check]]]:
        """Each instance of ``name`` with the node's checks and its own; one pass over the checks."""
        by_service: dict[str, list[Check]] = {}
        for chk in self.checks.values():
            by_service.setdefault(chk.service_id, []).append(chk)
        node_checks = by_service.get("", [])
        out = []
        for svc in sorted((s for s in self.services.values() if s.name == name), key=lambda s: s.id):
            own = sorted(by_service.get(svc.id, []), key=lambda c: c.id)
            out.append((svc, node_checks + own))
        return out

    # -- sessions ----------------------------------------------------------------------------------------

    def create_session(
        self,
        *,
        name: str,
        node: str,
        node_checks: list[str],
        service_checks: list[str],
        behavior: str,
        ttl: str,
        ttl_seconds: float,
        lock_delay: float,
    ) -> Session:
        if node != self.node:
            raise ConsulError(500, f"Missing node registration: {node}")
        for cid in node_checks + service_checks:
            chk = self.checks.get(cid)
            if chk is None:
                raise ConsulError(500, f"Missing check '{cid}' registration")
            if chk.status == CRITICAL:
                raise ConsulError(500, f"Check '{cid}' is in critical state")
        idx = self._commit()
        sess = Session(
            id=str(uuid.uuid4()),
            name=name,
            node=node,
            node_checks=node_checks,
            service_checks=service_checks,
            behavior=behavior,
            ttl=ttl,
            lock_delay=lock_delay,
            create_index=idx,
            modify_index=idx,
        )
        self.sessions[sess.id] = sess
        self.sessions_index = idx
        self._arm_session(sess, ttl_seconds)
        return sess

    def _arm_session(self, sess: Session, ttl_seconds: float) -> None:
        if sess.timer:
            sess.timer.cancel()
            sess.timer = None
        if ttl_seconds > 0:
            delay = ttl_seconds * SESSION_TTL_MULTIPLIER * self.time_scale
            sess.timer = asyncio.get_running_loop().call_later(delay, self._session_expired, sess.id)

    def _session_expired(self, session_id: str) -> None:
        if session_id in self.sessions:
            self.sessions[session_id].timer = None
            self.destroy_session(session_id)

    def renew_session(self, session_id: str, ttl_seconds: float) -> Session:
        sess = self.sessions.get(session_id)
        if sess is None:
            raise ConsulError(404, f"Session id '{session_id}' not found")
        self._arm_session(sess, ttl_seconds)
        return sess

    def destroy_session(self, session_id: str) -> None:
        """Destroy (or invalidate) a session: its locks are released or its keys deleted per Behavior."""
        if session_id not in self.sessions:
            return
        self._invalidate(session_id, self._commit())

    def _invalidate_sessions_for(self, check_id: str, idx: int) -> None:
        for sid in [s.id for s in self.sessions.values() if check_id in s.checks]:
            self._invalidate(sid, idx)

    def _invalidate(self, session_id: str, idx: int) -> None:
        sess = self.sessions.pop(session_id)
        if sess.timer:
            sess.timer.cancel()
        self.sessions_index = idx
        held = [e for e in self.kv.values() if e.session == session_id]
        for entry in held:
            if sess.behavior == "delete":
                self._kv_delete_key(entry.key, idx)
            else:
                entry.session = ""
                entry.modify_index = idx
                self.kvs_index = idx
            if sess.lock_delay > 0:
                self.lock_delays[entry.key] = time.monotonic() + sess.lock_delay * self.time_scale

    # -- KV ----------------------------------------------------------------------------------------------

    def kv_put(
        self, key: str, value: bytes, *, flags: int, cas: int | None, acquire: str | None, release: str | None
    ) -> bool:
        """Consul's KVS.Apply for set/cas/lock/unlock; the last of cas, acquire, release given wins."""
        existing = self.kv.get(key)
        if release is not None:
            if existing is None or existing.session != release:
                return False
            idx = self._commit()
            self._kv_write(key, value, flags, existing.lock_index, "", existing.create_index, idx)
            return True
        if acquire is not None:
            if acquire not in self.sessions:
                raise ConsulError(500, f'invalid session "{acquire}"')
            until = self.lock_delays.get(key)
            if until is not None:
                if time.monotonic() < until:
                    return False
                del self.lock_delays[key]
            if existing is not None and existing.session not in ("", acquire):
                return False
            idx = self._commit()
            if existing is None:
                self._kv_write(key, value, flags, 1, acquire, idx, idx)
            elif existing.session == acquire:
                self._kv_write(key, value, flags, existing.lock_index, acquire, existing.create_index, idx)
            else:
                self._kv_write(
                    key, value, flags, existing.lock_index + 1, acquire, existing.create_index, idx
                )
            return True
        if cas is not None:
            if cas == 0 and existing is not None:
                return False
            if cas != 0 and (existing is None or existing.modify_index != cas):
                return False
        idx = self._commit()
        if existing is None:
            self._kv_write(key, value, flags, 0, "", idx, idx)
        else:
            self._kv_write(
                key, value, flags, existing.lock_index, existing.session, existing.create_index, idx
            )
        return True

    def _kv_write(
        self, key: str, value: bytes, flags: int, lock_index: int, session: str, create: int, modify: int
    ) -> None:
        self.kv[key] = KVEntry(key, value, flags, lock_index, session, create, modify)
        self.tombstones.pop(key, None)
        self.kvs_index = modify

    def _kv_delete_key(self, key: str, idx: int) -> None:
        if self.kv.pop(key, None) is not None:
            self.tombstones[key] = idx
            self.kvs_index = idx

    def kv_delete(self, key: str, *, recurse: bool, cas: int | None) -> bool:
        if recurse:
            doomed = [k for k in self.kv if k.startswith(key)]
            if not doomed:
                return True
            idx = self._commit()
            for k in doomed:
                self._kv_delete_key(k, idx)
            return True
        existing = self.kv.get(key)
        if cas is not None and (existing is None or existing.modify_index != cas):
            return existing is None
        if existing is None:
            return True
        self._kv_delete_key(key, self._commit())
        return True

    def kv_list(self, prefix: str) -> list[KVEntry]:
        return [self.kv[k] for k in sorted(self.kv) if k.startswith(prefix)]
