"""The router core: workers, index, active load and policy in one plain-Python object.

No grpc and no protobuf here: ``service.py`` adapts the RouterService contract, ``sync.py``
feeds KV events, ``replicas.py`` shares active sequences with other router replicas.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from dynamo_grpc.discovery.worker_roles import roles_for
from dynamo_grpc.queueing import QueueFull, WaitQueue
from dynamo_grpc.router.active import ActiveSequences
from dynamo_grpc.router.approx import ApproxIndexer
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.indexer import KvIndexer
from dynamo_grpc.router.policy import AllBusy, Choice, NoWorkers, busy_filter, prefill_busy_filter
from dynamo_grpc.router.ranks import RankTable
from dynamo_grpc.router.selectors import KvSelector, RandomSelector, RoundRobinSelector, Selector
from dynamo_grpc.router.tiers import TierIndex
from dynamo_grpc.tokens.block_hash import block_hash_list

log = logging.getLogger(__name__)
#: one JSON line per decision at DEBUG (``--log-level info,dynamo_grpc.router.decisions=debug``): what the
#: router believed each rank held, for docs/router.md's tail-latency analysis (`bench replay --log-dir`)
decision_log = logging.getLogger("dynamo_grpc.router.decisions")

RankKey = tuple[str, int]  # (instance_id, dp_rank)
#: cache-aware queue: how long a rank stays full after a placement or a report of waiting requests, at most
#: (its next LoadMetrics normally clears it within 100 ms)
NO_ROOM_TTL_S = 1.0

__all__ = ["AllBusy", "NoWorkers", "NotReady", "RouteInput", "RouteResult", "Router", "WorkerInfo"]


class NotReady(Exception):
    """The router has not rebuilt its index yet (UNAVAILABLE)."""


@dataclass
class WorkerInfo:
    """A worker as discovery describes it (service Meta)."""

    instance_id: str
    grpc_address: str
    model: str = ""
    block_size: int = 0
    dp_size: int = 1
    kv_blocks: int = 0
    zmq_endpoint: str = ""
    #: disaggregation role (discovery/worker_roles.py): prefill | decode | both
    role: str = "both"

    def ranks(self) -> list[RankKey]:
        return [(self.instance_id, r) for r in range(max(self.dp_size, 1))]


@dataclass
class RouteInput:
    request_id: str
    model: str = ""
    token_ids: Sequence[int] = ()
    block_hashes: Sequence[int] | None = None
    lora: str = ""
    exclude: Sequence[str] = ()
    expected_output_tokens: int = 0
    dry_run: bool = False
    #: aggregated | prefill | decode: only workers whose role serves the phase are candidates
    phase: str = "aggregated"


@dataclass(frozen=True)
class Waiting:
    """What the cache-aware router queue knows of a waiting request: its prompt's block hashes and the
    instances it may not use (its ``exclude`` plus the workers whose role does not serve its phase)."""

    hashes: list[int]
    exclude: tuple[str, ...] = ()


@dataclass
class RouteResult:
    instance_id: str
    dp_rank: int
    address: str
    overlap_blocks: int
    prompt_blocks: int
    prefill_cost: float
    decode_cost: float
    mode: str

    @property
    def total_cost(self) -> float:
        return self.prefill_cost + self.decode_cost


@dataclass
class ActiveChange:
    """One change to share with replicas: kind is "added", "prefill_done" or "freed"."""

    kind: str
    request_id: str
    instance_id: str = ""
    dp_rank: int = 0
    prefill_blocks: int = 0
    decode_blocks: int = 0


@dataclass
class RouterCounters:
    decisions: dict[str, int] = field(default_factory=dict)
    refused_workers: int = 0


class Router:
    """Routes requests for one model among the workers discovery reports."""

    def __init__(
        self,
        config: RouterConfig,
        router_id: str = "router",
        on_active_change: Callable[[ActiveChange], None] | None = None,
        indexer: KvIndexer | None = None,
    ) -> None:
        """``indexer``: the index KV events feed (default: a bounded KvIndexer; benchmarks inject others)."""
        config.validate()
        self.config = config
        self.router_id = router_id
        self.on_active_change = on_active_change
        self.rng = random.Random(config.seed)
        #: approximate mode: the index is fed by our own decisions, with a TTL
        self.approx = ApproxIndexer(config.approx_ttl_s, config.max_indexed_blocks) if config.mode == "approx" else None
        self.indexer = self.approx.index if self.approx is not None else indexer or KvIndexer(config.max_indexed_blocks)
        #: per-tier presence (device = self.indexer, plus host and disk) and its overlap credit
        self.tiers = TierIndex(self.indexer, config.host_overlap_weight, config.disk_overlap_weight)
        #: kv mode: predicted prefixes (Dynamo's predicted-TTL side index): what we just routed counts as
        #: cached on its worker until that worker's KV events catch up, so a burst sharing a new prefix
        #: is not scattered by the event delay
        self.predicted = (
            ApproxIndexer(config.predicted_ttl_s, config.max_indexed_blocks)
            if config.mode == "kv" and config.predicted_ttl_s > 0
            else None
        )
        #: requests waiting for a worker under its busy threshold (None: no queue, AllBusy is raised)
        self.queue: WaitQueue[RouteResult] | None = (
            WaitQueue(
                config.queue_size,
                config.queue_policy,
                busy=AllBusy,
                choose=self._choose_waiting if config.queue_policy == "cache-aware" else None,
                age_cap_s=config.queue_age_cap_s,
            )
            if config.queue_size > 0
            else None
        )
        self.block_size = config.block_size
        self.active = ActiveSequences(config.block_size or 1, config.active_ttl_s)
        self.workers: dict[str, WorkerInfo] = {}
        #: instance_id -> why it is never routed to (block size mismatch)
        self.refused: dict[str, str] = {}
        #: (instance_id, dp_rank) -> fraction of KV in use, from LoadMetrics
        self.kv_usage: dict[RankKey, float] = {}
        #: (instance_id, dp_rank) -> waiting + running requests, from LoadMetrics (the tie-break)
        self.reported: dict[RankKey, int] = {}
        #: cache-aware queue: ranks with requests waiting in their engine, or placed on since their last
        #: LoadMetrics (see _busy_usage), and since when
        self._no_room: dict[RankKey, float] = {}
        #: the clock of those marks (a simulation sets its own)
        self.clock: Callable[[], float] = time.monotonic
        self.ready = config.mode != "kv"
        self.counters = RouterCounters()
        self._selector = self._make_selector()
        self._rank_table: RankTable | None = None
        self._table_of: dict[str, WorkerInfo] | None = None
        self._table_size = 0
        self.active.on_delta = self._on_active_delta
        self.on_decision: Callable[[RouteResult], None] | None = None
        #: the process's verdict on a worker (discovery.usable.WorkerView); unusable ones get no requests
        self.usable: Callable[[str], bool] = lambda instance_id: True

    def _make_selector(self) -> Selector:
        cfg = self.config
        if cfg.mode == "round-robin":
            return RoundRobinSelector()
        if cfg.mode == "random":
            return RandomSelector(self.rng)
        overlaps: Callable[[Sequence[int]], dict[Hashable, float]] = (
            self.approx.overlaps if self.approx is not None else self.tiers.overlaps  # type: ignore[assignment]
        )
        if self.predicted is not None:
            overlaps = self._overlaps_with_predicted
        return KvSelector(overlaps, cfg.prefill_load_scale, cfg.temperature, self.rng)  # type: ignore[arg-type]

    def _overlaps_with_predicted(self, hashes: Sequence[int]) -> dict[Hashable, float]:
        """Per worker, the deeper of what its KV events say (every tier, weighted) and what we routed to it
        within the TTL."""
        return self._deepened_by_predicted(dict(self.tiers.overlaps(hashes)), hashes)

    def _deepened_by_predicted(self, found: dict[Hashable, float], hashes: Sequence[int]) -> dict[Hashable, float]:
        """``found`` (per worker, from its KV events) deepened by what we routed to it within the TTL."""
        assert self.predicted is not None
        pred = self.predicted.overlaps(hashes)
        if not pred:
            return found
        merged: dict[Hashable, float] = dict(found)
        for k, depth in pred.items():
            if depth > merged.get(k, 0):
                merged[k] = depth
        return merged

    # ---- membership ----------------------------------------------------------------------
    def set_block_size(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self.active.block_size = block_size

    def set_workers(self, workers: Sequence[WorkerInfo], card_block_size: int = 0) -> list[WorkerInfo]:
        """Adopt discovery's snapshot; returns the accepted workers (block size checked).

        The expected block size is the flag, else the model card's, else the most common among
        the workers (ties: the first by instance id, so every replica agrees). A worker that differs is refused with an
        error log line and never routed to.
        """
        expected = self.config.block_size or card_block_size
        if not expected:
            sizes = [w.block_size for w in sorted(workers, key=lambda w: w.instance_id) if w.block_size]
            if self.block_size:
                expected = self.block_size
            elif sizes:  # the most common size; ties go to the first worker by id
                expected = max(sizes, key=lambda b: (sizes.count(b), -sizes.index(b)))
        if expected and expected != self.block_size:
            self.set_block_size(expected)
        accepted: list[WorkerInfo] = []
        refused: dict[str, str] = {}
        for w in workers:
            if expected and w.block_size and w.block_size != expected:
                reason = (
                    f"worker {w.instance_id} has block_size {w.block_size} but model {w.model or '?'} "
                    f"uses {expected}: refusing it (its KV hashes would never match)"
                )
                if w.instance_id not in self.refused:
                    log.error(reason)
                    self.counters.refused_workers += 1
                refused[w.instance_id] = reason
                continue
            accepted.append(w)
        self.refused = refused
        new = {w.instance_id: w for w in accepted}
        for iid in list(self.workers):
            if iid not in new:
                self.remove_worker(iid)
        self.workers = new
        self._rank_table = None
        self._wake()
        return accepted

    def usable_changed(self) -> None:
        """The usable set changed: rebuild the rank table before the next decision."""
        self._rank_table = None
        self._wake()

    def remove_worker(self, instance_id: str) -> None:
        """A worker is gone: forget its blocks, load and active sequences."""
        w = self.workers.pop(instance_id, None)
        self._rank_table = None
        ranks = w.ranks() if w else [k for k in self.indexer.workers if isinstance(k, tuple) and k[0] == instance_id]
        for key in ranks:
            self.tiers.remove_worker(key)
            if self.approx is not None:
                self.approx.remove_worker(key)
            self.active.remove_worker(key)
            self.kv_usage.pop(key, None)
            self.reported.pop(key, None)
            self._no_room.pop(key, None)
            if self.predicted is not None:
                self.predicted.remove_worker(key)

    def refuse_rank(self, key: RankKey, block_size: int) -> None:
        """An event batch said a different block size than the model's: refuse the worker."""
        iid = key[0]
        if iid in self.refused:
            return
        reason = f"worker {iid} publishes block_size {block_size} but the model uses {self.block_size}: refusing it"
        log.error(reason)
        self.counters.refused_workers += 1
        self.refused[iid] = reason
        self.remove_worker(iid)

    # ---- routing ---------------------------------------------------------------------------
    def _table(self) -> RankTable:
        """The dense per-rank table, rebuilt when the worker set changed (identity or size of the dict)."""
        t = self._rank_table
        if t is None or self._table_of is not self.workers or self._table_size != len(self.workers):
            t = RankTable(
                (
                    (k, w.grpc_address, w.kv_blocks)
                    for w in self.workers.values()
                    if self.usable(w.instance_id)
                    for k in w.ranks()
                ),
                self._active_load,
                self.kv_usage,
                self.reported,
            )
            self._rank_table, self._table_of, self._table_size = t, self.workers, len(self.workers)
        return t

    def _active_load(self, key: RankKey) -> tuple[int, int]:
        a = self.active.load(key)
        return a.prefill_blocks, a.decode_blocks

    def _on_active_delta(self, key: object, d_prefill: int, d_decode: int) -> None:
        if self._rank_table is not None:
            self._rank_table.add_load(key, d_prefill, d_decode)  # type: ignore[arg-type]

    def hashes_for(self, inp: RouteInput) -> list[int]:
        if inp.block_hashes:
            return list(map(int, inp.block_hashes))
        if not self.block_size:
            raise NoWorkers("block size unknown: no worker has announced one yet")
        return block_hash_list(inp.token_ids, self.block_size, inp.lora or None)

    def route(self, inp: RouteInput) -> RouteResult:
        """Pick a worker rank. Raises NotReady, NoWorkers, AllBusy, or ValueError (bad input).

        The hot path: one walk of the hash chain in the indexer (stops at the first block no
        live worker holds), then cost, busy mask and argmin as numpy ops over the rank slots.
        """
        if not inp.request_id:
            raise ValueError("request_id is required")
        if not self.ready:
            raise NotReady("router is rebuilding its index from the workers' Replay")
        t = self._table()
        exclude = list(inp.exclude) + self._other_roles(inp.phase)
        ok = t.allowed(exclude) if exclude else None
        if not t.n or (ok is not None and not ok.any()):
            raise NoWorkers(f"no live worker for model {inp.model or self.config.model or '?'}")
        hashes = self.hashes_for(inp)
        cfg = self.config
        if cfg.busy_threshold < 1.0:
            ok = busy_filter(ok, self._busy_usage(t), cfg.busy_threshold)
        if cfg.queue_threshold > 0 and cfg.mode in ("kv", "approx") and self.block_size:
            limit = cfg.queue_threshold * cfg.max_num_batched_tokens / self.block_size
            ok = prefill_busy_filter(ok, t.prefill, limit)
        prompt_blocks = len(hashes)
        out_blocks = -(-inp.expected_output_tokens // self.block_size) if self.block_size else 0
        decode_new = prompt_blocks + out_blocks
        scale = cfg.prefill_load_scale
        slot, overlap = self._selector.select(t, ok, hashes)  # weighted by tier: may be fractional
        if decision_log.isEnabledFor(logging.DEBUG):
            self._log_decision(inp, t, slot, prompt_blocks)
        pf = float(t.prefill[slot]) + prompt_blocks - overlap
        held = max(decode_new - int(overlap), 0)  # blocks this request adds there (its cached prefix is shared)
        choice = Choice(t.keys[slot], int(overlap), scale * pf if pf > 0 else 0.0, float(t.decode[slot]) + held)
        return self._commit(inp, choice, hashes, prompt_blocks, held, t.addresses[slot])

    def _log_decision(self, inp: RouteInput, t: RankTable, slot: int, prompt_blocks: int) -> None:
        """The rank table as this decision saw it: own prefill/decode blocks, reported waiting + running."""
        now = time.monotonic()
        ranks = {
            f"{k[0]}/{k[1]}": [float(t.prefill[i]), float(t.decode[i]), float(t.reported[i])]
            for i, k in enumerate(t.keys)
        }
        rec = {"rid": inp.request_id, "t": now, "chosen": f"{t.keys[slot][0]}/{t.keys[slot][1]}"}
        decision_log.debug("%s", json.dumps({**rec, "prompt_blocks": prompt_blocks, "ranks": ranks}))

    def _other_roles(self, phase: str) -> list[str]:
        """Workers whose role does not serve ``phase`` (worker_roles.roles_for picks the pool)."""
        workers = self.workers.values()
        if phase == "aggregated" and all(w.role == "both" for w in workers):
            return []  # the common case: no disaggregation
        allowed = roles_for(phase, (w.role for w in workers if self.usable(w.instance_id)))
        return [w.instance_id for w in workers if w.role not in allowed]

    def _commit(
        self,
        inp: RouteInput,
        choice: Choice,
        hashes: list[int],
        prompt_blocks: int,
        decode_new: int,
        address: str,
    ) -> RouteResult:
        key = choice.key
        assert isinstance(key, tuple)
        iid, rank = key
        new_prefill = max(prompt_blocks - choice.overlap, 0)
        if not inp.dry_run:
            prompt_tokens = len(inp.token_ids) or prompt_blocks * (self.block_size or 1)
            self.active.add(inp.request_id, key, new_prefill, decode_new, prompt_tokens, self.router_id, choice.overlap)
            if self.config.queue_policy == "cache-aware" and key in self.kv_usage:
                self._no_room[key] = self.clock()  # until its next LoadMetrics says what it has room for
            if self.approx is not None:
                self.approx.record(key, hashes)
            if self.predicted is not None:
                self.predicted.record(key, hashes)
            if self.on_active_change is not None:
                self.on_active_change(ActiveChange("added", inp.request_id, iid, rank, new_prefill, decode_new))
        mode = self.config.mode
        res = RouteResult(
            iid, rank, address, choice.overlap, prompt_blocks, choice.prefill_cost, choice.decode_cost, mode
        )
        decisions = self.counters.decisions
        decisions[mode] = decisions.get(mode, 0) + 1
        if self.on_decision is not None:
            self.on_decision(res)
        return res

    async def route_wait(self, inp: RouteInput) -> RouteResult:
        """:meth:`route`, but while every worker is busy the request waits in the router queue (in its
        order) and is placed when load drops; AllBusy (RESOURCE_EXHAUSTED) when the queue is full.

        A caller that goes away while waiting leaves the queue, and a placement it can no longer take is
        freed, so no load is left behind.
        """
        if self.queue is None or inp.dry_run:
            return self.route(inp)
        cost = 0.0
        info: Waiting | None = None
        if self.queue.policy == "wspt" and self.ready:
            hashes = self.hashes_for(inp)
            found = self._selector_overlaps(hashes)
            cost = float(len(hashes) - max(found.values(), default=0))
        elif self.queue.policy == "cache-aware" and self.ready and (inp.block_hashes or self.block_size):
            info = Waiting(self.hashes_for(inp), tuple(inp.exclude) + tuple(self._other_roles(inp.phase)))
        try:
            return await self.queue.admit(
                lambda: self.route(inp), cost, release=lambda _res: self._release(inp.request_id), info=info
            )
        except QueueFull as exc:
            raise AllBusy(str(exc)) from None

    def _selector_overlaps(self, hashes: Sequence[int]) -> dict[Hashable, float]:
        if self.config.mode not in ("kv", "approx"):
            return {}
        if self.predicted is not None:
            return self._overlaps_with_predicted(hashes)
        if self.approx is not None:
            return dict(self.approx.overlaps(hashes))
        return dict(self.tiers.overlaps(hashes))

    def _release(self, request_id: str) -> None:
        self.free(request_id)

    def _busy_usage(self, t: RankTable) -> np.ndarray:
        """KV usage per rank as the busy threshold sees it (the threshold on).

        With the cache-aware queue a rank also counts as full (usage +inf) while its engine reports requests
        waiting, and from a placement until its next LoadMetrics: a request still waiting in the engine
        holds no KV blocks, so its usage cannot show it, and without this one wake-up would place every
        waiting request on the first rank to dip under the threshold (what fcfs does), whatever its cache
        holds. So the router queue, where the cache-aware choice is made, is where requests wait, and a rank
        takes the next one when it can start it. Ranks that never reported are never busy, and a mark older
        than NO_ROOM_TTL_S (workers report at least every 100 ms) is dropped, so lost reports never strand
        the queue.
        """
        usage = t.estimated_usage()
        if self.config.queue_policy != "cache-aware" or not self._no_room:
            return usage
        usage = usage.copy()
        stale = self.clock() - NO_ROOM_TTL_S
        for key, since in list(self._no_room.items()):
            if since < stale:
                del self._no_room[key]
                continue
            slot = t.slot_of.get(key)
            if slot is not None:
                usage[slot] = np.inf
        return usage

    def _free_ranks(self) -> np.ndarray | None:
        """Rank slots under the busy threshold (and the queue threshold) now; None when every one is busy."""
        t = self._table()
        cfg = self.config
        free = np.ones(t.n, dtype=np.bool_)
        if cfg.busy_threshold < 1.0:
            free &= ~(self._busy_usage(t) > cfg.busy_threshold)
        if cfg.queue_threshold > 0 and cfg.mode in ("kv", "approx") and self.block_size:
            free &= t.prefill <= cfg.queue_threshold * cfg.max_num_batched_tokens / self.block_size
        return free if free.any() else None

    def _choose_waiting(self, waiting: Sequence[object]) -> int | None:
        """The cache-aware router queue's pick (``waiting`` oldest first), for the ranks that have room now:

        1. the request with the most KV cached *on the device* of such a rank (predicted prefixes included);
        2. among equals, one whose prompt is cached on no busy rank it may use, in any tier: it loses nothing
           by going here, while a request whose prefix waits on a busy rank (on its device, or in its host
           memory or disk) would be recomputed here;
        3. then the oldest (so with nothing cached anywhere this is fcfs).

        None when no waiting request has a rank with room. Host and disk copies do not *rank* waiters by
        their weight: they are not lost by waiting (a device prefix is reused by the next allocation), and
        ranking them (0.75 a block) let long conversations jump the queue while device prefixes were evicted;
        with G2 on, that made TTFT p50 worse than with no G2 (docs/kvbm.md, "Why G2 lost to G1"). Which rank
        a placed request goes to still credits every tier (the selector's cost).

        The age cap is the queue's (queueing.WaitQueue): past it the oldest goes first whatever this says.
        """
        t = self._table()
        if not t.n:
            return 0 if waiting else None  # the attempt fails it clearly (NoWorkers)
        free = self._free_ranks()
        if free is None:
            return None
        best_i, best = None, (-1.0, 0)
        for i, w in enumerate(waiting):
            if not isinstance(w, Waiting):  # queued before the router knew its block size: no overlap known
                if best[0] < 0:
                    best_i, best = i, (0.0, 0)
                continue
            allowed = t.allowed(w.exclude) if w.exclude else np.ones(t.n, dtype=np.bool_)
            ok = free & allowed
            if not ok.any():
                continue  # every rank it may use is busy: it waits, the others may go
            if best[0] > len(w.hashes):
                continue  # its device prefix cannot beat the best so far
            dev = self._best_depth(self._device_overlaps(w.hashes), t, ok)
            busy = allowed & ~free
            elsewhere = busy.any() and self._best_depth(self._selector_overlaps(w.hashes), t, busy) > 0
            score = (dev, 0 if elsewhere else 1)
            if score > best:
                best_i, best = i, score
        return best_i

    @staticmethod
    def _best_depth(found: dict[Hashable, float], t: RankTable, ok: np.ndarray) -> float:
        """The deepest overlap among the ranks where ``ok``."""
        best = 0.0
        for key, depth in found.items():
            slot = t.slot_of.get(key)  # type: ignore[call-overload]
            if slot is not None and ok[slot] and depth > best:
                best = float(depth)
        return best

    def _device_overlaps(self, hashes: Sequence[int]) -> dict[Hashable, float]:
        """Per rank, the prefix depth held on the device (or predicted to be: routed within the TTL)."""
        if self.config.mode not in ("kv", "approx"):
            return {}
        if self.approx is not None:
            return dict(self.approx.overlaps(hashes))
        found: dict[Hashable, float] = dict(self.indexer.overlaps(hashes))
        return found if self.predicted is None else self._deepened_by_predicted(found, hashes)

    def _wake(self) -> None:
        """Load dropped or workers changed: place what waits in the router queue."""
        q = self.queue
        if q is not None and q.has_waiters():
            q.poke()

    # ---- progress ------------------------------------------------------------------------
    def prefill_done(self, request_id: str, output_tokens: int = 0) -> bool:
        ok = self.active.prefill_done(request_id)
        if decision_log.isEnabledFor(logging.DEBUG):
            decision_log.debug("%s", json.dumps({"rid": request_id, "t": time.monotonic(), "prefill_done": ok}))
        if output_tokens:
            self.active.grow(request_id, output_tokens)
        if ok and self.on_active_change is not None:
            self.on_active_change(ActiveChange("prefill_done", request_id))
        self._wake()
        return ok

    def free(self, request_id: str) -> bool:
        ok = self.active.free(request_id)
        if decision_log.isEnabledFor(logging.DEBUG):
            decision_log.debug("%s", json.dumps({"rid": request_id, "t": time.monotonic(), "free": ok}))
        if ok and self.on_active_change is not None:
            self.on_active_change(ActiveChange("freed", request_id))
        self._wake()
        return ok

    def apply_remote(self, change: ActiveChange, router_id: str) -> None:
        """A replica's change to active sequences (never re-published)."""
        if router_id == self.router_id:
            return
        if change.kind == "added":
            if change.instance_id in self.workers:
                self.active.add(
                    change.request_id,
                    (change.instance_id, change.dp_rank),
                    change.prefill_blocks,
                    change.decode_blocks,
                    router_id=router_id,
                )
        elif change.kind == "prefill_done":
            self.active.prefill_done(change.request_id)
            self._wake()
        elif change.kind == "freed":
            self.active.free(change.request_id)
            self._wake()

    def apply_remote_snapshot(self, changes: list[ActiveChange], router_id: str) -> None:
        """A replica's whole active set: replaces what we hold from it (frees we missed included)."""
        if router_id == self.router_id:
            return
        keep = {c.request_id for c in changes}
        for rid, _ in self.active.of_router(router_id):
            if rid not in keep:
                self.active.free(rid)
        for c in changes:
            self.apply_remote(c, router_id)

    def drop_replica(self, router_id: str) -> int:
        """A replica went silent (died): the load it routed is expired here."""
        return 0 if router_id == self.router_id else self.active.drop_router(router_id)

    def set_load(self, key: RankKey, active_blocks: int, total_blocks: int, waiting: int = 0, running: int = 0) -> None:
        """A worker's LoadMetrics: KV usage (the busy threshold) and waiting + running (the tie-break)."""
        if key[0] in self.workers and total_blocks > 0:
            self.kv_usage[key] = active_blocks / total_blocks
            if waiting > 0 and self.config.queue_policy == "cache-aware":
                self._no_room[key] = self.clock()
            else:
                self._no_room.pop(key, None)
            self.reported[key] = waiting + running
            if self._rank_table is not None:
                self._rank_table.set_usage(key, active_blocks / total_blocks)
                self._rank_table.set_reported(key, waiting + running)
            self._wake()

    def housekeeping(self) -> None:
        """Periodic: sweep retired index slots, expire lost sequences and approx entries."""
        if self.indexer.needs_sweep():
            self.indexer.sweep()
        self.tiers.sweep()
        self.active.expire()
        if self.approx is not None:
            self.approx.expire()
        if self.predicted is not None:
            self.predicted.expire()
        self._wake()

    def indexed_blocks(self) -> int:
        return len(self.indexer)
