"""The global router's core: one KV Router per worker pool, a pool grid to pick among them, spill-over.

Plain Python (no grpc): ``global_service.py`` adapts RouterService to it and ``global_main.py`` feeds each
pool's Router from discovery and the KV events of that pool's workers only, so a block cached in pool A
never attracts a request to pool B. A request picks its pool by the grid (or pins one); the pool's Router
picks the worker. When the preferred pool cannot take it (every worker above the pool's busy threshold,
no live worker, index not rebuilt) the request spills over to the nearest range that can, and the
decision's reason says so. Update events go to the pool that routed the request.

A pool with ``hold_spill_s`` does not commit a request it is too backed up to take when no other pool
accepts it: the request waits in the global router (bounded by ``max_held``) until a worker of its pool
drops below the backlog or another pool accepts the spill, whichever comes first, and is queued in its pool
after ``hold_spill_s`` (late binding: a long prompt takes the first worker that frees, never a short worker
that a short request is about to need). :class:`Held` tells the caller to wait; ``global_service.py`` retries
on every ``on_change`` (PREFILL_DONE, FREE, a reload) and frees the hold when the client cancels.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from dynamo_grpc.router.pool_config import PoolGrid, PoolSpec, Selection
from dynamo_grpc.router.router import AllBusy, NotReady, NoWorkers, RouteInput, Router, RouteResult

log = logging.getLogger(__name__)

#: RouteRequest.phase as the grid reads it
PHASES = ("aggregated", "prefill", "decode")


class UnknownPool(ValueError):
    """A request pinned a pool this global router does not have (INVALID_ARGUMENT)."""


@dataclass
class PoolDecision:
    result: RouteResult
    pool: str
    reason: str
    spilled_from: str = ""


@dataclass
class PoolCounters:
    decisions: int = 0
    #: requests that preferred this pool and went to another
    spilled_out: int = 0
    #: requests another pool spilled here
    spilled_in: int = 0
    #: requests this pool could not take (busy, empty, not ready) when it was tried
    refusals: int = 0
    #: requests that preferred this pool and were held in the global router (hold_spill_s)
    held: int = 0
    #: held requests queued in this pool when hold_spill_s ran out
    hold_timeouts: int = 0


@dataclass
class PoolState:
    spec: PoolSpec
    router: Router
    counters: PoolCounters
    #: removed from the config: takes no new request, closes once its in-flight requests are freed
    draining: bool = False

    def load(self) -> float:
        """Mean estimated KV use over the pool's worker ranks (LoadMetrics, else the router's own active
        blocks over capacity); NaN when no rank's use is known."""
        r = self.router
        vals: list[float] = []
        for w in r.workers.values():
            for key in w.ranks():
                use = r.kv_usage.get(key)
                if use is None and w.kv_blocks > 0:
                    a = r.active.load(key)
                    use = (a.prefill_blocks + a.decode_blocks) / w.kv_blocks
                if use is not None:
                    vals.append(use)
        return sum(vals) / len(vals) if vals else math.nan

    def check_prefill_backlog(self) -> None:
        """PrefillBusy when every usable worker rank has more pending prefill tokens than the pool allows."""
        cap = self.spec.busy_prefill_tokens
        r = self.router
        if cap is None or not r.block_size:
            return
        ranks = [k for w in r.workers.values() if r.usable(w.instance_id) for k in w.ranks()]
        if ranks and all(r.active.load(k).prefill_blocks * r.block_size > cap for k in ranks):
            raise PrefillBusy(f"every worker above {cap} pending prefill tokens")

    def check_accepts_spill(self) -> None:
        """SpillRefused when the prompt tokens routed to the pool and not yet prefilled (all workers together)
        exceed accept_spill_prefill_tokens: a spilled long prefill may borrow an idle pool, never queue in it."""
        cap = self.spec.accept_spill_prefill_tokens
        r = self.router
        if cap is None or not r.block_size:
            return
        pending = sum(r.active.load(k).prefill_blocks for w in r.workers.values() for k in w.ranks()) * r.block_size
        if pending > cap:
            raise SpillRefused(f"{pending} pending prefill tokens, above {cap}")


class PrefillBusy(AllBusy):
    """Every worker of a pool has more pending prefill tokens than the pool's busy_prefill_tokens."""


class SpillRefused(PrefillBusy):
    """A pool takes spilled requests only while its pending prefill tokens are at most accept_spill_prefill_tokens."""


class Held(Exception):
    """Route again when the pools change (``GlobalRouter.on_change``) or after ``wait_s`` at the latest."""

    def __init__(self, reason: str, wait_s: float) -> None:
        super().__init__(reason)
        self.wait_s = wait_s


@dataclass
class HeldRequest:
    pool: str
    since: float


def _why(name: str, spec: PoolSpec, exc: Exception, phase: str = "aggregated") -> str:
    if isinstance(exc, SpillRefused):
        return f"pool {name} takes no spill-over ({exc})"
    if isinstance(exc, PrefillBusy):
        return f"pool {name} busy (every worker above {spec.busy_prefill_tokens} pending prefill tokens)"
    if isinstance(exc, AllBusy):
        return f"pool {name} busy (every worker above {spec.busy_threshold:g} KV use)"
    if isinstance(exc, NotReady):
        return f"pool {name} not ready (rebuilding its index)"
    return f"pool {name} has no live worker" + ("" if phase == "aggregated" else f" serving {phase}")


class GlobalRouter:
    """Routes among pools; ``make_router(spec)`` builds the KV Router of a new pool."""

    def __init__(
        self,
        grid: PoolGrid,
        make_router: Callable[[PoolSpec], Router],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.grid = grid
        self.make_router = make_router
        self.clock = clock
        self.pools: dict[str, PoolState] = {}
        #: request id -> the pool that routed it (its Updates go there)
        self.owner: dict[str, str] = {}
        #: requests waiting in the global router, oldest first (hold_spill_s)
        self.held: OrderedDict[str, HeldRequest] = OrderedDict()
        #: called after every event that may let a held request go (PREFILL_DONE, FREE, a reload)
        self.on_change: Callable[[], None] | None = None
        self.apply(grid)

    # ---- configuration -------------------------------------------------------------------------
    def apply(self, grid: PoolGrid) -> tuple[list[str], list[str]]:
        """Adopt a (re)loaded grid: new pools start, removed ones drain, kept ones take the new threshold.

        Returns (added, draining) pool names."""
        added, draining = [], []
        for name, spec in grid.pools.items():
            ps = self.pools.get(name)
            if ps is None:
                self.pools[name] = PoolState(spec, self.make_router(spec), PoolCounters())
                added.append(name)
            else:
                ps.spec, ps.draining = spec, False
                ps.router.config.busy_threshold = spec.busy_threshold
        for name, ps in self.pools.items():
            if name not in grid.pools and not ps.draining:
                ps.draining = True
                draining.append(name)
        self.grid = grid
        self._changed()
        return added, draining

    def drained(self) -> list[str]:
        """Remove draining pools with nothing in flight; returns their names (their nodes can close)."""
        done = [n for n, ps in self.pools.items() if ps.draining and len(ps.router.active) == 0]
        for n in done:
            del self.pools[n]
        return done

    def serving(self) -> list[str]:
        return [n for n, ps in self.pools.items() if not ps.draining]

    # ---- routing --------------------------------------------------------------------------------
    def lengths(self, inp: RouteInput) -> tuple[int, int]:
        """(input tokens, context tokens = input + expected output) of a request."""
        n = len(inp.token_ids)
        if not n and inp.block_hashes:
            bs = next((ps.router.block_size for ps in self.pools.values() if ps.router.block_size), 0)
            n = len(inp.block_hashes) * bs
        return n, n + inp.expected_output_tokens

    def select(self, inp: RouteInput, phase: str, pool: str = "") -> Selection:
        if phase not in PHASES:
            raise ValueError(f"phase {phase!r}: expected one of {', '.join(PHASES)}")
        if pool:
            if pool not in self.pools or self.pools[pool].draining:
                raise UnknownPool(f"pool {pool!r} is not configured (pools: {', '.join(self.serving())})")
            return Selection(pool, f"pinned to pool {pool} by the request")
        n_in, n_ctx = self.lengths(inp)
        return self.grid.select(phase, n_in, n_ctx)

    def route(self, inp: RouteInput, phase: str = "aggregated", pool: str = "", hold: bool = False) -> PoolDecision:
        """Pick a pool, then a worker in it whose role serves ``phase`` (a prefill prefers the pool's
        ``role=prefill`` workers, as in ``dynamo-grpc router``). Raises UnknownPool / ValueError (bad input), else
        the last pool's AllBusy (any pool tried was busy), NotReady or NoWorkers, naming every pool tried.

        ``hold``: the caller can wait; raise :class:`Held` instead of queueing the request in a backed-up pool
        whose ``hold_spill_s`` has not run out for it (call again with the same request id; :meth:`unhold`
        when giving up). Without it a request held before is queued as usual and its hold ends."""
        if not inp.request_id:
            raise ValueError("request_id is required")
        try:
            return self._route(inp, phase, pool, hold)
        except Held:
            raise
        except Exception:
            self.unhold(inp.request_id)
            raise

    def _route(self, inp: RouteInput, phase: str, pool: str, hold: bool) -> PoolDecision:
        sel = self.select(inp, phase, pool)
        rid = inp.request_id
        home = self.pools.get(sel.pool)
        hold_s = home.spec.hold_spill_s if home is not None and not pool else None
        held = self.held.get(rid)
        waited = self.clock() - held.since if held is not None else 0.0
        hold = hold and not inp.dry_run and hold_s is not None
        if hold and held is None and hold_s is not None and self._holding(sel.pool):
            # FIFO: a new request does not overtake the ones already waiting for the same pool
            self._hold(rid, sel, hold_s, "requests held before it")
        if inp.phase != phase:
            inp = replace(inp, phase=phase)
        refusals: list[tuple[str, Exception]] = []
        for name in (sel.pool, *sel.spill_order):
            ps = self.pools.get(name)
            if ps is None or ps.draining:
                continue
            try:
                ps.check_prefill_backlog()
                if name != sel.pool:
                    ps.check_accepts_spill()
                res = ps.router.route(inp)
            except (AllBusy, NoWorkers, NotReady) as exc:
                ps.counters.refusals += 1
                refusals.append((name, exc))
                continue
            return self._ended_hold(self._decided(inp, sel, name, res, refusals), rid)
        if (
            hold
            and hold_s is not None
            and waited < hold_s
            and refusals
            and isinstance(refusals[0][1], PrefillBusy)
            and refusals[0][0] == sel.pool
        ):
            whys = "; ".join(_why(n, self.pools[n].spec, e, inp.phase) for n, e in refusals)
            self._hold(rid, sel, hold_s - waited, whys)
        timed_out = held is not None
        # a prefill backlog is a TTFT preference, not a capacity limit: when no pool has headroom the request
        # queues in the first pool that was only backed up (the preferred one when it was)
        backlogged = next((n for n, e in refusals if isinstance(e, PrefillBusy)), None)
        if backlogged is not None:
            try:
                res = self.pools[backlogged].router.route(inp)
            except (AllBusy, NoWorkers, NotReady) as exc:
                refusals.append((backlogged, exc))
            else:
                d = self._decided(inp, sel, backlogged, res, refusals, queued=True)
                d.reason += f"; no pool has headroom: queued in pool {backlogged}"
                if timed_out and home is not None:
                    home.counters.hold_timeouts += 1
                return self._ended_hold(d, rid)
        whys = "; ".join(_why(n, self.pools[n].spec, e, inp.phase) for n, e in refusals)
        kinds = [type(e) for _, e in refusals]
        err: type[Exception] = AllBusy if AllBusy in kinds else NotReady if NotReady in kinds else NoWorkers
        raise err(f"{sel.reason}; {whys}" + ("" if sel.spill_order or pool else " (spill-over off)"))

    def _decided(
        self,
        inp: RouteInput,
        sel: Selection,
        name: str,
        res: RouteResult,
        refusals: list[tuple[str, Exception]],
        queued: bool = False,
    ) -> PoolDecision:
        ps = self.pools[name]
        ps.counters.decisions += 1
        reason, spilled_from = sel.reason, ""
        whys = "; ".join(_why(n, self.pools[n].spec, e, inp.phase) for n, e in refusals)
        if name != sel.pool:
            spilled_from = sel.pool
            home = self.pools.get(sel.pool)
            if home is not None:
                home.counters.spilled_out += 1
            ps.counters.spilled_in += 1
            reason = f"{sel.reason}; {whys}; spilled over to pool {name}"
            if ps.spec.accept_spill_prefill_tokens is not None and not queued:
                reason += f" (at most {ps.spec.accept_spill_prefill_tokens} prefill tokens pending there)"
        elif whys:
            reason = f"{sel.reason}; {whys}"
        if not inp.dry_run:
            self.owner[inp.request_id] = name
        return PoolDecision(res, name, reason, spilled_from)

    # ---- holding --------------------------------------------------------------------------------
    def _holding(self, pool: str) -> bool:
        return any(h.pool == pool for h in self.held.values())

    def _hold(self, rid: str, sel: Selection, wait_s: float, why: str) -> None:
        """Register (or keep) ``rid`` as held and raise Held; past max_held the request is not held."""
        if rid not in self.held:
            if len(self.held) >= self.grid.max_held:
                return
            self.held[rid] = HeldRequest(sel.pool, self.clock())
            self.pools[sel.pool].counters.held += 1
        raise Held(f"{sel.reason}; {why}; held in the global router (at most {wait_s:.3g} s more)", wait_s)

    def _ended_hold(self, d: PoolDecision, rid: str) -> PoolDecision:
        """A held request was routed: its hold ends and the reason says how long it waited."""
        h = self.held.pop(rid, None)
        if h is not None:
            d.reason += f"; held {self.clock() - h.since:.3g} s in the global router"
        return d

    def unhold(self, request_id: str) -> bool:
        """Forget a held request (its client gave up, or it failed); True if it was held."""
        return self.held.pop(request_id, None) is not None

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # ---- progress -------------------------------------------------------------------------------
    def prefill_done(self, request_id: str, output_tokens: int = 0) -> bool:
        ps = self.pools.get(self.owner.get(request_id, ""))
        ok = ps is not None and ps.router.prefill_done(request_id, output_tokens)
        if ok:
            self._changed()
        return ok

    def free(self, request_id: str) -> bool:
        ps = self.pools.get(self.owner.pop(request_id, ""))
        ok = ps is not None and ps.router.free(request_id)
        if ok:
            self._changed()
        return ok

    def housekeeping(self) -> None:
        """Forget owners of requests their pool has expired (a FREE that never came)."""
        for rid, name in list(self.owner.items()):
            ps = self.pools.get(name)
            if ps is None or rid not in ps.router.active:
                del self.owner[rid]
