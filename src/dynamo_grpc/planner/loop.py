"""The planner loop: observe -> predict -> size -> clamp -> hysteresis -> connector, every interval.

Each decision is one :class:`Decision` (logged as a JSON line with all its inputs, exported as metrics, and kept
in ``Planner.decisions``), so a scaling action can always be traced back to the numbers that caused it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from dynamo_grpc.planner.connectors.base import Connector, ConnectorError
from dynamo_grpc.planner.corrections import Correction
from dynamo_grpc.planner.metrics import PlannerMetrics
from dynamo_grpc.planner.observe import Observation, ObserveError
from dynamo_grpc.planner.predictors import Predictor, make_predictor
from dynamo_grpc.planner.profile import Profile
from dynamo_grpc.planner.scaling import (
    AGG,
    DECODE,
    PREFILL,
    RISE_HEADROOM,
    SURGE_MARGIN,
    Bounds,
    Hysteresis,
    Load,
    Targets,
    expected_ttft_s,
    extrapolate,
    fit_budget,
    needs,
    prefill_busy,
    rate_now,
    replicas_with_slack,
    rising,
    surge_targets,
)

log = logging.getLogger("dynamo_grpc.planner")

#: a correction is learnt only from intervals with at least this many finished requests
MIN_REQUESTS_FOR_CORRECTION = 5
#: decisions after a scaling action that learn no correction (the interval of the action and the next one: new
#: workers take seconds to start, and the queue built while the pool was short drains over the next interval)
UNSTEADY_INTERVALS = 2


class Source(Protocol):
    def observe(self) -> Observation: ...


@dataclass
class PlannerConfig:
    pools: list[str]
    targets: Targets = field(default_factory=Targets)
    bounds: dict[str, Bounds] = field(default_factory=dict)
    budget: int | None = None
    interval_s: float = 180.0
    #: forecasts the request rate
    predictor: str = "constant"
    #: forecasts ISL and OSL: properties of the request mix, which a trend would chase through noise
    length_predictor: str = "moving-average"
    window: int = 3
    #: decisions in a row that must ask for fewer replicas before a pool shrinks
    down_after: int = 2
    correction: bool = True
    #: seconds between emergency checks of the short-window load (docs/planner.md "Surges"); None: a quarter of
    #: the interval; 0: off
    surge_check_s: float | None = None
    #: an interval decision adds replicas only for a need more than this fraction above the current count
    #: (scaling.replicas_with_slack); 0: plain ceil
    up_slack: float = 0.05

    @property
    def surge_every_s(self) -> float:
        return self.interval_s / 4.0 if self.surge_check_s is None else self.surge_check_s

    def __post_init__(self) -> None:
        for pool in self.pools:
            self.bounds.setdefault(pool, Bounds())
        for pool, b in self.bounds.items():
            if pool not in self.pools:
                raise ValueError(f"bounds for unknown pool {pool!r} (pools: {', '.join(self.pools)})")
            if not 0 <= b.min <= b.max:
                raise ValueError(f"pool {pool}: need 0 <= min ({b.min}) <= max ({b.max})")
        if self.budget is not None and self.budget < sum(self.bounds[p].min for p in self.pools):
            raise ValueError(f"--max-total-replicas {self.budget} is below the pools' minimums together")
        if self.interval_s <= 0:
            raise ValueError("the adjustment interval must be positive")
        if self.targets.ttft_s <= 0 or self.targets.itl_s <= 0:
            raise ValueError("TTFT and ITL targets must be positive")
        if not 0.0 <= self.up_slack < 0.5:
            raise ValueError("the scale-up slack must be a fraction in [0, 0.5)")
        if self.surge_check_s is not None and not 0 <= self.surge_check_s < self.interval_s:
            raise ValueError("the surge check period must be >= 0 (0: off) and shorter than the interval")


@dataclass
class Decision:
    at: float
    observed: dict[str, Any]
    predicted: dict[str, float]
    corrections: dict[str, float]
    needs: dict[str, float]
    current: dict[str, int]
    target: dict[str, int]
    errors: list[str] = field(default_factory=list)
    #: "interval" (the regular decision) or "surge" (an emergency scale-up between intervals)
    kind: str = "interval"
    #: the last short window still climbed above the interval's mean: sized with RISE_HEADROOM (scaling.rising)
    rising: bool = False

    def to_json(self) -> str:
        d = asdict(self)
        d["needs"] = {k: (None if math.isinf(v) else round(v, 3)) for k, v in self.needs.items()}
        return json.dumps(d, sort_keys=True)


class Planner:
    def __init__(
        self,
        config: PlannerConfig,
        profile: Profile,
        source: Source,
        connector: Connector,
        metrics: PlannerMetrics | None = None,
        on_decision: Callable[[Decision], None] | None = None,
        surge_source: Source | None = None,
    ) -> None:
        self.config = config
        self.profile = profile
        self.source = source
        self.connector = connector
        self.metrics = metrics or PlannerMetrics()
        self.on_decision = on_decision
        self.predictors: dict[str, Predictor] = {
            "rate": make_predictor(config.predictor, config.window),
            "isl": make_predictor(config.length_predictor, config.window),
            "osl": make_predictor(config.length_predictor, config.window),
        }
        #: learnt observed/expected ratios, request-weighted and shrunk toward the profile (planner/corrections.py)
        self.learnt = {PREFILL: Correction(), DECODE: Correction()}
        self.hysteresis = Hysteresis(config.down_after)
        self.decisions: list[Decision] = []
        #: a second reader of the same metrics (its own baseline), for the surge checks; None: no surge checks
        self.surge_source = surge_source if config.surge_every_s > 0 else None
        self._surge_window: list[Observation] = []
        #: the last two intervals' observed rates (a surge on a falling load adds no headroom)
        self._rates: list[float] = []
        self._surge_quiet = 0
        #: decisions still to learn nothing: a pool was scaled, and the interval it happened in and the next one
        #: have workers starting or draining, and the queue built while the pool was short
        self._unsteady = 0
        #: when the last interval decision ran (its observation's mean is centred half an interval before it)
        self._last_step_at: float | None = None
        self._clock: Callable[[], float] = time.monotonic

    @property
    def corrections(self) -> dict[str, float]:
        return {phase: c.value for phase, c in self.learnt.items()}

    # -- one decision --------------------------------------------------------------------------
    async def step(self) -> Decision:
        errors: list[str] = []
        obs: Observation | None = None
        try:
            obs = await asyncio.to_thread(self.source.observe)
        except ObserveError as e:
            errors.append(str(e))
            self.metrics.errors.labels("observe").inc()
            log.warning("planner: %s", e)
        current = await self.connector.replicas()
        if obs is not None and obs.duration_s > 0:
            self._learn(obs, current)
        self._last_step_at = self._clock()
        climbing = False
        pred = Load(*(self.predictors[q].predict() for q in ("rate", "isl", "osl")))
        window = await self._fresh_window()
        if window is not None and obs is not None and obs.duration_s > 0:
            climbing = rising(window[0], window[1], obs.rate)
            if climbing:  # forecast at least the rate the load has already reached at the decision
                now = rate_now(obs.rate, obs.duration_s, window[0], window[2])
                if now > pred.rate:
                    pred = Load(now, pred.isl, pred.osl)
            elif pred.rate > obs.rate:
                # a rise the latest window does not confirm: the ramp has levelled off (or it was one burst), and
                # extrapolating it buys a worker for the whole scale-down streak
                pred = Load(obs.rate, pred.isl, pred.osl)
        need = needs(self.profile, pred, self.config.targets, self.corrections, self.config.pools)
        lead = RISE_HEADROOM if climbing else 0.0
        raw = {
            p: replicas_with_slack(need[p] + lead, current.get(p, 0), self.config.bounds[p], self.config.up_slack)
            for p in self.config.pools
        }
        raw = fit_budget(raw, self.config.bounds, self.config.budget)
        target = self.hysteresis.apply(current, raw)
        for pool, n in target.items():
            have = current.get(pool, 0)
            direction = "up" if n > have else "down" if n < have else "hold"
            self.metrics.decisions.labels(pool, direction).inc()
            if n == have:
                continue
            self._unsteady = UNSTEADY_INTERVALS
            if n > have:  # like a surge's: the next checks' windows show the shortfall the new workers now absorb
                self._surge_quiet = 2
            try:
                await self.connector.scale(pool, n)
            except ConnectorError as e:
                errors.append(str(e))
                self.metrics.errors.labels("scale").inc()
                log.error("planner: %s", e)
        decision = Decision(
            at=time.time(),
            observed={} if obs is None else {**asdict(obs), "rate": obs.rate},
            predicted={"rate": pred.rate, "isl": pred.isl, "osl": pred.osl},
            corrections=dict(self.corrections),
            needs=need,
            current=current,
            target=target,
            errors=errors,
            rising=climbing,
        )
        self._export(decision, obs, pred)
        log.info("planner decision %s", decision.to_json())
        self.decisions.append(decision)
        if self.on_decision is not None:
            self.on_decision(decision)
        return decision

    async def _fresh_window(self) -> tuple[float, float, float] | None:
        """Read the surge reader now (its window then ends at the decision) and return the rate, arrivals and
        duration of its last two windows; None without surge checks or when the read fails."""
        if self.surge_source is None:
            return None
        try:
            obs = await asyncio.to_thread(self.surge_source.observe)
        except ObserveError as e:
            log.warning("planner: %s", e)
            return None
        if obs.duration_s <= 0:
            return None
        self._surge_window = [*self._surge_window[-1:], obs]
        duration = sum(o.duration_s for o in self._surge_window)
        arrivals = sum(o.requests for o in self._surge_window)
        return arrivals / duration, arrivals, duration

    async def surge_check(self) -> Decision | None:
        """Between intervals: grow the pools the last two short windows already overload (their rate, or the
        latest one's latencies); then skip two checks while the new workers start."""
        if self.surge_source is None:
            return None
        try:
            obs = await asyncio.to_thread(self.surge_source.observe)
        except ObserveError as e:
            self.metrics.errors.labels("observe").inc()
            log.warning("planner surge check: %s", e)
            return None
        if obs.duration_s <= 0:
            return None
        self._surge_window = [*self._surge_window[-1:], obs]
        if self._surge_quiet > 0:  # the last surge's workers are starting: its window still shows the shortfall
            self._surge_quiet -= 1
            return None
        duration = sum(o.duration_s for o in self._surge_window)
        arrivals = sum(o.requests for o in self._surge_window)
        lengths = Load(0.0, self.predictors["isl"].predict(), self.predictors["osl"].predict())
        if lengths.isl <= 0:  # no interval finished yet: the window's own lengths
            lengths = obs.load(lengths)
        rate = arrivals / duration
        falling = self._falling()
        if not falling and self._rates and self._last_step_at is not None and rate > self._rates[-1]:
            # a rise since the last interval: size for the rate it has reached now, not the window's mean
            since = self._clock() - self._last_step_at
            rate = extrapolate(self._rates[-1], since + self.config.interval_s / 2.0, rate, duration / 2.0)
        window = Load(rate, lengths.isl, lengths.osl)
        current = await self.connector.replicas()
        # falling: a burst on the way down, only a latency over target grows a pool
        grow = surge_targets(
            self.profile,
            window,
            arrivals,
            self.config.targets,
            self.corrections,
            {p: current.get(p, 0) for p in self.config.pools},
            self.config.bounds,
            self.config.budget,
            obs.ttft_s,
            obs.itl_s,
            headroom=0 if falling else 1,
            margin=math.inf if falling else SURGE_MARGIN,
        )
        if not grow:
            return None
        self._surge_quiet = 2
        errors: list[str] = []
        for pool, n in grow.items():
            self.hysteresis.reset(pool)  # the low asks before the surge must not shrink what it just added
            self.metrics.decisions.labels(pool, "surge").inc()
            self._unsteady = UNSTEADY_INTERVALS
            try:
                await self.connector.scale(pool, n)
            except ConnectorError as e:
                errors.append(str(e))
                self.metrics.errors.labels("scale").inc()
                log.error("planner: %s", e)
        need = needs(self.profile, window, self.config.targets, self.corrections, self.config.pools)
        decision = Decision(
            at=time.time(),
            observed={
                "rate": window.rate,
                "requests": arrivals,
                "duration_s": duration,
                "ttft_s": obs.ttft_s,
                "itl_s": obs.itl_s,
            },
            predicted={"rate": window.rate, "isl": window.isl, "osl": window.osl},
            corrections=dict(self.corrections),
            needs=need,
            current=current,
            target={**current, **grow},
            errors=errors,
            kind="surge",
        )
        log.warning("planner surge %s", decision.to_json())
        self.decisions.append(decision)
        if self.on_decision is not None:
            self.on_decision(decision)
        return decision

    def _falling(self) -> bool:
        """The last interval's rate was below the one before it (the load is on its way down)."""
        return len(self._rates) == 2 and self._rates[1] < self._rates[0]

    def _learn(self, obs: Observation, current: dict[str, int]) -> None:
        """Feed the predictors, and update the corrections from what latency the profile expected."""
        self._rates = [*self._rates[-1:], obs.rate]
        self.predictors["rate"].add(obs.rate)
        if obs.isl is not None:
            self.predictors["isl"].add(obs.isl)
        if obs.osl is not None:
            self.predictors["osl"].add(obs.osl)
        unsteady = self._unsteady > 0
        self._unsteady = max(0, self._unsteady - 1)
        if not self.config.correction or obs.requests < MIN_REQUESTS_FOR_CORRECTION or obs.isl is None:
            return
        # workers started or drained in the interval: its latencies carry the transient (a queue built while the
        # pool was short, new workers' start-up competing for the host), not the profile's error
        if unsteady:
            return
        pools = self.config.pools
        # an overloaded pool queues for KV blocks as well as for prefill: its latencies say "too few replicas",
        # which the sizing already answers, not "the profile is off"; learn only from pools the profile says
        # were below 90 % of their capacity
        seen = needs(
            self.profile, Load(obs.rate, obs.isl, obs.osl or 0.0), self.config.targets, self.corrections, pools
        )
        if any(current.get(p, 0) <= 0 or seen[p] / current[p] >= 0.9 for p in pools):
            return
        n_prefill = current.get(PREFILL if PREFILL in pools else AGG, 0)
        n_decode = current.get(DECODE if DECODE in pools else AGG, 0)
        if obs.ttft_s is not None and n_prefill > 0:
            service = self.profile.ttft_s(obs.isl)
            rho = obs.rate * obs.isl / (n_prefill * self.profile.prefill_tokens_per_s(obs.isl))
            expected = expected_ttft_s(service, rho)
            if rho < 0.9 and math.isfinite(expected):
                self.learnt[PREFILL].learn(obs.ttft_s / expected, obs.requests)
        if obs.itl_s is not None and obs.osl and n_decode > 0:
            ttft = obs.ttft_s or 0.0
            concurrency = obs.rate * (ttft + obs.osl * obs.itl_s) / n_decode
            expected_itl = self.profile.itl_s(obs.isl + obs.osl / 2.0, max(1.0, concurrency))
            if AGG in pools:  # its own prefill steps stretch an aggregated worker's ITL (scaling.aggregated_need)
                rho = prefill_busy(self.profile, Load(obs.rate, obs.isl, obs.osl))
                expected_itl /= max(0.1, 1.0 - rho / n_decode)
            self.learnt[DECODE].learn(obs.itl_s / expected_itl, obs.requests)

    def _export(self, d: Decision, obs: Observation | None, pred: Load) -> None:
        m = self.metrics
        for pool in self.config.pools:
            m.replicas.labels(pool).set(d.current.get(pool, 0))
            m.target.labels(pool).set(d.target[pool])
            m.need.labels(pool).set(d.needs[pool] if math.isfinite(d.needs[pool]) else -1)
        for q, v in d.predicted.items():
            m.predicted.labels(q).set(v)
        if obs is not None:
            m.observed.labels("rate").set(obs.rate)
            for q in ("isl", "osl", "ttft_s", "itl_s"):
                v = getattr(obs, q)
                if v is not None:
                    m.observed.labels(q.removesuffix("_s")).set(v)
        for phase, c in self.corrections.items():
            m.correction.labels(phase).set(c)

    # -- the loop ------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Bring every pool to its minimum, then decide every interval until ``stop`` is set."""
        current = await self.connector.replicas()
        for pool in self.config.pools:
            low = self.config.bounds[pool].min
            if current.get(pool, 0) < low:
                await self.connector.scale(pool, low)
        for src in (self.source, self.surge_source):
            if src is None:
                continue
            try:
                await asyncio.to_thread(src.observe)  # the baseline the first interval is measured from
            except ObserveError as e:  # no frontend yet: the first decision observes again
                log.warning("planner: %s", e)
        loop = asyncio.get_running_loop()
        every = self.config.surge_every_s if self.surge_source is not None else self.config.interval_s
        next_decision = loop.time() + self.config.interval_s
        while not stop.is_set():
            wake = min(next_decision, loop.time() + every)
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, wake - loop.time()))
                break
            except TimeoutError:
                pass
            if loop.time() >= next_decision - 1e-3:
                next_decision += self.config.interval_s
                await self.step()
            else:
                await self.surge_check()
