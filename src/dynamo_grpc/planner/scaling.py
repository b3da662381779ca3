"""Replicas from a profile, a load and the SLA targets: the planner's arithmetic, with no I/O (docs/planner.md).

Prefill: a replica serves prompts one batch after another, so a queue forms in front of it. With service time
``S`` (the profiled TTFT at the ISL, times the prefill correction) the mean TTFT of an M/D/1 queue at utilisation
``rho`` is ``S + rho*S / (2*(1 - rho))``; keeping it within the target ``T`` caps the utilisation at
``rho_max = 2*(T - S) / (2*T - S)``. One replica then carries ``rho_max * isl / S`` prompt tokens/s and
``prefill_need = rate * isl / that``.

Decode: the profile's highest-throughput concurrency whose ITL (times the decode correction) meets the target,
at the context ``isl + osl/2`` a stream holds on average: ``decode_need = rate * osl / tokens_per_s``.

Aggregated workers do both: their prefill steps stall the streams they decode, so the decode must meet a tighter
ITL (``aggregated_need``). Replicas are ``ceil(need)``, clamped to the pool's bounds and the total budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dynamo_grpc.planner.profile import Profile

PREFILL, DECODE, AGG = "prefill", "decode", "worker"
_EPS = 1e-9


@dataclass(frozen=True, slots=True)
class Load:
    """Traffic over one adjustment interval: requests/s and mean input/output tokens per request."""

    rate: float
    isl: float
    osl: float


@dataclass(frozen=True, slots=True)
class Targets:
    ttft_s: float = 0.5
    itl_s: float = 0.05


@dataclass(frozen=True, slots=True)
class Bounds:
    min: int = 1
    max: int = 8


def prefill_utilisation_limit(service_s: float, target_s: float) -> float:
    """Highest utilisation whose M/D/1 mean TTFT stays within ``target_s`` (0 when one prompt alone is too slow)."""
    if service_s >= target_s:
        return 0.0
    return 2.0 * (target_s - service_s) / (2.0 * target_s - service_s)


def expected_ttft_s(service_s: float, rho: float) -> float:
    """M/D/1 mean time in system; inf at or beyond saturation."""
    if rho >= 1.0:
        return math.inf
    return service_s + rho * service_s / (2.0 * (1.0 - rho))


def prefill_need(profile: Profile, load: Load, targets: Targets, correction: float = 1.0) -> float:
    """Prefill replicas (fractional) for ``load``; inf when the TTFT target is out of reach at this ISL."""
    if load.rate <= 0:
        return 0.0
    isl = max(load.isl, 1.0)
    service = profile.ttft_s(isl) * correction
    rho = prefill_utilisation_limit(service, targets.ttft_s)
    if rho <= 0:
        return math.inf
    per_replica = rho * isl / service
    return load.rate * isl / per_replica


def decode_need(profile: Profile, load: Load, targets: Targets, correction: float = 1.0) -> float:
    """Decode replicas (fractional) for ``load``; inf when even one stream misses the ITL target."""
    if load.rate <= 0 or load.osl <= 0:
        return 0.0
    tokens_per_s, _ = profile.decode_capacity(load.isl + load.osl / 2.0, targets.itl_s / correction)
    if tokens_per_s <= 0:
        return math.inf
    return load.rate * load.osl / tokens_per_s


def prefill_busy(profile: Profile, load: Load, correction: float = 1.0) -> float:
    """Seconds of prefill per second the load brings, over all replicas: ``rate * S`` (``S``: one prompt's
    profiled TTFT at the ISL, times the correction)."""
    if load.rate <= 0:
        return 0.0
    return load.rate * profile.ttft_s(max(load.isl, 1.0)) * correction


def aggregated_need(
    profile: Profile, load: Load, targets: Targets, c_prefill: float = 1.0, c_decode: float = 1.0
) -> float:
    """Aggregated replicas (fractional): the fewest ``n`` whose decode keeps up while it shares each worker with
    prefill, and never fewer than the prefill need.

    A worker that also prefills spends ``rho = prefill_busy / n`` of its time in prefill steps, and every stream it
    decodes waits through them: streams see ``ITL_decode / (1 - rho)`` and get ``(1 - rho)`` of the decode
    throughput. So the decode runs at the profile's best point within ``T_itl * (1 - rho) / c_decode`` and ``n``
    must satisfy ``rate * osl / n <= (1 - rho) * tokens_per_s``; found by bisection (the left side falls and the
    right side grows with ``n``). Summing the two phases' needs, the first rule, missed the stretched ITL: the
    profile rated a worker of the bench at 1.6 req/s of decode where it carries about 1.2 with its prefills.

    ``rho`` uses the profiled prefill time, not times ``c_prefill``: that correction is learnt from TTFT, which on
    an aggregated worker also holds the wait for the decode step in flight and the frontend's own time; neither
    occupies the worker, so neither stretches its streams (the bench learnt ``c_prefill`` 1.3-1.5 at the base rate,
    and the stretch it added sized the peak for a fifth worker where four meet it)."""
    if load.rate <= 0:
        return 0.0
    p = prefill_need(profile, load, targets, c_prefill)
    if math.isinf(p) or load.osl <= 0:
        return p
    busy = prefill_busy(profile, load)
    ctx = load.isl + load.osl / 2.0
    demand = load.rate * load.osl

    def short(n: float) -> bool:
        rho = busy / n
        if rho >= 1.0:
            return True
        tokens_per_s, _ = profile.decode_capacity(ctx, targets.itl_s * (1.0 - rho) / c_decode)
        return demand / n > (1.0 - rho) * tokens_per_s

    lo = max(p, busy)
    if not short(lo):
        return lo
    hi = max(2.0 * lo, 1.0)
    while short(hi):
        hi *= 2.0
        if hi > 1e6:
            return math.inf
    for _ in range(60):
        mid = (lo + hi) / 2.0
        if short(mid):
            lo = mid
        else:
            hi = mid
    return hi


def replicas_for(need: float, bounds: Bounds) -> int:
    """``ceil(need)`` within the pool's bounds (an unreachable target asks for the maximum)."""
    if math.isinf(need):
        return bounds.max
    return max(bounds.min, min(bounds.max, math.ceil(need - _EPS)))


def replicas_with_slack(need: float, have: int, bounds: Bounds, slack: float) -> int:
    """``replicas_for(need)``, except that a need within ``have * (1 + slack)`` keeps the ``have`` already serving
    (fractional-need hysteresis, docs/planner.md): the workers there absorb being up to ``slack`` over their rating
    (at 0.05: a need of 4.2 on 4 workers, 1.05 on one) instead of buying a whole worker for the intervals its
    scale-down streak then takes. Relative, not a fixed fraction of a replica: 0.2 of a replica is 5 % on four
    workers but 20 % on one (measured: a lone worker kept at a need of 1.14 missed 3 of the bench's tail requests).
    A pool with no worker still gets one."""
    want = replicas_for(need, bounds)
    if have >= max(1, bounds.min) and want > have and need <= have * (1.0 + slack):
        return have
    return want


def fit_budget(replicas: dict[str, int], bounds: dict[str, Bounds], budget: int | None) -> dict[str, int]:
    """Take replicas away, one at a time from the pool furthest above its minimum, until the total fits."""
    out = dict(replicas)
    if budget is None:
        return out
    while sum(out.values()) > budget:
        spare = {p: n - bounds[p].min for p, n in out.items() if n > bounds[p].min}
        if not spare:
            break  # the minimums alone exceed the budget; the CLI refuses that configuration up front
        pool = max(spare, key=lambda p: (spare[p], p))
        out[pool] -= 1
    return out


def needs(
    profile: Profile, load: Load, targets: Targets, corrections: dict[str, float], pools: list[str]
) -> dict[str, float]:
    """Fractional replicas per pool: ``prefill``/``decode`` (disaggregated) or ``worker`` (aggregated)."""
    c_p, c_d = corrections.get(PREFILL, 1.0), corrections.get(DECODE, 1.0)
    out: dict[str, float] = {}
    for pool in pools:
        if pool == PREFILL:
            out[pool] = prefill_need(profile, load, targets, c_p)
        elif pool == DECODE:
            out[pool] = decode_need(profile, load, targets, c_d)
        else:
            out[pool] = aggregated_need(profile, load, targets, c_p, c_d)
    return out


class Hysteresis:
    """Scale up at once; scale down only after ``down_after`` decisions in a row asked for fewer replicas,
    and then only to the largest of the last ``down_after`` asks (a brief dip never sheds capacity the next
    interval needs).

    The streak of low asks survives a scale-down: after a ramp the load falls over several intervals, and each
    further step down should come with the next low ask, not wait for a new streak (that wait kept a fleet sized
    for the peak through two more intervals). Any ask at or above the current count ends the streak."""

    def __init__(self, down_after: int = 2) -> None:
        if down_after < 1:
            raise ValueError("down_after must be >= 1")
        self.down_after = down_after
        self._lower: dict[str, list[int]] = {}

    def reset(self, pool: str) -> None:
        """End the pool's streak of low asks (a surge just found it short: the asks before it were wrong)."""
        self._lower.pop(pool, None)

    def apply(self, current: dict[str, int], desired: dict[str, int]) -> dict[str, int]:
        out: dict[str, int] = {}
        for pool, want in desired.items():
            have = current.get(pool, 0)
            if want >= have:
                self._lower.pop(pool, None)
                out[pool] = want
                continue
            asks = self._lower.setdefault(pool, [])
            asks.append(want)
            del asks[: -self.down_after]
            out[pool] = min(have, max(asks)) if len(asks) >= self.down_after else have
        return out


#: a between-interval check acts only on a window with at least this many arrivals: fewer is Poisson noise
#: (10 arrivals: +-30 %), and a burst at the base rate must not buy workers
SURGE_MIN_REQUESTS = 10
#: the window's rate must overload a pool by this many replicas' worth before it grows on the rate alone
SURGE_MARGIN = 0.5


#: a fresh short window whose rate is at least this many times the interval's mean says the load is still rising
RISE_FACTOR = 1.1
#: on a rising load an interval decision sizes for this many replicas more than the forecast needs
RISE_HEADROOM = 0.5


def rising(window_rate: float, window_arrivals: float, interval_rate: float) -> bool:
    """The load is still climbing at the decision: the last short window (``SURGE_MIN_REQUESTS`` arrivals at
    least: fewer is Poisson noise) ran ``RISE_FACTOR`` above the interval's mean rate."""
    return window_arrivals >= SURGE_MIN_REQUESTS and window_rate >= RISE_FACTOR * interval_rate > 0


def extrapolate(old_rate: float, old_age_s: float, new_rate: float, new_age_s: float) -> float:
    """The rate now on the line through two windows' mean rates, each placed at its centre (``*_age_s`` seconds
    ago, the old one further back): ``new + (new - old) * new_age / (old_age - new_age)``, never negative."""
    if old_age_s <= new_age_s:
        return new_rate
    return max(0.0, new_rate + (new_rate - old_rate) * new_age_s / (old_age_s - new_age_s))


def rate_now(interval_rate: float, interval_s: float, window_rate: float, window_s: float) -> float:
    """The rate at an interval decision on a rising load: the line through the interval's mean (centred
    ``interval_s / 2`` before the decision) and the last window's (centred ``window_s / 2`` before), read at the
    decision; with the default checks (two windows = half an interval) ``2w - m``. The interval's forecast trails a
    ramp: at the start of the bench's, the interval said 1.7 req/s, the last 5 s 2.6, and the load at the decision
    was ~3.5."""
    return extrapolate(interval_rate, interval_s / 2.0, window_rate, window_s / 2.0)


def surge_targets(
    profile: Profile,
    window: Load,
    arrivals: float,
    targets: Targets,
    corrections: dict[str, float],
    current: dict[str, int],
    bounds: dict[str, Bounds],
    budget: int | None,
    ttft_s: float | None = None,
    itl_s: float | None = None,
    headroom: int = 1,
    margin: float = SURGE_MARGIN,
) -> dict[str, int]:
    """Emergency scale-up between intervals (docs/planner.md "Surges"): the pools a short window of traffic already
    overloads, with the count each should grow to.

    A pool is overloaded when the window's mean latency of its phase is over target (TTFT: prefill, ITL: decode,
    either: aggregated), or when the window's rate needs ``SURGE_MARGIN`` more replicas than it has. It grows to
    ``max(ceil(need), current) + 1``: the load is rising (it outran the interval's forecast), so by the time a new
    worker is up it needs more than the window shows. (Growing to exactly the window's need was measured: the
    fleet stayed a worker short through the ramp, queues built on the busy workers, and attainment fell to 49-67 %
    in the bench; docs/benchmarks.md "Planner".) While the intervals' rate is falling the loop passes
    ``headroom=0`` and ``margin=inf``: a burst on the way down is no ramp, and only a latency over target (the
    pool visibly short) grows it, to ``max(ceil(need), current + 1)``. (A rate-only surge on one 5 s burst at the
    start of the bench's ramp down, latencies within target, took its fleet from 4 to 6 workers for 20 s with the
    +1, to 5 without.) Never shrinks a pool; the interval decision does that."""
    if arrivals < SURGE_MIN_REQUESTS:
        return {}
    need = needs(profile, window, targets, corrections, list(current))
    ttft_over = ttft_s is not None and ttft_s > targets.ttft_s
    itl_over = itl_s is not None and itl_s > targets.itl_s
    slow = {PREFILL: ttft_over, DECODE: itl_over, AGG: ttft_over or itl_over}
    grown = dict(current)
    for pool, n in need.items():
        have = current[pool]
        if slow.get(pool, False) or n >= have + margin:
            grown[pool] = min(bounds[pool].max, max(replicas_for(n, bounds[pool]) + headroom, have + 1))
    grown = fit_budget(grown, bounds, budget)
    return {p: n for p, n in grown.items() if n > current[p]}
