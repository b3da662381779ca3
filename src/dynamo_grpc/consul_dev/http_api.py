"""Consul's HTTP API (the subset dynamo-grpc uses) over the consul-dev ``Store``.

Payloads are decoded the way Consul decodes them (field names case-insensitive, snake_case aliases,
durations as Go strings or nanoseconds), errors carry Consul's status codes and plain-text messages, and
every read answers ``X-Consul-Index`` and honours blocking queries (``index``/``wait``).
"""

from __future__ import annotations

import base64
import gzip
import json
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from dynamo_grpc.consul_dev.acl import ACL, ALLOW_ALL, Authorizer
from dynamo_grpc.consul_dev.acl_api import ACL_KEY
from dynamo_grpc.consul_dev.acl_api import add_routes as add_acl_routes
from dynamo_grpc.consul_dev.acl_rules import Access
from dynamo_grpc.consul_dev.durations import (
    DurationError,
    format_go_duration,
    parse_duration_field,
    parse_go_duration,
)
from dynamo_grpc.consul_dev.query_watch import QueryWatches
from dynamo_grpc.consul_dev.service_rows import ServiceRows
from dynamo_grpc.consul_dev.state import (
    CRITICAL,
    DEREGISTER_MIN,
    KV_MAX_VALUE_SIZE,
    MAX_LOCK_DELAY,
    PASSING,
    SERF_CHECK,
    SESSION_TTL_MAX,
    SESSION_TTL_MIN,
    STATUSES,
    WARNING,
    Check,
    ConsulError,
    KVEntry,
    Service,
    Session,
    Store,
    validate_meta,
)
from dynamo_grpc.consul_dev.trace import AnswerTrace

DEFAULT_WAIT, MAX_WAIT = 300.0, 600.0
STORE_KEY: web.AppKey[Store] = web.AppKey("store", Store)
GZIP_MIN = 8192
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- decoding helpers ------------------------------------------------------------------------------------


def _canon(obj: Any) -> Any:
    """Consul matches JSON field names case-insensitively and accepts snake_case aliases."""
    if isinstance(obj, dict):
        return {str(k).replace("_", "").lower(): v for k, v in obj.items()}
    return obj


async def _body_json(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        if allow_empty:
            return {}
        raise ConsulError(400, "Request decode failed: EOF")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConsulError(400, f"Request decode failed: {exc}") from exc
    if not isinstance(data, dict):
        raise ConsulError(400, "Request decode failed: json: cannot unmarshal into a JSON object")
    return _canon(data)


def _typed(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConsulError(
            400, f"Request decode failed: field {key!r} has the wrong type ({type(value).__name__})"
        )
    return value


def _str_list(body: dict[str, Any], key: str) -> list[str] | None:
    value = _typed(body, key, list, None)
    if value is not None and not all(isinstance(v, str) for v in value):
        raise ConsulError(400, f"Request decode failed: field {key!r} must be a list of strings")
    return value


def _duration(body: dict[str, Any], key: str, what: str) -> float | None:
    if body.get(key) in (None, ""):
        return None
    try:
        return parse_duration_field(body[key])
    except DurationError as exc:
        raise ConsulError(400, f"Request decode failed: {what}: {exc}") from exc


def _uint_param(request: web.Request, name: str, message: str) -> int | None:
    text = request.query.get(name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise ConsulError(400, message) from None
    if value < 0 or value >= 2**64:
        raise ConsulError(400, message)
    return value


def _bool_param(request: web.Request, name: str) -> bool:
    if name not in request.query:
        return False
    text = request.query[name].lower()
    if text in ("", "1", "t", "true"):
        return True
    if text in ("0", "f", "false"):
        return False
    raise ConsulError(400, f"Invalid value for ?{name}")


def _blocking(request: web.Request) -> tuple[int, float]:
    wait = DEFAULT_WAIT
    if request.query.get("wait"):
        try:
            wait = parse_go_duration(request.query["wait"])
        except DurationError:
            raise ConsulError(400, "Invalid wait time") from None
        if wait <= 0:
            wait = DEFAULT_WAIT
    wait = min(wait, MAX_WAIT)
    wait += random.uniform(0, wait / 16)  # Consul's jitter spreads the wake-ups of many watchers
    index = _uint_param(request, "index", "Invalid index") or 0
    return index, wait


class _Encoded:
    """One encoded answer, gzipped at most once however many watchers fetch it (Consul, too, gzips
    its HTTP API answers for clients that accept it)."""

    def __init__(self, changed: int, body: bytes, index: int | None = None) -> None:
        # ``changed`` is the X-Consul-Index answered; ``index`` the store index the answer was built at.
        self.changed, self.body = changed, body
        self.index = changed if index is None else index
        self._gz: bytes | None = None

    def response(self, request: web.Request) -> web.Response:
        headers = {
            "X-Consul-Index": str(max(1, self.changed)),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
        }
        body = self.body
        if len(body) >= GZIP_MIN and "gzip" in request.headers.get("Accept-Encoding", ""):
            if self._gz is None:
                self._gz = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
            body = self._gz
        return web.Response(body=body, content_type="application/json", headers=headers)


ENTRY_CACHE_KEY: web.AppKey[dict[str, tuple[tuple[int, tuple[tuple[str, int], ...]], bytes]]] = web.AppKey(
    "entry_cache", dict
)
SERVICE_ENTRIES_KEY: web.AppKey[dict[str, ServiceRows]] = web.AppKey("service_entries", dict)
HEALTH_CACHE_KEY: web.AppKey[dict[tuple[Any, ...], _Encoded]] = web.AppKey(
    "health_cache", dict
)
QUERY_WATCHES_KEY: web.AppKey[QueryWatches] = web.AppKey("query_watches", QueryWatches)
TRACE_KEY: web.AppKey[AnswerTrace | None] = web.AppKey("answer_trace")


def _json(data: Any, index: int | None = None, status: int = 200) -> web.Response:
    headers = {}
    if index is not None:
        headers = {
            "X-Consul-Index": str(max(1, index)),
            "X-Consul-KnownLeader": "true",
            "X-Consul-LastContact": "0",
        }
    return web.Response(
        text=json.dumps(data), status=status, content_type="application/json", headers=headers
    )


# -- JSON shapes -----------------------------------------------------------------------------------------


def _node_json(store: Store) -> dict[str, Any]:
    return {
        "ID": store.node_id,
        "Node": store.node,
        "Address": store.address,
        "Datacenter": store.datacenter,
        "TaggedAddresses": {
            "lan": store.address,
            "lan_ipv4": store.address,
            "wan": store.address,
            "wan_ipv4": store.address,
        },
        "Meta": {"consul-network-segment": ""},
        "CreateIndex": store.node_index,
        "ModifyIndex": store.node_index,
    }


def _service_json(svc: Service, store: Store) -> dict[str, Any]:
    return {
        "ID": svc.id,
        "Service": svc.name,
        "Tags": list(svc.tags),
        "Address": svc.address,
        "Meta": dict(svc.meta),
        "Port": svc.port,
        "Weights": dict(svc.weights),
        "EnableTagOverride": svc.enable_tag_override,
        "Datacenter": store.datacenter,
        "CreateIndex": svc.create_index,
        "ModifyIndex": svc.modify_index,
    }


def _check_json(chk: Check, store: Store, *, local: bool = False) -> dict[str, Any]:
    svc = store.services.get(chk.service_id)
    return {
        "Node": store.node,
        "CheckID": chk.id,
        "Name": chk.name,
        "Status": chk.status,
        "Notes": chk.notes,
        "Output": chk.local_output if local else chk.output,
        "ServiceID": chk.service_id,
        "ServiceName": chk.service_name,
        "ServiceTags": list(svc.tags) if svc else [],
        "Type": "ttl" if chk.ttl is not None else "",
        "Definition": chk.definition,
        "CreateIndex": chk.create_index,
        "ModifyIndex": chk.modify_index,
    }


def _kv_json(entry: KVEntry) -> dict[str, Any]:
    out: dict[str, Any] = {
        "LockIndex": entry.lock_index,
        "Key": entry.key,
        "Flags": entry.flags,
        "Value": base64.b64encode(entry.value).decode() if entry.value else None,
        "CreateIndex": entry.create_index,
        "ModifyIndex": entry.modify_index,
    }
    if entry.session:
        out["Session"] = entry.session
    return out


def _session_json(sess: Session) -> dict[str, Any]:
    return {
        "ID": sess.id,
        "Name": sess.name,
        "Node": sess.node,
        "LockDelay": int(sess.lock_delay * 1e9),
        "Behavior": sess.behavior,
        "TTL": sess.ttl,
        "Checks": sess.checks,
        "NodeChecks": sess.node_checks,
        "ServiceChecks": [{"ID": c, "Namespace": ""} for c in sess.service_checks] or None,
        "CreateIndex": sess.create_index,
        "ModifyIndex": sess.modify_index,
    }


# -- middleware ------------------------------------------------------------------------------------------


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ConsulError as exc:
        return web.Response(status=exc.status, text=exc.message, content_type="text/plain")


@web.middleware
async def _acl(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Resolve the request's token (``?token=``, ``X-Consul-Token``, ``Authorization: Bearer``; none is
    the anonymous token) into ``request["authz"]``; each handler asks it for the permission it needs."""
    token: str = request.query.get("token") or request.headers.get("X-Consul-Token") or ""  # Consul's order
    auth = request.headers.get("Authorization", "")
    if not token and auth.lower().startswith("bearer "):
        token = auth[7:].strip()
    request["secret"] = token
    acl = request.app[ACL_KEY]
    request["authz"] = ALLOW_ALL if acl is None or request.path.startswith("/v1/status/") else acl.authorize(token)
    return await handler(request)


def _authz(request: web.Request) -> Authorizer:
    authz: Authorizer = request["authz"]
    return authz


def _require_check_write(request: web.Request, check_id: str) -> None:
    """A TTL update needs ``service:write`` on the check's service, or ``node:write`` for a node check."""
    store = request.app[STORE_KEY]
    chk = store.checks.get(check_id)
    if chk is not None and chk.service_id:
        _authz(request).require("service", Access.WRITE, chk.service_name)
    elif chk is not None:
        _authz(request).require("node", Access.WRITE, store.node)


# -- agent -----------------------------------------------------------------------------------------------


def _parse_check(raw: Any, svc: Service, position: int, count: int) -> Check:
    body = _canon(raw)
    if not isinstance(body, dict):
        raise ConsulError(400, "Request decode failed: a check must be a JSON object")
    ttl = _duration(body, "ttl", "TTL")
    interval = _duration(body, "interval", "Interval")
    interval_kind = any(
        body.get(k)
        for k in ("args", "script", "http", "tcp", "udp", "grpc", "h2ping", "dockercontainerid", "osservice")
    )
    alias = bool(body.get("aliasservice") or body.get("aliasnode"))
    if interval and ttl:
        raise ConsulError(400, "Invalid check: Interval and TTL cannot both be specified")
    if interval_kind and not interval:
        raise ConsulError(
            400, "Invalid check: Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or GRPC checks"
        )
    if not interval_kind and not alias and not (ttl and ttl > 0):
        raise ConsulError(400, "Invalid check: TTL must be > 0 for TTL checks")
    if interval_kind or alias:
        raise ConsulError(
            400, "Invalid check: consul-dev runs TTL checks only (no script, HTTP, TCP, gRPC or alias)"
        )
    status = _typed(body, "status", str, "") or CRITICAL
    if status not in STATUSES:
        raise ConsulError(400, "Status for checks must 'passing', 'warning', 'critical'")
    check_id = _typed(body, "checkid", str, "") or _typed(body, "id", str, "")
    if not check_id:
        check_id = f"service:{svc.id}" + (f":{position + 1}" if count > 1 else "")
    name = _typed(body, "name", str, "") or f"Service '{svc.name}' check"
    dereg = _duration(body, "deregistercriticalserviceafter", "DeregisterCriticalServiceAfter")
    definition: dict[str, Any] = {"TTL": format_go_duration(ttl or 0.0)}
    if dereg:
        definition["DeregisterCriticalServiceAfter"] = format_go_duration(dereg)
    return Check(
        id=check_id,
        name=name,
        service_id=svc.id,
        service_name=svc.name,
        status=status,
        output=_typed(body, "output", str, ""),
        notes=_typed(body, "notes", str, ""),
        ttl=ttl,
        deregister_after=None,
        definition=definition,
        local_output=_typed(body, "output", str, ""),
    )


async def service_register(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    body = await _body_json(request)
    name = _typed(body, "name", str, "")
    if not name:
        raise ConsulError(400, "Missing service name")
    address = _typed(body, "address", str, "")
    if address in ("0.0.0.0", "::", "[::]"):
        raise ConsulError(400, "Invalid service address")
    port = _typed(body, "port", int, 0)
    if not 0 <= port <= 65535:
        raise ConsulError(400, "Invalid service port")
    weights = _canon(_typed(body, "weights", dict, None) or {"passing": 1, "warning": 1})
    passing_w, warning_w = weights.get("passing", 1), weights.get("warning", 1)
    if not isinstance(passing_w, int) or not isinstance(warning_w, int) or passing_w < 1 or warning_w < 0:
        raise ConsulError(400, "Invalid Weights: Passing must be greater than 0")
    meta = _typed(body, "meta", dict, {})
    try:
        validate_meta(meta)
    except ValueError as exc:
        raise ConsulError(400, f"Invalid Service Meta: {exc}") from None
    authz = _authz(request)
    authz.require("service", Access.WRITE, name)
    sid = _typed(body, "id", str, "") or name
    old = store.services.get(sid)
    if old is not None and old.name != name:
        authz.require("service", Access.WRITE, old.name)  # taking over another service's ID
    svc = Service(
        id=sid,
        name=name,
        tags=_str_list(body, "tags") or [],
        address=address,
        port=port,
        meta=dict(meta),
        weights={"Passing": passing_w, "Warning": warning_w},
        enable_tag_override=bool(body.get("enabletagoverride", False)),
    )
    raw_checks: list[Any] = []
    if body.get("check"):
        raw_checks.append(body["check"])
    raw_checks.extend(_typed(body, "checks", list, []))
    checks = [_parse_check(c, svc, i, len(raw_checks)) for i, c in enumerate(raw_checks)]
    if len({c.id for c in checks}) != len(checks):
        raise ConsulError(400, "Invalid check: duplicate check IDs")
    for chk, raw in zip(checks, raw_checks, strict=True):
        dereg = _duration(_canon(raw), "deregistercriticalserviceafter", "DeregisterCriticalServiceAfter")
        if dereg and dereg > 0:
            chk.deregister_after = max(dereg, DEREGISTER_MIN) * store.time_scale
    store.register_service(svc, checks, _bool_param(request, "replace-existing-checks"))
    return web.Response(status=200)


async def service_deregister(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    svc = store.services.get(request.match_info["service_id"])
    if svc is not None:
        _authz(request).require("service", Access.WRITE, svc.name)
    store.deregister_service(request.match_info["service_id"])
    return web.Response(status=200)


async def check_ttl(request: web.Request) -> web.Response:
    status = {"pass": PASSING, "warn": WARNING, "fail": CRITICAL}[request.match_info["verb"]]
    _require_check_write(request, request.match_info["check_id"])
    request.app[STORE_KEY].update_ttl_check(
        request.match_info["check_id"], status, request.query.get("note", "")
    )
    return web.Response(status=200)


async def check_update(request: web.Request) -> web.Response:
    body = await _body_json(request)
    status = _typed(body, "status", str, "")
    if status not in STATUSES:
        raise ConsulError(400, f"Invalid check status: '{status}'")
    output = _typed(body, "output", str, "")
    _require_check_write(request, request.match_info["check_id"])
    request.app[STORE_KEY].update_ttl_check(request.match_info["check_id"], status, output)
    return web.Response(status=200)


async def agent_services(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    authz = _authz(request)
    return _json(
        {
            s.id: _service_json(s, store)
            for s in store.services.values()
            if s.agent_owned and authz.allows("service", Access.READ, s.name)
        }
    )


async def agent_checks(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    authz = _authz(request)
    return _json(
        {
            c.id: _check_json(c, store, local=True)
            for c in store.checks.values()
            if c.service_id and authz.allows("service", Access.READ, c.service_name)
        }
    )


async def agent_self(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    _authz(request).require("agent", Access.READ, store.node)
    return _json(
        {
            "Config": {
                "Datacenter": store.datacenter,
                "NodeName": store.node,
                "NodeID": store.node_id,
                "Server": True,
                "Version": "1.20.0",
                "VersionMetadata": "consul-dev",
                "Revision": "consul-dev",
            },
            "Member": {
                "Name": store.node,
                "Addr": store.address,
                "Port": 8301,
                "Status": 1,
                "Tags": {"role": "consul", "dc": store.datacenter, "build": "consul-dev"},
            },
            "Meta": {"consul-network-segment": ""},
            "Stats": {
                "consul-dev": {
                    "index": str(store.index),
                    "writes": str(store.writes),
                    "ttl_updates": str(store.ttl_updates),
                }
            },
        }
    )


# -- health and catalog ----------------------------------------------------------------------------------


async def health_service(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    name = request.match_info["name"]
    passing = _bool_param(request, "passing")
    tags = tuple(t.lower() for t in request.query.getall("tag", []))
    tag_filter = _tag_filter(request.query.get("filter", ""))
    index, wait = _blocking(request)
    authz = _authz(request)

    def current() -> int:
        return _health_answer(request, store, authz, name, passing, tags, tag_filter).changed

    # A blocking query returns when *its* answer changes, not when any instance of the service does:
    # a watcher of one tag (one shard, one model) sleeps through changes to the others; and the readers
    # of one query share one re-check per write (query_watch.py), so a write wakes only those with news.
    key = (name, passing, tags, tag_filter, authz.identity)
    await request.app[QUERY_WATCHES_KEY].block(key, current, index, wait)
    woke = time.monotonic()
    encoded = _health_answer(request, store, authz, name, passing, tags, tag_filter)
    response = encoded.response(request)
    trace = request.app[TRACE_KEY]
    if trace is not None and index and encoded.changed != index:
        body = response.body
        trace.record(service=name, tags=list(tags), index=encoded.changed, commit=store.committed_at,
                     woke=woke, ready=time.monotonic(), bytes=len(body) if isinstance(body, bytes) else 0)
    return response


_TAG_FILTER = re.compile(
    r'^\s*(?:Service\.Tags\s+(?P<neg1>not\s+)?contains\s+"(?P<t1>[^"\\]*)"'
    r'|"(?P<t2>[^"\\]*)"\s+(?P<neg2>not\s+)?in\s+Service\.Tags)\s*$'
)


def _tag_filter(expr: str) -> tuple[str, bool] | None:
    """Consul's ``filter`` for health queries, the one form consul-dev evaluates: a tag in (or not in)
    ``Service.Tags`` -> (tag, wanted). Anything else is refused (400), never ignored."""
    if not expr:
        return None
    m = _TAG_FILTER.match(expr)
    if m is None:
        raise ConsulError(
            400,
            f"Failed to create boolean expression evaluator: consul-dev evaluates only "
            f'Service.Tags [not] contains "tag" (or "tag" [not] in Service.Tags), not {expr!r}',
        )
    if m.group("t1") is not None:
        return m.group("t1").lower(), m.group("neg1") is None
    return m.group("t2").lower(), m.group("neg2") is None


def _service_entries(request: web.Request, store: Store, name: str, idx: int) -> ServiceRows:
    """``store.service_entries`` with lower-cased tags and a tag index (service_rows.py), once per service
    index for every query of the service (a sharded watch asks 17 differently filtered questions per change)."""
    cache = request.app[SERVICE_ENTRIES_KEY]
    hit = cache.get(name)
    if hit is None or hit.index != idx:
        if len(cache) > 1024:
            cache.clear()
        cache[name] = hit = ServiceRows.build(store, name, idx)
    return hit


def _health_answer(
    request: web.Request,
    store: Store,
    authz: Authorizer,
    name: str,
    passing: bool,
    tags: tuple[str, ...],
    tag_filter: tuple[str, bool] | None = None,
) -> _Encoded:
    """The encoded answer of one health query at the service's current index, built once for all the
    watchers that ask (they wake together), with ``changed`` = the index at which its bytes last changed."""
    idx = store.service_index(name)
    cache = request.app[HEALTH_CACHE_KEY]
    key = (name, passing, tags, tag_filter, authz.identity)
    hit = cache.get(key)
    if hit is not None and hit.index == idx:
        return hit
    parts: list[bytes] = []
    # Consul filters what the token may not read: the service (service:read) on a node (node:read).
    if authz.allows("service", Access.READ, name) and authz.allows("node", Access.READ, store.node):
        fragments = request.app[ENTRY_CACHE_KEY]
        for svc, checks, svc_tags in _service_entries(request, store, name, idx).candidates(tags, tag_filter):
            if tags and not all(t in svc_tags for t in tags):
                continue
            if tag_filter is not None and (tag_filter[0] in svc_tags) != tag_filter[1]:
                continue
            if passing and any(c.status != PASSING for c in checks):
                continue
            # An entry's JSON changes only with its service's or checks' modify indexes: re-encode
            # just the entries that changed (a 1,000-instance answer is ~1 MB of JSON).
            stamp = (svc.modify_index, tuple((c.id, c.modify_index) for c in checks))
            cached = fragments.get(svc.id)
            if cached is None or cached[0] != stamp:
                entry = {
                    "Node": _node_json(store),
                    "Service": _service_json(svc, store),
                    "Checks": [_check_json(c, store) for c in checks],
                }
                cached = fragments[svc.id] = (stamp, json.dumps(entry).encode())
            parts.append(cached[1])
        if len(fragments) > 4 * len(store.services) + 1024:
            fragments.clear()
    if len(cache) > 4096:
        cache.clear()  # forgetting only costs watchers one spurious wake-up (changed = idx below)
    body = b"[" + b", ".join(parts) + b"]"
    # Same bytes as the previous answer to this query: keep the index at which they last changed, so
    # blocked watchers of it stay asleep. The index never goes backwards for a client (idx only grows).
    changed = hit.changed if hit is not None and hit.body == body else idx
    cache[key] = encoded = _Encoded(changed, body, index=idx)
    return encoded


async def catalog_services(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    index, wait = _blocking(request)
    await store.block(lambda: store.catalog_index, index, wait)
    out: dict[str, list[str]] = {}
    authz = _authz(request)
    for svc in store.services.values():
        if authz.allows("service", Access.READ, svc.name):
            out[svc.name] = sorted(set(out.get(svc.name, [])) | set(svc.tags))
    return _json(out, store.catalog_index)


# -- KV --------------------------------------------------------------------------------------------------


async def kv_get(request: web.Request) -> web.StreamResponse:
    store = request.app[STORE_KEY]
    key = request.match_info["key"]
    keys_mode, recurse = "keys" in request.query, _bool_param(request, "recurse")
    if not key and not (keys_mode or recurse):
        raise ConsulError(400, "Missing key name")
    index, wait = _blocking(request)

    def current() -> int:
        return store.prefix_index(key) if (keys_mode or recurse) else max(1, store.kvs_index)

    authz = _authz(request)
    if not (keys_mode or recurse):
        authz.require("key", Access.READ, key)
    await store.block(current, index, wait)
    idx = current()
    if keys_mode:
        sep = request.query.get("separator", "")
        found: list[str] = []
        for listed in store.kv_list(key):
            k = listed.key
            if sep:
                cut = k.find(sep, len(key))
                if cut >= 0:
                    k = k[: cut + len(sep)]
            if (not found or found[-1] != k) and authz.allows("key", Access.READ, k):
                found.append(k)
        return _json(found, idx) if found else _json(None, idx, status=404)
    if recurse:
        entries = [e for e in store.kv_list(key) if authz.allows("key", Access.READ, e.key)]
        return _json([_kv_json(e) for e in entries], idx) if entries else _json(None, idx, status=404)
    entry = store.kv.get(key)
    if entry is None:
        return _json(None, idx, status=404)
    if "raw" in request.query:
        return web.Response(
            body=entry.value or b"", headers={"X-Consul-Index": str(idx)}, content_type="text/plain"
        )
    return _json([_kv_json(entry)], idx)


async def kv_put(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    key = request.match_info["key"]
    if not key:
        raise ConsulError(400, "Missing key name")
    _authz(request).require("key", Access.WRITE, key)
    if request.content_length is not None and request.content_length > KV_MAX_VALUE_SIZE:
        raise ConsulError(
            413,
            f"Request body({request.content_length} bytes) too large, max size: "
            f"{KV_MAX_VALUE_SIZE} bytes. See https://developer.hashicorp.com/consul/docs/"
            "agent/config/config-files#kv_max_value_size.",
        )
    value = await request.read()
    if len(value) > KV_MAX_VALUE_SIZE:
        raise ConsulError(
            413, f"Request body({len(value)} bytes) too large, max size: {KV_MAX_VALUE_SIZE} bytes."
        )
    flags = _uint_param(request, "flags", "Invalid flags") or 0
    cas = _uint_param(request, "cas", "Invalid cas index")
    acquire = request.query.get("acquire")
    release = request.query.get("release")
    ok = store.kv_put(key, value, flags=flags, cas=cas, acquire=acquire, release=release)
    return _json(ok)


async def kv_delete(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    key = request.match_info["key"]
    recurse = _bool_param(request, "recurse")
    if not key and not recurse:
        raise ConsulError(400, "Missing key name")
    cas = _uint_param(request, "cas", "Invalid cas index")
    if recurse:
        _authz(request).require_prefix_write("key", key)
    else:
        _authz(request).require("key", Access.WRITE, key)
    return _json(store.kv_delete(key, recurse=recurse, cas=None if recurse else cas))


# -- sessions --------------------------------------------------------------------------------------------


async def session_create(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    body = await _body_json(request, allow_empty=True)
    behavior = _typed(body, "behavior", str, "") or "release"
    if behavior not in ("release", "delete"):
        raise ConsulError(500, f"Invalid Behavior setting '{behavior}'")
    ttl = _typed(body, "ttl", str, "")
    ttl_seconds = 0.0
    if ttl:
        try:
            ttl_seconds = parse_go_duration(ttl)
        except DurationError as exc:
            raise ConsulError(500, f"Session TTL '{ttl}' invalid: {exc}") from None
        if ttl_seconds != 0 and not SESSION_TTL_MIN <= ttl_seconds <= SESSION_TTL_MAX:
            raise ConsulError(
                500,
                f"Invalid Session TTL '{int(ttl_seconds * 1e9)}', must be between "
                f"[{format_go_duration(SESSION_TTL_MIN)}={format_go_duration(SESSION_TTL_MAX)}]",
            )
    lock_delay = 15.0
    raw_delay = body.get("lockdelay")
    if raw_delay is not None:
        try:
            lock_delay = parse_duration_field(raw_delay)
        except DurationError as exc:
            raise ConsulError(400, f"Request decode failed: LockDelay: {exc}") from None
        if isinstance(raw_delay, (int, float)) and raw_delay < 1000:
            lock_delay = float(raw_delay)  # Consul's fixup: small numbers are seconds, not nanoseconds
    if not 0 <= lock_delay <= MAX_LOCK_DELAY:
        raise ConsulError(
            400, f"Invalid LockDelay: must be between 0s and {format_go_duration(MAX_LOCK_DELAY)}"
        )
    checks = _str_list(body, "checks")
    node_checks = _str_list(body, "nodechecks")
    service_checks_raw = _typed(body, "servicechecks", list, None)
    service_checks = [
        str(_canon(sc).get("id", "")) for sc in service_checks_raw or [] if isinstance(sc, dict)
    ]
    if checks is None and node_checks is None and service_checks_raw is None:
        node_checks = [SERF_CHECK]
    node = _typed(body, "node", str, "") or store.node
    _authz(request).require("session", Access.WRITE, node)
    all_checks = list(dict.fromkeys((checks or []) + (node_checks or []) + service_checks))
    node_level = [c for c in all_checks if c in store.checks and not store.checks[c].service_id]
    svc_level = [c for c in all_checks if c not in node_level]
    sess = store.create_session(
        name=_typed(body, "name", str, ""),
        node=node,
        node_checks=node_level,
        service_checks=svc_level,
        behavior=behavior,
        ttl=ttl,
        ttl_seconds=ttl_seconds,
        lock_delay=lock_delay,
    )
    return _json({"ID": sess.id})


def _require_session_write(request: web.Request, session_id: str) -> None:
    sess = request.app[STORE_KEY].sessions.get(session_id)
    if sess is not None:
        _authz(request).require("session", Access.WRITE, sess.node)


async def session_destroy(request: web.Request) -> web.Response:
    _require_session_write(request, request.match_info["session_id"])
    request.app[STORE_KEY].destroy_session(request.match_info["session_id"])
    return _json(True)


async def session_renew(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    sid = request.match_info["session_id"]
    _require_session_write(request, sid)
    sess = store.sessions.get(sid)
    ttl = parse_go_duration(sess.ttl) if sess is not None and sess.ttl else 0.0
    sess = store.renew_session(sid, ttl)
    return _json([_session_json(sess)], store.sessions_index)


async def session_info(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    sid = request.match_info["session_id"]
    index, wait = _blocking(request)
    await store.block(lambda: max(1, store.sessions_index), index, wait)
    sess = store.sessions.get(sid)
    visible = sess is not None and _authz(request).allows("session", Access.READ, sess.node)
    return _json([_session_json(sess)] if sess and visible else [], store.sessions_index)


async def session_list(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    index, wait = _blocking(request)
    await store.block(lambda: max(1, store.sessions_index), index, wait)
    authz = _authz(request)
    return _json(
        [_session_json(s) for s in store.sessions.values() if authz.allows("session", Access.READ, s.node)],
        store.sessions_index,
    )


# -- status ----------------------------------------------------------------------------------------------


async def status_leader(request: web.Request) -> web.Response:
    return _json(f"{request.app[STORE_KEY].address}:8300")


async def status_peers(request: web.Request) -> web.Response:
    return _json([f"{request.app[STORE_KEY].address}:8300"])


def build_app(store: Store, acl: ACL | None = None, trace: AnswerTrace | None = None) -> web.Application:
    """The aiohttp application; the caller owns the store's lifecycle (``start``/``close``). ``acl``
    None: ACLs off (every request may do anything, as with Consul's ``acl.enabled = false``); ``trace``:
    where to record the timing of answered blocking health queries (trace.py), None: nowhere."""
    app = web.Application(middlewares=[_errors, _acl], client_max_size=KV_MAX_VALUE_SIZE + 64 * 1024)
    app[STORE_KEY] = store
    app[ACL_KEY] = acl
    app[HEALTH_CACHE_KEY] = {}
    app[ENTRY_CACHE_KEY] = {}
    app[SERVICE_ENTRIES_KEY] = {}
    app[QUERY_WATCHES_KEY] = watches = QueryWatches(store)
    app[TRACE_KEY] = trace

    async def close_watches(_: web.Application) -> None:
        await watches.close()

    app.on_cleanup.append(close_watches)
    r = app.router
    r.add_put("/v1/agent/service/register", service_register)
    r.add_put("/v1/agent/service/deregister/{service_id}", service_deregister)
    r.add_put("/v1/agent/check/{verb:pass|warn|fail}/{check_id:.+}", check_ttl)
    r.add_put("/v1/agent/check/update/{check_id:.+}", check_update)
    r.add_get("/v1/agent/services", agent_services)
    r.add_get("/v1/agent/checks", agent_checks)
    r.add_get("/v1/agent/self", agent_self)
    r.add_get("/v1/health/service/{name}", health_service)
    r.add_get("/v1/catalog/services", catalog_services)
    r.add_get("/v1/kv/{key:.*}", kv_get)
    r.add_put("/v1/kv/{key:.*}", kv_put)
    r.add_delete("/v1/kv/{key:.*}", kv_delete)
    r.add_put("/v1/session/create", session_create)
    r.add_put("/v1/session/destroy/{session_id}", session_destroy)
    r.add_put("/v1/session/renew/{session_id}", session_renew)
    r.add_get("/v1/session/info/{session_id}", session_info)
    r.add_get("/v1/session/list", session_list)
    r.add_get("/v1/status/leader", status_leader)
    r.add_get("/v1/status/peers", status_peers)
    add_acl_routes(r)
    return app
