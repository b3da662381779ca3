"""The global router's pool grid (``pools.yaml``): one typed object, validated with errors that name the fix.

Two grids select a pool from a request's length (docs/global-router.md):

- ``input_tokens: [lo, hi]`` puts a pool in the *input* grid, which serves prefill requests and aggregated
  ones (a worker that runs both phases): the request's prompt length picks it;
- ``context_tokens: [lo, hi]`` puts it in the *decode* grid: prompt + expected output tokens picks it.

Ranges are ``[lo, hi)``, ``hi: null`` is open-ended; a grid in use must cover ``[0, ∞)`` with no gap and no
overlap. A phase whose grid is empty goes to ``default_pool``. ``ttft_target_s`` / ``itl_target_s`` are
metadata for the planner, not selection rules. ``busy_threshold`` (default 0.9, per pool or for all) is the
estimated KV use above which a worker is busy; a pool whose every worker is busy spills over to the
nearest range with headroom (``spill_over: false`` turns that off); ``busy_prefill_tokens`` also calls a pool
busy on its prefill backlog, and ``accept_spill_prefill_tokens`` makes a pool take spilled requests only while
it is nearly idle (one-directional spill: long prompts borrow an idle short pool, never queue in it).
``hold_spill_s`` makes a backed-up pool's requests wait in the global router (at most ``max_held`` of them
in all) for the first worker that frees, in the pool or one that accepts the spill, instead of queueing at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dynamo_grpc.discovery.pools import DEFAULT_POOL, pool_name_problem

#: a pool is busy when every one of its workers is above this estimated KV use (on by default for pools)
DEFAULT_BUSY_THRESHOLD = 0.9

INPUT = "input"
DECODE = "decode"
AXIS_FIELD = {INPUT: "input_tokens", DECODE: "context_tokens"}
_TOP_KEYS = {"pools", "default_pool", "busy_threshold", "spill_over", "max_held"}
#: at most this many requests wait in the global router at once (hold_spill_s); past it a request queues at once
DEFAULT_MAX_HELD = 64
_POOL_KEYS = {
    "name",
    "input_tokens",
    "context_tokens",
    "ttft_target_s",
    "itl_target_s",
    "busy_threshold",
    "busy_prefill_tokens",
    "accept_spill_prefill_tokens",
    "hold_spill_s",
}


class PoolConfigError(ValueError):
    """The config is invalid; the message lists every problem found, each naming where it is."""


@dataclass(frozen=True)
class TokenRange:
    """``[lo, hi)`` tokens; ``hi`` None is open-ended."""

    lo: int
    hi: int | None

    def __contains__(self, n: object) -> bool:
        return isinstance(n, int) and n >= self.lo and (self.hi is None or n < self.hi)

    def __str__(self) -> str:
        return f"[{self.lo},{'∞' if self.hi is None else self.hi})"

    @property
    def end(self) -> float:
        return math.inf if self.hi is None else self.hi


@dataclass(frozen=True)
class PoolSpec:
    name: str
    input_tokens: TokenRange | None = None
    context_tokens: TokenRange | None = None
    #: planner metadata (seconds); not used to select
    ttft_target_s: float | None = None
    itl_target_s: float | None = None
    busy_threshold: float = DEFAULT_BUSY_THRESHOLD
    #: a worker with more prompt tokens routed and not yet prefilled than this is busy too (None: off);
    #: the TTFT-side signal: a pool backed up with prefill work spills over before its KV fills
    busy_prefill_tokens: int | None = None
    #: take a request another pool spilled only while the pool's workers together have at most this many
    #: prompt tokens routed and not yet prefilled (None: whenever it is not busy); low on a short pool, long
    #: prompts spill into it only while it idles
    accept_spill_prefill_tokens: int | None = None
    #: when every worker is above busy_prefill_tokens and no pool accepts the spill, hold the request in the
    #: global router up to this many seconds for the first worker that frees (here, or a pool that then accepts
    #: it) before queueing it here (None: queue at once); needs busy_prefill_tokens
    hold_spill_s: float | None = None

    def range_on(self, axis: str) -> TokenRange | None:
        return self.input_tokens if axis == INPUT else self.context_tokens


@dataclass(frozen=True)
class Selection:
    """The preferred pool for a request, the order to spill over in, and why."""

    pool: str
    reason: str
    #: the other pools to try, nearest range first, the default pool last (empty with spill-over off)
    spill_order: tuple[str, ...] = ()


@dataclass
class PoolGrid:
    pools: dict[str, PoolSpec]
    default_pool: str = DEFAULT_POOL
    spill_over: bool = True
    #: the most requests held at once over all pools (hold_spill_s)
    max_held: int = DEFAULT_MAX_HELD
    #: axis -> pool names sorted by range start
    grids: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for axis in (INPUT, DECODE):
            members = [p for p in self.pools.values() if p.range_on(axis) is not None]
            self.grids[axis] = [p.name for p in sorted(members, key=lambda p: p.range_on(axis).lo)]  # type: ignore[union-attr]

    def axis_for(self, phase: str) -> str:
        return DECODE if phase == "decode" else INPUT

    def select(self, phase: str, input_tokens: int, context_tokens: int) -> Selection:
        """The pool a request of ``phase`` ("aggregated" | "prefill" | "decode") prefers."""
        axis = self.axis_for(phase)
        names = self.grids[axis]
        n = context_tokens if axis == DECODE else input_tokens
        what = "context" if axis == DECODE else "input"
        if not names:
            return Selection(
                self.default_pool,
                f"no {AXIS_FIELD[axis]} pools configured -> default pool {self.default_pool}",
                (),
            )
        for i, name in enumerate(names):
            rng = self.pools[name].range_on(axis)
            assert rng is not None
            if n in rng:
                order: list[str] = []
                if self.spill_over:
                    for d in range(1, len(names)):  # nearest neighbours first; the longer side first on a tie
                        order += [names[j] for j in (i + d, i - d) if 0 <= j < len(names)]
                    if self.default_pool not in order and self.default_pool != name:
                        order.append(self.default_pool)
                return Selection(name, f"{what} {n} tokens in {rng} -> pool {name}", tuple(order))
        raise AssertionError(f"{AXIS_FIELD[axis]} grid does not cover {n}")  # validated: grids cover [0, inf)

    def describe(self) -> list[str]:
        """One line per pool, for the start-up log."""
        out = []
        for p in self.pools.values():
            parts = [
                f"input {p.input_tokens}" if p.input_tokens else "",
                f"context {p.context_tokens}" if p.context_tokens else "",
            ]
            where = ", ".join(x for x in parts if x) or "pinned/default only"
            dflt = " (default)" if p.name == self.default_pool else ""
            busy = f"busy above {p.busy_threshold:g} KV use"
            if p.busy_prefill_tokens is not None:
                busy += f" or {p.busy_prefill_tokens} pending prefill tokens"
            if p.accept_spill_prefill_tokens is not None:
                busy += f"; takes spill-over while at most {p.accept_spill_prefill_tokens} prefill tokens are pending"
            if p.hold_spill_s is not None:
                busy += f"; holds a request it is too busy for up to {p.hold_spill_s:g} s (max_held {self.max_held})"
            out.append(f"pool {p.name}{dflt}: {where}; {busy}")
        return out


def _range(raw: object, where: str, problems: list[str]) -> TokenRange | None:
    if raw is None:
        return None
    if not isinstance(raw, (list, tuple)) or len(raw) != 2:
        problems.append(f"{where}: expected [lo, hi] (hi null for no upper bound), got {raw!r}")
        return None
    lo, hi = raw
    if isinstance(lo, bool) or not isinstance(lo, int) or lo < 0:
        problems.append(f"{where}: lo must be an integer >= 0, got {lo!r}")
        return None
    if hi is not None and (isinstance(hi, bool) or not isinstance(hi, int) or hi <= lo):
        problems.append(f"{where}: hi must be an integer > lo ({lo}) or null, got {hi!r}")
        return None
    return TokenRange(lo, hi)


def _number(raw: object, where: str, problems: list[str], lo: float, hi: float, lo_open: bool = True) -> float | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        problems.append(f"{where}: expected a number, got {raw!r}")
        return None
    if (raw <= lo if lo_open else raw < lo) or raw > hi:
        problems.append(f"{where}: must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {raw!r}")
        return None
    return float(raw)


def _tokens(raw: dict[Any, Any], key: str, where: str, problems: list[str]) -> int | None:
    """A token count key of a pool: a positive integer, or null (off)."""
    v = raw.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
        problems.append(f"{where}: {key}: expected a positive integer or null, got {v!r}")
        return None
    return v


def _coverage(axis: str, specs: list[PoolSpec], problems: list[str]) -> None:
    """A grid in use covers [0, inf) exactly: report each overlap and each gap."""
    members = sorted((p for p in specs if p.range_on(axis) is not None), key=lambda p: p.range_on(axis).lo)  # type: ignore[union-attr]
    if not members:
        return
    key = AXIS_FIELD[axis]
    covered_to: float = 0
    prev = ""
    for p in members:
        r = p.range_on(axis)
        assert r is not None
        if r.lo < covered_to:
            end = "∞" if covered_to == math.inf else int(min(covered_to, r.end))
            problems.append(f"{key}: pools {prev} and {p.name} overlap on [{r.lo},{end})")
        elif r.lo > covered_to:
            problems.append(f"{key}: no pool covers [{int(covered_to)},{r.lo}) (ranges must leave no gap)")
        if r.end > covered_to:
            covered_to, prev = r.end, p.name
    if covered_to != math.inf:
        problems.append(f"{key}: no pool covers [{int(covered_to)},∞) (give the last range hi: null)")


def parse_pool_config(data: object, source: str = "pools config") -> PoolGrid:
    """A validated PoolGrid from parsed YAML; PoolConfigError lists every problem."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise PoolConfigError(f"{source}: expected a mapping with a 'pools' list, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - _TOP_KEYS)
    if unknown:
        problems.append(f"unknown key(s) {', '.join(unknown)} (expected {', '.join(sorted(_TOP_KEYS))})")
    busy_all = _number(data.get("busy_threshold", DEFAULT_BUSY_THRESHOLD), "busy_threshold", problems, 0.0, 1.0)
    spill = data.get("spill_over", True)
    if not isinstance(spill, bool):
        problems.append(f"spill_over: expected true or false, got {spill!r}")
        spill = True
    raw_pools = data.get("pools")
    if not isinstance(raw_pools, list) or not raw_pools:
        problems.append("pools: expected a non-empty list of pools (each with a name)")
        raw_pools = []
    specs: list[PoolSpec] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_pools):
        where = f"pools[{i}]"
        if not isinstance(raw, dict):
            problems.append(f"{where}: expected a mapping with a name, got {raw!r}")
            continue
        name = raw.get("name")
        bad_name = pool_name_problem(name)
        if bad_name is not None:
            problems.append(f"{where}: {bad_name}")
            continue
        assert isinstance(name, str)
        where = f"pool {name}"
        if name in seen:
            problems.append(f"{where}: defined twice")
            continue
        seen.add(name)
        extra = sorted(set(map(str, raw)) - _POOL_KEYS)
        if extra:
            problems.append(f"{where}: unknown key(s) {', '.join(extra)} (expected {', '.join(sorted(_POOL_KEYS))})")
        inp = _range(raw.get("input_tokens"), f"{where}: input_tokens", problems)
        ctx = _range(raw.get("context_tokens"), f"{where}: context_tokens", problems)
        ttft = _number(raw.get("ttft_target_s"), f"{where}: ttft_target_s", problems, 0.0, math.inf)
        itl = _number(raw.get("itl_target_s"), f"{where}: itl_target_s", problems, 0.0, math.inf)
        if ttft is not None and raw.get("input_tokens") is None:
            problems.append(f"{where}: ttft_target_s needs input_tokens (a TTFT target is for the input grid)")
        if itl is not None and raw.get("context_tokens") is None:
            problems.append(f"{where}: itl_target_s needs context_tokens (an ITL target is for the decode grid)")
        busy = _number(raw.get("busy_threshold"), f"{where}: busy_threshold", problems, 0.0, 1.0)
        threshold = busy if busy is not None else busy_all if busy_all is not None else DEFAULT_BUSY_THRESHOLD
        prefill_cap = _tokens(raw, "busy_prefill_tokens", where, problems)
        accept_cap = _tokens(raw, "accept_spill_prefill_tokens", where, problems)
        hold_s = _number(raw.get("hold_spill_s"), f"{where}: hold_spill_s", problems, 0.0, 3600.0)
        if hold_s is not None and prefill_cap is None:
            problems.append(f"{where}: hold_spill_s needs busy_prefill_tokens (the backlog that makes it hold)")
        specs.append(PoolSpec(name, inp, ctx, ttft, itl, threshold, prefill_cap, accept_cap, hold_s))
    max_held = data.get("max_held", DEFAULT_MAX_HELD)
    if isinstance(max_held, bool) or not isinstance(max_held, int) or max_held < 0:
        problems.append(f"max_held: expected an integer >= 0, got {max_held!r}")
        max_held = DEFAULT_MAX_HELD
    default = data.get("default_pool", DEFAULT_POOL)
    if specs and default not in seen:
        problems.append(f"default_pool: {default!r} is not one of the pools ({', '.join(p.name for p in specs)})")
    for axis in (INPUT, DECODE):
        _coverage(axis, specs, problems)
    if problems:
        raise PoolConfigError(f"{source}: " + "; ".join(problems))
    return PoolGrid({p.name: p for p in specs}, str(default), bool(spill), max_held)


def load_pool_config(path: str | Path) -> PoolGrid:
    """Read and validate a pools YAML file; PoolConfigError names the file and every problem."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise PoolConfigError(f"{p}: cannot read pools config: {e.strerror or e}") from None
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PoolConfigError(f"{p}: not valid YAML: {e}") from None
    return parse_pool_config(data, str(p))
