"""The discovery plane's client: register with a TTL check, watch passing instances, publish model cards.

Everything goes through py-consul's asyncio client, so the same code runs against consul-dev and a real
agent. Watches are blocking queries that keep the last complete view while the agent is unreachable and
start over with a full read when it is back; a registered instance re-registers itself (service, card
session, cards) when a heartbeat finds that the agent has forgotten it, e.g. after an agent restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import operator
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import consul
import consul.aio
from consul.callback import CB

from dynamo_grpc.discovery.acl import ConsulPermissionDenied, explain
from dynamo_grpc.discovery.config import ConsulSettings
from dynamo_grpc.discovery.entries import EntryDecoder
from dynamo_grpc.discovery.shards import UNSHARDED_FILTER, shard_tags, with_shard_tag, without_shard_tags
from dynamo_grpc.discovery.validate import CARD_SESSION_META, CHECKSUM_KEY, SESSION_KEY, card_problem, seal_card

log = logging.getLogger(__name__)

CARD_PREFIX = "dynamo/models/"
KV_MAX_VALUE_SIZE = 512 * 1024
#: connections to the agent for everything but watches (see Discovery.__init__)
CONTROL_CONNECTIONS = 1
_TRANSIENT = (aiohttp.ClientError, asyncio.TimeoutError, OSError, consul.ConsulException)
T = TypeVar("T")


@dataclass
class Instance:
    """One registered process: its Consul service name (``dynamo-<role>``), ID, endpoint, tags and Meta."""

    service: str
    instance_id: str
    address: str
    port: int
    tags: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def check_id(self) -> str:
        """The ID Consul gives the single check registered with the service."""
        return f"service:{self.instance_id}"


@dataclass
class _Registration:
    instance: Instance
    ttl: float
    deregister_after: str
    cards: dict[str, dict[str, Any]] = field(default_factory=dict)
    session_id: str | None = None
    task: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class WatchAnswer:
    """One answer a watch received, for ``Discovery(answer_trace=...)`` (the discovery bench's stage
    breakdown): the query's tags, the index, its size, and when (``time.monotonic()``) it was read off the
    connection and parsed (``parsed`` None: same bytes as the query's previous answer, not parsed)."""

    service: str
    tags: tuple[str, ...]
    index: int
    nbytes: int
    received: float
    parsed: float | None


def _fmt_seconds(seconds: float) -> str:
    return f"{round(seconds, 3):g}s"


def card_key(model: str, instance_id: str) -> str:
    if not model or model.startswith("/") or model.endswith("/"):
        raise ValueError(f"invalid model name {model!r}")
    if not instance_id or "/" in instance_id:
        raise ValueError(f"invalid instance id {instance_id!r}")
    return f"{CARD_PREFIX}{model}/{instance_id}"


def _parse_cards(
    entries: list[dict[str, Any]] | None, model: str | None, with_session: bool = False
) -> dict[str, dict[str, dict[str, Any]]]:
    """Cards whose checksum matches their content (others are logged and left out); ``with_session``
    keeps the checksum and adds the KV entry's ``Session`` under ``SESSION_KEY`` for the reader's
    policy check (validate.card_problem), else the card is returned as it was published."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for entry in entries or []:
        rest = str(entry.get("Key", ""))[len(CARD_PREFIX) :]
        name, _, inst = rest.rpartition("/")
        if not name or not inst or (model is not None and name != model):
            continue
        try:
            card = json.loads(entry.get("Value") or b"")
        except ValueError:
            log.warning("ignoring model card %s: not JSON", entry.get("Key"))
            continue
        if not isinstance(card, dict):
            continue
        problem = card_problem(card, None)
        if problem is not None:
            log.warning("ignoring model card %s: %s", entry.get("Key"), problem)
            continue
        if with_session:
            card[SESSION_KEY] = entry.get("Session") or ""
        else:
            card.pop(CHECKSUM_KEY, None)
        out.setdefault(name, {})[inst] = card
    return out


def _instance_from_entry(entry: dict[str, Any]) -> Instance:
    svc, node = entry["Service"], entry.get("Node") or {}
    return Instance(
        service=svc["Service"],
        instance_id=svc["ID"],
        address=svc.get("Address") or node.get("Address", ""),
        port=int(svc.get("Port") or 0),
        tags=without_shard_tags(list(svc.get("Tags") or [])),
        meta=dict(svc.get("Meta") or {}),
    )


_BY_ID = operator.attrgetter("instance_id")


class Discovery:
    """A process's handle on the discovery plane. One per process; ``close()`` (or ``async with``) at exit."""

    def __init__(
        self,
        settings: ConsulSettings | None = None,
        *,
        watch_wait: float = 30.0,
        request_timeout: float = 10.0,
        backoff: tuple[float, float] = (0.05, 5.0),
        sharded_watch: bool = True,
        control_connections: int = CONTROL_CONNECTIONS,
        answer_trace: Callable[[WatchAnswer], None] | None = None,
    ) -> None:
        self.settings = settings or ConsulSettings()
        self.answer_trace = answer_trace  # called for every answer a watch receives (benches)
        self.watch_wait = watch_wait
        self.backoff = backoff
        self.sharded_watch = sharded_watch  # see shards.py
        # One keep-alive connection for the short calls (heartbeats, cards, sessions), which queue on it:
        # aiohttp reuses pooled connections first-in first-out, so a pool that grew while two calls
        # overlapped would keep its extra socket forever (a heartbeat every ttl/3 touches each in turn
        # well within the 15 s keep-alive), and an idle process would not hold the same fds twice.
        # More only for a process that registers many instances itself (the discovery bench's fleet).
        if control_connections < 1:
            raise ValueError("control_connections must be >= 1")
        self._ctl = self._client(request_timeout, limit=control_connections)
        # Blocking queries hang for up to wait + wait/16 (Consul's jitter); give them room beyond that.
        # A sharded watch holds one connection per shard: lift aiohttp's default cap of 100.
        self._watch = self._client(watch_wait * 17 / 16 + request_timeout, limit=4096)
        # for tests and benches: health entries in the changed answers watches received, and of those the
        # ones decoded (unchanged answers are skipped whole, unchanged entries reuse their Instance)
        self.answer_entries = 0
        self.parsed_entries = 0
        self._regs: dict[str, _Registration] = {}
        self.heartbeats = 0  # TTL passes sent, for metrics and benches

    @classmethod
    def from_env(cls, **kwargs: Any) -> Discovery:
        return cls(ConsulSettings.from_env(), **kwargs)

    def _client(self, timeout: float, limit: int | None = None) -> consul.aio.Consul:
        s = self.settings
        client = consul.aio.Consul(
            host=s.host,
            port=s.port,
            scheme=s.scheme,
            verify=s.verify,
            cert=s.cert,
            connections_timeout=timeout,
            connections_limit=limit,
        )
        client.token = s.token  # py-consul lets CONSUL_HTTP_TOKEN override an explicit token; we do not
        return client

    @contextlib.contextmanager
    def _acl_errors(self, what: str) -> Iterator[None]:
        """A 403 becomes ``ConsulPermissionDenied`` naming the permission and the rule that grants it,
        logged once here so that a process that dies of it leaves the reason in its log."""
        try:
            yield
        except ConsulPermissionDenied:
            raise
        except consul.ACLPermissionDenied as exc:
            err = explain(str(exc), self.settings, what)
            log.error("%s", err.message)
            raise err from None

    def _explain(self, exc: BaseException, what: str) -> str:
        if isinstance(exc, consul.ACLPermissionDenied) and not isinstance(exc, ConsulPermissionDenied):
            return explain(str(exc), self.settings, what).message
        return f"{what}: {type(exc).__name__}: {exc}"

    async def __aenter__(self) -> Discovery:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- registration ------------------------------------------------------------------------------------

    async def register(self, instance: Instance, ttl: float = 10.0, deregister_after: str = "1m") -> None:
        """Register ``instance`` with a passing TTL check and keep it passing every ``ttl/3`` seconds."""
        if ttl <= 0:
            raise ValueError("ttl must be > 0")
        if instance.instance_id in self._regs:
            raise ValueError(f"instance {instance.instance_id!r} is already registered")
        reg = _Registration(instance=instance, ttl=ttl, deregister_after=deregister_after)
        with self._acl_errors(f"registering {instance.service} ({instance.instance_id})"):
            await self._register_service(reg)
        self._regs[instance.instance_id] = reg
        reg.task = asyncio.get_running_loop().create_task(
            self._heartbeat(reg), name=f"heartbeat:{instance.instance_id}"
        )

    async def _register_service(self, reg: _Registration) -> None:
        inst = reg.instance
        check = {
            "TTL": _fmt_seconds(reg.ttl),
            "DeregisterCriticalServiceAfter": reg.deregister_after,
            "Status": "passing",
            "Output": "registered",
        }
        ok = await self._ctl.agent.service.register(
            inst.service,
            service_id=inst.instance_id,
            address=inst.address or None,
            port=inst.port or None,
            tags=with_shard_tag(list(inst.tags), inst.instance_id),
            meta=dict(inst.meta) or None,
            check=check,
        )
        if not ok:
            raise consul.ConsulException(f"registering {inst.instance_id} failed")

    async def _restore(self, reg: _Registration) -> None:
        """The agent forgot us (restart, reap): register again, then re-publish our cards."""
        log.warning("consul agent lost %s; registering again", reg.instance.instance_id)
        await self._register_service(reg)
        reg.session_id = None
        for model, card in list(reg.cards.items()):
            await self._put_card(reg, model, card)

    async def _heartbeat(self, reg: _Registration) -> None:
        period = reg.ttl / 3
        delay = period * random.uniform(0.5, 1.0)  # spread many instances' heartbeats over the period
        while True:
            await asyncio.sleep(delay)
            try:
                self.heartbeats += 1
                if not await self._ctl.agent.check.ttl_pass(reg.instance.check_id):
                    await self._restore(reg)
                elif reg.session_id is not None:
                    try:
                        await self._ctl.session.renew(reg.session_id)
                    except consul.NotFound:
                        log.warning(
                            "card session of %s was invalidated; publishing again", reg.instance.instance_id
                        )
                        reg.session_id = None
                        for model, card in list(reg.cards.items()):
                            await self._put_card(reg, model, card)
                delay = period
            except asyncio.CancelledError:
                raise
            except consul.ACLPermissionDenied as exc:
                delay = period  # a missing permission does not fix itself quickly: say so once a period
                log.error("%s", self._explain(exc, f"heartbeat of {reg.instance.instance_id}"))
            except _TRANSIENT as exc:
                delay = min(period, self.backoff[0] * 4 + random.random() * self.backoff[0])
                log.debug(
                    "heartbeat for %s failed (%s); retrying in %.2fs", reg.instance.instance_id, exc, delay
                )
            except Exception:  # keep heartbeating whatever one round hit; the TTL is ticking
                delay = min(period, 1.0)
                log.exception("heartbeat for %s failed", reg.instance.instance_id)

    async def deregister(self, instance_id: str | None = None) -> None:
        """Remove our instance(s) now: stop heartbeats, drop card sessions (deleting the cards),
        deregister the services."""
        ids = [instance_id] if instance_id is not None else list(self._regs)
        for iid in ids:
            reg = self._regs.pop(iid, None)
            if reg is None:
                continue
            if reg.task is not None:
                reg.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reg.task
            try:
                if reg.session_id is not None:
                    await self._ctl.session.destroy(reg.session_id)
                await self._ctl.agent.service.deregister(iid)
            except _TRANSIENT as exc:
                why = self._explain(exc, f"deregistering {iid}")
                log.warning("%s; Consul reaps it after its TTL", why)

    # -- model cards -------------------------------------------------------------------------------------

    async def put_model_card(self, model: str, instance_id: str, card: dict[str, Any]) -> None:
        """Publish ``card`` at ``dynamo/models/<model>/<instance_id>``, held by a session bound to the
        instance's TTL check, so Consul deletes it when the instance stops heartbeating."""
        reg = self._regs.get(instance_id)
        if reg is None:
            raise ValueError(f"instance {instance_id!r} is not registered by this process")
        card_key(model, instance_id)
        if len(json.dumps(card).encode()) > KV_MAX_VALUE_SIZE:
            raise ValueError(
                f"model card for {model!r} exceeds Consul's {KV_MAX_VALUE_SIZE} byte value limit"
            )
        with self._acl_errors(f"publishing the model card of {model!r}"):
            await self._put_card(reg, model, card)
        reg.cards[model] = card

    async def _ensure_session(self, reg: _Registration) -> str:
        if reg.session_id is not None:
            return reg.session_id
        delay = self.backoff[0]
        for attempt in range(8):
            try:
                reg.session_id = await self._ctl.session.create(
                    name=f"dynamo-card:{reg.instance.instance_id}",
                    checks=["serfHealth", reg.instance.check_id],
                    behavior="delete",
                    lock_delay=0,
                )
                return reg.session_id
            except consul.ConsulException as exc:
                # A real agent syncs the check to the catalog asynchronously: "Missing check" for a moment.
                if attempt == 7 or not ("Missing check" in str(exc) or "critical state" in str(exc)):
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")

    async def _put_card(self, reg: _Registration, model: str, card: dict[str, Any]) -> None:
        sid = await self._ensure_session(reg)
        if reg.instance.meta.get(CARD_SESSION_META) != sid:
            # Readers trust a card only when its KV entry is held by the session the registration names.
            reg.instance.meta[CARD_SESSION_META] = sid
            await self._register_service(reg)
        key = card_key(model, reg.instance.instance_id)
        if not await self._ctl.kv.put(key, json.dumps(seal_card(card), sort_keys=True), acquire=sid):
            raise RuntimeError(f"model card {key} is held by another live session (duplicate instance id?)")

    async def get_model_cards(self, model: str | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """model -> instance -> card, for every live card (or one model's)."""
        prefix = CARD_PREFIX + (f"{model}/" if model else "")
        with self._acl_errors(f"reading model cards under {prefix}"):
            _, entries = await self._ctl.kv.get(prefix, recurse=True)
        return _parse_cards(entries, model)

    async def get_model_card_entries(self, model: str) -> dict[str, dict[str, Any]]:
        """instance -> card of one model, each with its checksum and its KV entry's session
        (``validate.SESSION_KEY``), for readers that check it against the registration."""
        with self._acl_errors(f"reading model cards of {model}"):
            _, entries = await self._ctl.kv.get(f"{CARD_PREFIX}{model}/", recurse=True)
        return _parse_cards(entries, model, with_session=True).get(model, {})

    def watch_model_cards(
        self, model: str | None = None
    ) -> AsyncIterator[dict[str, dict[str, dict[str, Any]]]]:
        """Snapshots of ``get_model_cards(model)``, one per change, via blocking queries."""
        prefix = CARD_PREFIX + (f"{model}/" if model else "")

        async def fetch(index: int, wait: str) -> tuple[int, dict[str, dict[str, dict[str, Any]]]]:
            idx, entries = await self._watch.kv.get(prefix, recurse=True, index=index or None, wait=wait)
            return int(idx), _parse_cards(entries, model)

        return self._blocking_loop(fetch, f"cards:{model or '*'}")

    # -- watching ----------------------------------------------------------------------------------------

    def watch(self, service: str, tags: list[str] | None = None) -> AsyncIterator[list[Instance]]:
        """Snapshots of the passing instances of ``service`` (having all ``tags``), sorted by ID. Each
        snapshot is one complete answer from the agent (per shard, see shards.py); nothing is yielded
        while it is unreachable."""
        tags = list(tags or [])
        if not self.sharded_watch:
            return self._watch_query(service, tags)
        parts = [self._watch_query(service, [*tags, t]) for t in shard_tags()]
        parts.append(self._watch_query(service, tags, UNSHARDED_FILTER))  # registered by other tools
        return self._merged(service, parts)

    async def _health_raw(
        self, service: str, tags: list[str], index: int, wait: str, filter_expr: str = ""
    ) -> tuple[int, bytes]:
        """One (blocking) health query, answered as raw bytes so that an unchanged answer is not parsed."""
        params: list[tuple[str, Any]] = [("passing", "1"), *(("tag", t) for t in tags)]
        if filter_expr:
            params.append(("filter", filter_expr))
        if index:
            params += [("index", index), ("wait", wait)]

        def answer(response: Any) -> tuple[int, bytes]:
            CB._status(response, allow_404=False)
            return int(response.headers.get("X-Consul-Index", 0)), response.body

        http = self._watch.http
        headers = self._watch.prepare_headers(None)
        result: tuple[int, bytes] = await http.get(
            answer, f"/v1/health/service/{service}", params=params, headers=headers, raw=True
        )
        return result

    def _watch_query(self, service: str, tags: list[str], filter_expr: str = "") -> AsyncIterator[list[Instance]]:
        digest: bytes | None = None
        view: list[Instance] = []
        decoder = EntryDecoder(_instance_from_entry)  # decodes only the entries that changed (entries.py)

        async def fetch(index: int, wait: str) -> tuple[int, list[Instance]]:
            nonlocal digest, view
            idx, body = await self._health_raw(service, tags, index, wait, filter_expr)
            received, parsed = time.monotonic(), None
            new = hashlib.blake2b(body, digest_size=16).digest()
            if new != digest:  # a real agent wakes every query of the service; most answers are unchanged
                before = decoder.decoded
                view, digest = sorted(decoder.decode(body), key=_BY_ID), new
                self.parsed_entries += decoder.decoded - before
                self.answer_entries += len(view)
                parsed = time.monotonic()
            if self.answer_trace is not None:
                self.answer_trace(WatchAnswer(service, tuple(tags), idx, len(body), received, parsed))
            return idx, view

        return self._blocking_loop(fetch, f"{service}{tags or ''}")

    async def _merged(self, service: str, parts: list[AsyncIterator[list[Instance]]]) -> AsyncIterator[list[Instance]]:
        """Merge per-shard watches: yield once every shard has answered, then on every change."""
        views: dict[int, list[Instance]] = {}
        changed = asyncio.Event()
        failure: list[BaseException] = []

        async def follow(k: int, part: AsyncIterator[list[Instance]]) -> None:
            try:
                async for view in part:
                    views[k] = view
                    changed.set()
            except Exception as exc:  # surfaces in the consumer instead of silently freezing one shard
                failure.append(exc)
                changed.set()

        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(follow(k, p), name=f"watch:{service}:{k}") for k, p in enumerate(parts)]
        last: list[Instance] | None = None
        try:
            while True:
                await changed.wait()
                changed.clear()
                if failure:
                    raise failure[0]
                if len(views) < len(parts):
                    continue
                merged = sorted(itertools.chain.from_iterable(views.values()), key=_BY_ID)
                if merged != last:
                    last = merged
                    yield merged
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _blocking_loop(
        self, fetch: Callable[[int, str], Awaitable[tuple[int, T]]], what: str
    ) -> AsyncIterator[T]:
        index = 0
        last: T | None = None
        first = True
        delay = self.backoff[0]
        wait = _fmt_seconds(self.watch_wait)
        while True:
            try:
                new_index, view = await fetch(index, wait)
            except _TRANSIENT as exc:
                # Agent down or restarting: keep the last view, back off, then start over with a full read.
                # The first failure of a streak is a warning (a 403 or 5xx would otherwise go unseen).
                level = logging.WARNING if delay == self.backoff[0] else logging.DEBUG
                log.log(level, "%s; retrying", self._explain(exc, f"watch {what}"))
                index = 0
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self.backoff[1])
                continue
            delay = self.backoff[0]
            # Consul's rules: an index that went backwards means start over; never send an index below 1.
            index = 0 if new_index < index else max(new_index, 1)
            if first or view != last:
                first = False
                last = view
                yield view

    async def close(self) -> None:
        await self.deregister()
        for client in (self._ctl, self._watch):
            with contextlib.suppress(Exception):
                await client.close()
