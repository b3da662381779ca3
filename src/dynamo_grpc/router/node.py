"""The KV router's moving parts without a server: discovery -> event subscriber -> index -> Router.

`dynamo-grpc router` serves a node over RouterService; the frontend embeds one per model
(`--router-mode kv`, as Dynamo's frontend does) and calls it in-process, which saves a gRPC hop
(Route + Update) per request. Until every known worker's Replay has been applied the node is not
ready and `Router.route` raises NotReady: a new node never routes from a stale, empty view.

One bad worker never holds the others hostage: a registration out of bounds is skipped, a worker whose
Replay has not succeeded within ``sync_grace_s`` is skipped (logged, counted in the WorkerView) while
the subscriber keeps retrying it with backoff, and a worker that joins after the node is ready gets
requests once its first Replay is in, without making the node not ready meanwhile. The verdicts live
in the process's one WorkerView, shared with the frontend's model registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from dynamo_grpc.discovery import Discovery, Instance
from dynamo_grpc.discovery.pools import pool_of
from dynamo_grpc.discovery.usable import WorkerView
from dynamo_grpc.discovery.validate import RegistrationFilter, card_problem
from dynamo_grpc.discovery.worker_roles import role_of
from dynamo_grpc.events.curve import CurveConfig, public_key_from_meta
from dynamo_grpc.events.replay_client import GrpcReplayClient
from dynamo_grpc.events.sockets import BoundPub
from dynamo_grpc.events.subscriber import KvEventSubscriber
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.metrics import RouterMetrics
from dynamo_grpc.router.replicas import ActiveSync
from dynamo_grpc.router.router import Router, WorkerInfo
from dynamo_grpc.router.sync import IndexSink

log = logging.getLogger(__name__)


def worker_info(inst: Instance) -> WorkerInfo:
    """A `dynamo-worker` Consul instance as the router sees it (Meta carries the numbers)."""
    m = inst.meta

    def num(key: str, default: int) -> int:
        try:
            return int(m.get(key, default))
        except ValueError:
            return default

    return WorkerInfo(
        instance_id=inst.instance_id,
        grpc_address=m.get("grpc_address") or f"{inst.address}:{inst.port}",
        model=m.get("model", ""),
        block_size=num("block_size", 0),
        dp_size=num("dp_size", 1),
        kv_blocks=num("kv_blocks", 0),
        zmq_endpoint=m.get("zmq_endpoint", ""),
        role=role_of(inst.tags, m),
    )


def card_block_size(cards: dict[str, dict[str, Any]]) -> int:
    for _, card in sorted(cards.items()):
        try:
            bs = int(card.get("block_size", 0) or 0)
        except (TypeError, ValueError):
            continue
        if bs:
            return bs
    return 0


class RouterNode:
    """One model's router, fed by Consul and the workers' KV events.

    `share_active=True` publishes active sequences on ZMQ and follows the other `dynamo-router`
    replicas' (see replicas.py); an embedded node keeps its in-flight load to itself.
    """

    def __init__(
        self,
        config: RouterConfig,
        discovery: Discovery,
        router_id: str,
        bind_host: str = "127.0.0.1",
        metrics: RouterMetrics | None = None,
        share_active: bool = True,
        curve: CurveConfig | None = None,
        sync_port: int = 0,
        view: WorkerView | None = None,
        sync_grace_s: float = 3.0,
        pool: str | None = None,
        peer_service: str = "dynamo-router",
        shared_pub: BoundPub | None = None,
    ) -> None:
        """``pool``: route only among workers of that pool (the global router's per-pool nodes); None: all."""
        config.validate()
        self.pool = pool
        #: where the replicas sharing active load register: `dynamo-router` (router processes, one
        #: model each, tagged model=) or `dynamo-frontend` (embedded routers, every model, one PUB)
        self.peer_service = peer_service
        self.shared_pub = shared_pub
        #: fixed port of the active-sequence PUB (router --zmq-port); 0: any free port
        self.sync_port = sync_port
        self.curve = curve
        self.view = view or WorkerView()
        self.sync_grace_s = sync_grace_s
        self.registrations = RegistrationFilter()
        self._fresh: set[str] = set()  # subscribed workers whose first Replay is not in yet
        self._seen_synced: set[str] = set()  # subscribed workers that have had a Replay applied
        self._unsynced_since: dict[str, float] = {}
        self._events_skipped: set[str] = set()  # ours in the view (other models' nodes share it)
        self._was_ready = False
        self.config = config
        self.discovery = discovery
        self.router_id = router_id
        self.bind_host = bind_host
        self.router = Router(config, router_id)
        self.router.usable = self._routable
        self.view.on_change(self.router.usable_changed)
        self.metrics = metrics
        if metrics is not None:
            metrics.track(self)
        self.share_active = share_active
        self.replay = GrpcReplayClient()
        self.sub: KvEventSubscriber | None = None
        self.active_sync: ActiveSync | None = None
        self.tasks: list[asyncio.Task[None]] = []
        #: called once the model is known (the router process registers itself then)
        self.on_model: Callable[[str], None] | None = None
        #: awaited whenever readiness flips (the router process sets its gRPC health)
        self.on_ready_change: Callable[[bool], Awaitable[None]] | None = None
        self._first_snapshot = asyncio.Event()
        self._ready = asyncio.Event()

    def _routable(self, instance_id: str) -> bool:
        """Usable, and its first Replay is in, unless no settled worker of its role could take its requests:
        a worker that just joined is left out while its index is unknown, but the only worker of a role
        (the decode worker of a fresh disaggregated mesh, a pool's one worker) is routed to rather than
        the request failing with "no live worker" or leaving its pool."""
        if not self.view.usable(instance_id):
            return False
        if instance_id not in self._fresh:
            return True
        me = self.router.workers.get(instance_id)
        role = me.role if me is not None else None
        return not any(
            w.role == role and w.instance_id not in self._fresh and self.view.usable(w.instance_id)
            for w in self.router.workers.values()
        )

    def start(self) -> None:
        self.tasks.append(asyncio.create_task(self._watch_workers(), name="watch-workers"))
        self.tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        self.tasks.append(asyncio.create_task(self._readiness(), name="readiness"))

    async def wait_ready(self, timeout: float) -> bool:
        """True once the index is rebuilt (or the mode needs none), False after `timeout` seconds."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _ensure_model(self, model: str) -> None:
        """Set up the per-model event plane once the model is known."""
        if self.sub is not None or self.active_sync is not None:
            return
        self.config.model = model
        if self.share_active:
            self.active_sync = ActiveSync(
                self.router, model, self.bind_host, self.curve, self.sync_port, shared=self.shared_pub
            )
            self.router.on_active_change = self.active_sync.publish
            self.active_sync.start()
            self.tasks.append(asyncio.create_task(self._watch_routers(), name="watch-routers"))
        if self.config.mode == "kv":
            self.sub = KvEventSubscriber(
                model,
                IndexSink(self.router),
                self.replay,
                resync_interval_s=self.config.resync_interval_s,
                on_lag=self.metrics.on_lag(self) if self.metrics is not None else None,
                curve=self.curve,
            )
            self.sub.start()
        if self.on_model is not None:
            self.on_model(model)

    async def _watch_workers(self) -> None:
        tags = [f"namespace={self.config.namespace}"]
        async for raw in self.discovery.watch("dynamo-worker", tags=tags):
            if self.pool is not None:  # a worker's pool is its Consul tag: pool A's blocks never draw pool B's requests
                raw = [i for i in raw if pool_of(i.tags) == self.pool]
            snapshot = self.registrations.valid(raw)
            for iid, why in self.registrations.reasons.items():
                self.view.skip(iid, "router-registration", why)
            self.view.retain("router-registration", set(self.registrations.reasons))
            infos = [worker_info(i) for i in snapshot]
            model = self.config.model
            if not model and infos:
                model = sorted(infos, key=lambda w: w.instance_id)[0].model
                log.info("routing for model %s", model)
            if model:
                infos = [w for w in infos if w.model in ("", model)]
                self._ensure_model(model)
                card_bs = 0
                try:
                    cards = await self.discovery.get_model_card_entries(model)
                    metas = {i.instance_id: i.meta for i in snapshot}
                    trusted = {i: c for i, c in cards.items() if i in metas and card_problem(c, metas[i]) is None}
                    for iid in set(cards) & set(metas):
                        if iid in trusted:
                            self.view.clear(iid, "router-card")
                        else:
                            self.view.skip(iid, "router-card", f"model card: {card_problem(cards[iid], metas[iid])}")
                    card_bs = card_block_size(trusted)
                except Exception as exc:  # cards are a cross-check; Meta still has block_size
                    log.debug("model cards unavailable: %s", exc)
                self.view.retain("router-card", {i.instance_id for i in snapshot})
                accepted = self.router.set_workers(infos, card_bs)
                if self.sub is not None:
                    keys = {i.instance_id: public_key_from_meta(i.meta) for i in snapshot}
                    self.sub.sync_workers(
                        [
                            (w.instance_id, w.zmq_endpoint, w.grpc_address, w.dp_size, keys.get(w.instance_id, ""))
                            for w in accepted
                            if w.zmq_endpoint
                        ]
                    )
            self._first_snapshot.set()

    async def _watch_routers(self) -> None:
        tags = [f"namespace={self.config.namespace}"]
        per_model = self.peer_service == "dynamo-router"  # a frontend's PUB carries every model's topic
        async for snapshot in self.discovery.watch(self.peer_service, tags=tags):
            peers = {
                i.meta.get("zmq_endpoint", ""): public_key_from_meta(i.meta)
                for i in snapshot
                if i.instance_id != self.router_id and (not per_model or f"model={self.config.model}" in i.tags)
            }
            if self.active_sync is not None:
                self.active_sync.set_peers({e: k for e, k in peers.items() if e})

    def _events_synced(self) -> bool:
        """Track each subscribed worker's Replay; True when no usable worker holds readiness back.

        Before the node is first ready every usable worker must be synced; after, only a worker that was
        synced and lost it (a restart) does. A worker never synced yet gets no requests. One still
        unsynced after ``sync_grace_s`` is skipped in the view (logged, counted); the subscriber keeps
        retrying it with backoff and it is cleared once its Replay lands."""
        if self.sub is None:
            return True
        now = time.monotonic()
        subscribed = set(self.sub.workers)
        synced = self.sub.synced_workers()
        self._seen_synced = (self._seen_synced | synced) & subscribed
        for iid in subscribed - synced:
            since = self._unsynced_since.setdefault(iid, now)
            if now - since > self.sync_grace_s and iid not in self._events_skipped:
                self._events_skipped.add(iid)
                self.view.skip(iid, "events", f"no Replay of its KV events within {self.sync_grace_s:g}s; retrying")
        for iid in synced | (set(self._unsynced_since) - subscribed):
            self._unsynced_since.pop(iid, None)
        for iid in self._events_skipped - (subscribed - synced):  # synced at last, or gone
            self._events_skipped.discard(iid)
            self.view.clear(iid, "events")
        fresh = subscribed - self._seen_synced
        if fresh != self._fresh:
            self._fresh = fresh
            self.router.usable_changed()
        unsynced = [i for i in subscribed - synced if self.view.usable(i)]
        return not [i for i in unsynced if not self._was_ready or i in self._seen_synced]

    async def _readiness(self) -> None:
        """Not ready until the first worker snapshot is in and every usable worker's Replay is applied."""
        await self._first_snapshot.wait()
        while True:
            synced = self._events_synced()
            self._was_ready = self._was_ready or synced
            if synced != self.router.ready or synced != self._ready.is_set():
                self.router.ready = synced
                if synced:
                    self._ready.set()
                else:
                    self._ready.clear()
                if self.on_ready_change is not None:
                    await self.on_ready_change(synced)
                log.info("router %s: %s", self.config.model, "ready: index rebuilt" if synced else "resyncing")
            await asyncio.sleep(0.05)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.router.housekeeping()

    async def close(self) -> None:
        if self.metrics is not None:
            self.metrics.untrack(self)
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.sub is not None:
            await self.sub.close()
        if self.active_sync is not None:
            await self.active_sync.close()
        await self.replay.close()
