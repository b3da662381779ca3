"""The router core: workers, index, active load and policy in one plain-Python object.

No grpc and no protobuf here: ``service.py`` adapts the RouterService contract, ``sync.py``
feeds KV events, ``replicas.py`` shares active sequences with other router replicas.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from dynamo_grpc.router.active import ActiveSequences
from dynamo_grpc.router.approx import ApproxIndexer
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.indexer import KvIndexer
from dynamo_grpc.router.policy import AllBusy, Candidate, Choice, NoWorkers, RoundRobin, costs, not_busy, pick
from dynamo_grpc.tokens.block_hash import block_hash_list

log = logging.getLogger(__name__)

RankKey = tuple[str, int]  # (instance_id, dp_rank)

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
    ) -> None:
        config.validate()
        self.config = config
        self.router_id = router_id
        self.on_active_change = on_active_change
        self.rng = random.Random(config.seed)
        self.indexer = KvIndexer(config.max_indexed_blocks)
        self.approx = ApproxIndexer(config.approx_ttl_s, config.max_indexed_blocks)
        self.block_size = config.block_size
        self.active = ActiveSequences(config.block_size or 1, config.active_ttl_s)
        self.workers: dict[str, WorkerInfo] = {}
        #: instance_id -> why it is never routed to (block size mismatch)
        self.refused: dict[str, str] = {}
        #: (instance_id, dp_rank) -> fraction of KV in use, from LoadMetrics
        self.kv_usage: dict[RankKey, float] = {}
        self.ready = config.mode != "kv"
        self.counters = RouterCounters()
        self._rr = RoundRobin()
        self._ranks_cache: tuple[dict[str, WorkerInfo], list[RankKey]] | None = None
        self.on_decision: Callable[[RouteResult], None] | None = None

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
        self._ranks_cache = None
        return accepted

    def remove_worker(self, instance_id: str) -> None:
        """A worker is gone: forget its blocks, load and active sequences."""
        w = self.workers.pop(instance_id, None)
        self._ranks_cache = None
        ranks = w.ranks() if w else [k for k in self.indexer.workers if isinstance(k, tuple) and k[0] == instance_id]
        for key in ranks:
            self.indexer.remove_worker(key)
            self.approx.remove_worker(key)
            self.active.remove_worker(key)
            self.kv_usage.pop(key, None)

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
    def _rank_list(self) -> list[RankKey]:
        cached = self._ranks_cache
        if cached is None or cached[0] is not self.workers or len(cached[0]) != len(self.workers):
            cached = (self.workers, [k for w in self.workers.values() for k in w.ranks()])
            self._ranks_cache = cached
        return cached[1]

    def hashes_for(self, inp: RouteInput) -> list[int]:
        if inp.block_hashes:
            return [int(h) for h in inp.block_hashes]
        if not self.block_size:
            raise NoWorkers("block size unknown: no worker has announced one yet")
        return block_hash_list(inp.token_ids, self.block_size, inp.lora or None)

    def route(self, inp: RouteInput) -> RouteResult:
        """Pick a worker rank. Raises NotReady, NoWorkers, AllBusy, or ValueError (bad input)."""
        if not inp.request_id:
            raise ValueError("request_id is required")
        if not self.ready:
            raise NotReady("router is rebuilding its index from the workers' Replay")
        ranks = self._rank_list()
        if inp.exclude:
            excluded = set(inp.exclude)
            ranks = [k for k in ranks if k[0] not in excluded]
        if not ranks:
            raise NoWorkers(f"no live worker for model {inp.model or self.config.model or '?'}")
        hashes = self.hashes_for(inp)
        mode = self.config.mode
        if mode == "kv":
            overlaps = self.indexer.overlaps(hashes)
        elif mode == "approx":
            overlaps = self.approx.overlaps(hashes)
        else:
            overlaps = {}
        # Only workers with overlap, load or usage differ from the default candidate: build
        # the rest cheaply (this loop is the decision's hot path at 64+ workers).
        per_worker = self.active._per_worker
        usage_of = self.kv_usage
        cands = []
        for key in ranks:
            a = per_worker.get(key)
            usage = usage_of.get(key)
            if usage is None and a is not None:
                kv_blocks = self.workers[key[0]].kv_blocks
                if kv_blocks:
                    usage = (a.prefill_blocks + a.decode_blocks) / kv_blocks
            if a is None:
                cands.append(Candidate(key, overlaps.get(key, 0), 0, 0, usage))
            else:
                cands.append(Candidate(key, overlaps.get(key, 0), a.prefill_blocks, a.decode_blocks, usage))
        cands = not_busy(cands, self.config.busy_threshold)
        prompt_blocks = len(hashes)
        out_blocks = -(-inp.expected_output_tokens // self.block_size) if self.block_size else 0
        decode_new = prompt_blocks + out_blocks
        if mode in ("kv", "approx"):
            choice = pick(
                costs(cands, prompt_blocks, decode_new, self.config.prefill_load_scale),
                self.config.temperature,
                self.rng,
            )
        else:
            c = self._rr.pick(cands) if mode == "round-robin" else self.rng.choice(cands)
            choice = costs([c], prompt_blocks, decode_new, self.config.prefill_load_scale)[0]
        return self._commit(inp, choice, hashes, prompt_blocks, decode_new)

    def _commit(
        self, inp: RouteInput, choice: Choice, hashes: list[int], prompt_blocks: int, decode_new: int
    ) -> RouteResult:
        key = choice.key
        assert isinstance(key, tuple)
        iid, rank = key
        new_prefill = max(prompt_blocks - choice.overlap, 0)
        if not inp.dry_run:
            prompt_tokens = len(inp.token_ids) or prompt_blocks * (self.block_size or 1)
            self.active.add(inp.request_id, key, new_prefill, decode_new, prompt_tokens, self.router_id)
            if self.config.mode == "approx":
                self.approx.record(key, hashes)
            if self.on_active_change is not None:
                self.on_active_change(ActiveChange("added", inp.request_id, iid, rank, new_prefill, decode_new))
        res = RouteResult(
            iid,
            rank,
            self.workers[iid].grpc_address,
            choice.overlap,
            prompt_blocks,
            choice.prefill_cost,
            choice.decode_cost,
            self.config.mode,
        )
        self.counters.decisions[res.mode] = self.counters.decisions.get(res.mode, 0) + 1
        if self.on_decision is not None:
            self.on_decision(res)
        return res

    # ---- progress ------------------------------------------------------------------------
    def prefill_done(self, request_id: str, output_tokens: int = 0) -> bool:
        ok = self.active.prefill_done(request_id)
        if output_tokens:
            self.active.grow(request_id, output_tokens)
        if ok and self.on_active_change is not None:
            self.on_active_change(ActiveChange("prefill_done", request_id))
        return ok

    def free(self, request_id: str) -> bool:
        ok = self.active.free(request_id)
        if ok and self.on_active_change is not None:
            self.on_active_change(ActiveChange("freed", request_id))
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
        elif change.kind == "freed":
            self.active.free(change.request_id)

    def set_load(self, key: RankKey, active_blocks: int, total_blocks: int) -> None:
        if key[0] in self.workers and total_blocks > 0:
            self.kv_usage[key] = active_blocks / total_blocks

    def housekeeping(self) -> None:
        """Periodic: sweep retired index slots, expire lost sequences and approx entries."""
        if self.indexer.needs_sweep():
            self.indexer.sweep()
        if self.approx.index.needs_sweep():
            self.approx.index.sweep()
        self.active.expire()
        self.approx.expire()

    def indexed_blocks(self) -> int:
        return len(self.approx) if self.config.mode == "approx" else len(self.indexer)
