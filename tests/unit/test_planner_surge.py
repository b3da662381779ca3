"""Emergency scale-up between intervals (docs/planner.md "Surges"): a short window whose arrivals already need more
replicas than a pool has grows it at once, plus one of headroom; too few arrivals, or enough replicas, do nothing;
a surge never shrinks a pool and stays within the bounds and the budget. The short-window load comes from recorded
observations, the replicas go to the virtual connector (the dry-run connector of `--connector virtual`)."""

from __future__ import annotations

import asyncio
import math

import pytest
from prometheus_client import generate_latest

from dynamo_grpc.planner.connectors.virtual import VirtualConnector
from dynamo_grpc.planner.loop import Planner, PlannerConfig
from dynamo_grpc.planner.main import build_parser, config_from_args
from dynamo_grpc.planner.observe import Observation
from dynamo_grpc.planner.scaling import (
    AGG,
    DECODE,
    PREFILL,
    RISE_HEADROOM,
    SURGE_MIN_REQUESTS,
    Bounds,
    Load,
    Targets,
    extrapolate,
    rate_now,
    rising,
    surge_targets,
)
from tests.unit.test_planner_scaling import profile

T = Targets()


def test_a_window_that_outgrows_the_pool_adds_its_need_plus_one() -> None:
    # 8 req/s (isl 950, osl 100) needs 4.8 aggregated replicas (test_planner_scaling) -> 5, plus one of headroom
    got = surge_targets(profile(), Load(8, 950, 100), 40, T, {}, {AGG: 2}, {AGG: Bounds(1, 10)}, None)
    assert got == {AGG: 6}


def test_too_few_arrivals_or_enough_replicas_change_nothing() -> None:
    b = {AGG: Bounds(1, 10)}
    assert surge_targets(profile(), Load(8, 950, 100), SURGE_MIN_REQUESTS - 1, T, {}, {AGG: 2}, b, None) == {}
    assert surge_targets(profile(), Load(8, 950, 100), 40, T, {}, {AGG: 5}, b, None) == {}
    # a pool above the window's need is not shrunk by a surge check
    assert surge_targets(profile(), Load(2, 950, 100), 40, T, {}, {AGG: 7}, b, None) == {}


def test_a_burst_within_the_margin_buys_nothing() -> None:
    # 2 req/s needs 1.225 replicas: over the one there is, but by less than SURGE_MARGIN (Poisson noise at the base)
    assert surge_targets(profile(), Load(2, 950, 100), 10, T, {}, {AGG: 1}, {AGG: Bounds(1, 10)}, None) == {}


def test_latency_over_target_grows_the_pool_of_its_phase_by_one() -> None:
    b = {AGG: Bounds(1, 10)}
    # 2 req/s fits 2 replicas by the profile, but the window's ITL says they are not keeping up
    assert surge_targets(profile(), Load(2, 950, 100), 10, T, {}, {AGG: 2}, b, None, itl_s=0.06) == {AGG: 3}
    assert surge_targets(profile(), Load(2, 950, 100), 10, T, {}, {AGG: 2}, b, None, itl_s=0.04, ttft_s=0.4) == {}
    bounds = {PREFILL: Bounds(1, 4), DECODE: Bounds(1, 8)}
    cur = {PREFILL: 1, DECODE: 2}
    assert surge_targets(profile(), Load(2, 950, 100), 10, T, {}, cur, bounds, None, ttft_s=0.8) == {PREFILL: 2}
    assert surge_targets(profile(), Load(2, 950, 100), 10, T, {}, cur, bounds, None, itl_s=0.08) == {DECODE: 3}


def test_surge_stays_within_bounds_and_budget() -> None:
    assert surge_targets(profile(), Load(8, 950, 100), 40, T, {}, {AGG: 2}, {AGG: Bounds(1, 4)}, None) == {AGG: 4}
    bounds = {PREFILL: Bounds(1, 4), DECODE: Bounds(1, 8)}
    # 8 req/s: decode 4.0 -> 4 (+1 = 5); prefill 0.9 -> 1, already there; a budget of 5 leaves decode at 4
    assert surge_targets(profile(), Load(8, 950, 100), 40, T, {}, {PREFILL: 1, DECODE: 2}, bounds, 6) == {DECODE: 5}
    assert surge_targets(profile(), Load(8, 950, 100), 40, T, {}, {PREFILL: 1, DECODE: 2}, bounds, 5) == {DECODE: 4}


class Windows:
    """Short-window observations as the second metrics reader would give them."""

    def __init__(self, rows: list[tuple[float, float]]) -> None:
        self.obs = [Observation(d, n, None, None, 950, 100) for d, n in rows]

    def observe(self) -> Observation:
        return self.obs.pop(0)


def test_planner_surge_check_scales_up_between_intervals_over_two_windows() -> None:
    cfg = PlannerConfig([AGG], bounds={AGG: Bounds(1, 10)}, interval_s=60, correction=False)
    conn = VirtualConnector(cfg.pools, 1)
    # 2.5 s windows: 6 arrivals (too few alone), then 14: 20 over 5 s = 4 req/s -> need 2.4 -> 3, +1 -> 4
    planner = Planner(cfg, profile(), Windows([]), conn, surge_source=Windows([(2.5, 6), (2.5, 14), (2.5, 2)]))

    async def go() -> list[object]:
        return [await planner.surge_check() for _ in range(3)]

    first, second, third = asyncio.run(go())
    assert second is not None
    assert first is None and third is None  # the check after a surge is skipped while its workers start
    assert conn.counts == {AGG: 4}
    d = planner.decisions[-1]
    assert d.kind == "surge" and d.current == {AGG: 1} and d.target == {AGG: 4} and d.observed["requests"] == 20
    text = generate_latest(planner.metrics.registry).decode()
    assert 'dynamo_planner_decisions_total{direction="surge",pool="worker"} 1.0' in text


def test_surge_check_flag_defaults_to_a_quarter_interval_and_zero_turns_it_off() -> None:
    p = build_parser()
    base = ["--profile", "p.json", "--adjustment-interval", "60"]
    assert config_from_args(p.parse_args(base), p).surge_every_s == 15.0
    off = config_from_args(p.parse_args([*base, "--surge-check", "0"]), p)
    assert (
        Planner(off, profile(), Windows([]), VirtualConnector([AGG], 1), surge_source=Windows([])).surge_source is None
    )
    with pytest.raises(SystemExit):
        config_from_args(p.parse_args([*base, "--surge-check", "60"]), p)


def test_a_surge_ends_the_streak_of_low_asks() -> None:
    # 3 workers; an interval at 1 req/s asks for 1 (first low ask: hold); a surge window at 6 req/s (need 3.6)
    # grows the pool to 4 + 1 = 5; the next interval at 1 req/s asks for 1 again. Without the surge ending the
    # streak, those two low asks would shrink the pool it had just grown (what the bench saw mid-ramp); with it,
    # one low ask holds.
    cfg = PlannerConfig([AGG], bounds={AGG: Bounds(1, 10)}, interval_s=60, down_after=2, correction=False)
    conn = VirtualConnector(cfg.pools, 3)
    # (each interval decision also reads the surge reader: the first and the last window below are theirs)
    surge = Windows([(2.5, 2), (2.5, 8), (2.5, 22), (2.5, 5)])
    planner = Planner(cfg, profile(), Windows([(60, 60), (60, 60)]), conn, surge_source=surge)

    async def go() -> None:
        await planner.step()
        assert conn.counts == {AGG: 3}
        assert await planner.surge_check() is None
        assert await planner.surge_check() is not None
        assert conn.counts == {AGG: 5}
        await planner.step()

    asyncio.run(go())
    assert conn.counts == {AGG: 5}
    assert planner.decisions[-1].target == {AGG: 5}


def test_an_interval_scale_up_quiets_the_next_two_surge_checks() -> None:
    # 2 workers; an interval at 4 req/s (need 2.4) scales to 3. The next surge windows show the ITL over target
    # (the shortfall the new worker is starting to absorb): two checks are skipped, as after a surge; the third acts.
    cfg = PlannerConfig([AGG], bounds={AGG: Bounds(1, 10)}, interval_s=60, correction=False)
    conn = VirtualConnector(cfg.pools, 2)
    windows = Windows([])
    windows.obs = [Observation(2.5, 10, None, 0.08, 950, 100) for _ in range(4)]  # the first: the decision's read
    planner = Planner(cfg, profile(), Windows([(60, 240)]), conn, surge_source=windows)

    async def go() -> list[object]:
        await planner.step()
        assert conn.counts == {AGG: 3}
        return [await planner.surge_check() for _ in range(3)]

    first, second, third = asyncio.run(go())
    assert first is None and second is None
    assert third is not None and conn.counts == {AGG: 4}


def test_rising_needs_enough_arrivals_and_a_rate_above_the_intervals() -> None:
    assert rising(5.0, 12, 4.0)  # 5.0 >= 1.1 * 4.0
    assert not rising(4.3, 12, 4.0)  # within 10 %: a level, not a climb
    assert not rising(5.0, SURGE_MIN_REQUESTS - 1, 4.0)  # too few arrivals to say
    assert not rising(1.0, 12, 0.0)


@pytest.mark.parametrize(("arrivals", "want", "climbing"), [(13, 4, True), (11, 3, False)])
def test_an_interval_decision_on_a_rising_load_sizes_with_headroom(arrivals: int, want: int, climbing: bool) -> None:
    # 4.5 req/s over the interval (isl 950, osl 100) needs 2.7 replicas on the test profile -> 3. The decision reads
    # the surge reader: 13 arrivals in the last 2.5 s (5.2 req/s >= 1.1 x 4.5) say the load is still climbing,
    # so it sizes for 2.7 + RISE_HEADROOM = 3.2 -> 4; 11 (4.4 req/s) is a level -> 3. (No scale-up slack here: with
    # the default 0.05, 3 workers absorb up to 3.15, so 3.2 buys the fourth all the same.)
    cfg = PlannerConfig([AGG], bounds={AGG: Bounds(1, 10)}, interval_s=60, correction=False, up_slack=0.0)
    conn = VirtualConnector(cfg.pools, 3)
    planner = Planner(cfg, profile(), Windows([(60, 270)]), conn, surge_source=Windows([(2.5, arrivals)]))
    d = asyncio.run(planner.step())
    # (rising, the forecast is also raised to the rate reached: test_a_rising_decision_forecasts_at_least_...)
    assert d.needs[AGG] == pytest.approx(0.6 * (5.2 + 0.7 * 2.5 / 57.5) if climbing else 2.7)
    assert RISE_HEADROOM == 0.5
    assert d.rising is climbing and conn.counts == {AGG: want}


@pytest.mark.parametrize(("last_window", "forecast", "climbing"), [(12, 4.0, False), (28, 6 + 2 * 5 / 55, True)])
def test_the_trend_is_followed_only_while_the_latest_window_confirms_the_rise(
    last_window: int, forecast: float, climbing: bool
) -> None:
    # intervals at 2 then 4 req/s: the damped trend says 4 + 0.5 * 2 = 5. The decision's fresh window (with the
    # previous decision's read: 2 + 12 arrivals over 5 s = 2.8 req/s) says the rise stopped: the forecast stays at
    # the last interval's 4; 2 + 28 over 5 s = 6 req/s (>= 1.1 x 4) confirms it, and the rate reached at the
    # decision, 6 + 2 * 5 / 55 (rate_now), is above the trend's 5: that is the forecast, with the rising headroom.
    cfg = PlannerConfig([AGG], bounds={AGG: Bounds(1, 10)}, interval_s=60, correction=False, predictor="trend")
    conn = VirtualConnector(cfg.pools, 1)
    surge = Windows([(2.5, 2), (2.5, last_window)])
    planner = Planner(cfg, profile(), Windows([(60, 120), (60, 240)]), conn, surge_source=surge)

    async def go() -> None:
        await planner.step()
        await planner.step()

    asyncio.run(go())
    d = planner.decisions[-1]
    assert d.predicted["rate"] == pytest.approx(forecast) and d.rising is climbing


@pytest.mark.parametrize(
    ("rates", "itl_s", "want"),
    [
        # rising: the rate reached now, on the line from the interval's 3 req/s (centred 30 s back) through the
        # windows' 8 (centred 2.5 s back): 8 + 5 * 2.5 / 27.5 = 8.4545 -> need 5.07 -> 6, + 1 of headroom
        ((2, 3), None, 7),
        ((4, 3), None, 3),  # falling: the rate alone is a burst on the way down, no surge
        ((4, 3), 0.08, 5),  # falling with the ITL over target: to the need (5), no headroom
    ],
)
def test_a_surge_on_a_falling_load_needs_latency_and_adds_no_headroom(
    rates: tuple[int, int], itl_s: float | None, want: int
) -> None:
    # intervals at `rates` req/s on 3 workers (they ask for 3 and 2 or 2 and 2, no change: down_after 5); then two
    # 2.5 s windows of 20 arrivals: 8 req/s
    cfg = PlannerConfig([AGG], bounds={AGG: Bounds(1, 10)}, interval_s=60, correction=False, down_after=5)
    conn = VirtualConnector(cfg.pools, 3)
    intervals = Windows([(60, 60 * r) for r in rates])
    windows = Windows([(2.5, 1), (2.5, 1), (2.5, 20), (2.5, 20)])
    windows.obs[-1] = Observation(2.5, 20, None, itl_s, 950, 100)
    planner = Planner(cfg, profile(), intervals, conn, surge_source=windows)
    planner._clock = lambda: 100.0  # the surge checks run right after the decision (no time for the rise to go on)

    async def go() -> None:
        await planner.step()
        await planner.step()
        await planner.surge_check()
        await planner.surge_check()

    asyncio.run(go())
    assert conn.counts == {AGG: want}
    assert (planner.decisions[-1].kind == "surge") is (want > 3)


def test_surge_headroom_zero_still_grows_a_pool_over_its_latency_target() -> None:
    b = {AGG: Bounds(1, 10)}
    assert surge_targets(profile(), Load(8, 950, 100), 40, T, {}, {AGG: 2}, b, None, headroom=0) == {AGG: 5}
    assert surge_targets(profile(), Load(8, 950, 100), 40, T, {}, {AGG: 2}, b, None, margin=math.inf) == {}
    got = surge_targets(profile(), Load(2, 950, 100), 10, T, {}, {AGG: 2}, b, None, itl_s=0.06, headroom=0)
    assert got == {AGG: 3}


def test_rate_now_extends_the_line_from_the_intervals_mean_through_the_window() -> None:
    # interval mean 1.7 req/s (centred 5 s before a 10 s interval's end), last 5 s at 2.6 (centred 2.5 s before):
    # 0.9 req/s per 2.5 s -> 3.5 at the decision
    assert rate_now(1.7, 10.0, 2.6, 5.0) == pytest.approx(3.5)
    # a 180 s interval with the default checks (two 45 s windows): the same 2w - m
    assert rate_now(2.0, 180.0, 3.0, 90.0) == pytest.approx(4.0)
    # a window as long as the interval says nothing more than itself
    assert rate_now(2.0, 10.0, 3.0, 10.0) == 3.0


def test_a_rising_decision_forecasts_at_least_the_rate_reached() -> None:
    # interval at 4.5 req/s (constant forecast 4.5); the decision's window: 13 arrivals in 2.5 s = 5.2 req/s, rising.
    # The rate now: 5.2 + 0.7 * 2.5 / 57.5 = 5.2304 req/s -> need 0.6 * 5.2304 = 3.138 (+0.5 headroom) -> 4
    cfg = PlannerConfig([AGG], bounds={AGG: Bounds(1, 10)}, interval_s=60, correction=False, up_slack=0.0)
    planner = Planner(
        cfg, profile(), Windows([(60, 270)]), VirtualConnector(cfg.pools, 3), surge_source=Windows([(2.5, 13)])
    )
    d = asyncio.run(planner.step())
    assert d.rising and d.predicted["rate"] == pytest.approx(5.2 + 0.7 * 2.5 / 57.5)
    assert d.needs[AGG] == pytest.approx(0.6 * d.predicted["rate"]) and d.target == {AGG: 4}


def test_extrapolate_reads_the_line_through_two_windows_now() -> None:
    # 1.2 req/s centred 12.5 s ago, 2.19 centred 2.5 s ago: +0.099 req/s per s -> 2.19 + 0.2475 = 2.4375 now
    assert extrapolate(1.2, 12.5, 2.19, 2.5) == pytest.approx(2.4375)
    assert extrapolate(3.0, 10.0, 1.0, 2.5) == pytest.approx(1.0 - 2.0 * 2.5 / 7.5)  # a fall is read the same way
    assert extrapolate(3.0, 10.0, 0.1, 2.5) == 0.0  # never negative
    assert extrapolate(1.0, 2.0, 2.0, 2.0) == 2.0  # no span between them: the newer one


def test_a_surge_check_on_a_rise_sizes_for_the_rate_reached_now() -> None:
    # interval 1.2 req/s (60 s) on 1 worker at t = 0; at t = 20 two 2.5 s windows hold 15 arrivals (3 req/s,
    # centred 2.5 s back; the interval's mean is centred 20 + 30 = 50 s back): 3 + 1.8 * 2.5 / 47.5 = 3.0947 req/s
    cfg = PlannerConfig([AGG], bounds={AGG: Bounds(1, 10)}, interval_s=60, correction=False)
    conn = VirtualConnector(cfg.pools, 1)
    windows = Windows([(2.5, 1), (2.5, 7), (2.5, 8)])
    planner = Planner(cfg, profile(), Windows([(60, 72)]), conn, surge_source=windows)
    now = [0.0]
    planner._clock = lambda: now[0]

    async def go() -> None:
        await planner.step()
        now[0] = 20.0
        await planner.surge_check()
        await planner.surge_check()

    asyncio.run(go())
    d = planner.decisions[-1]
    assert d.kind == "surge" and d.predicted["rate"] == pytest.approx(3 + 1.8 * 2.5 / 47.5)
    # need 0.6 * 3.0947 = 1.857 -> 2, + 1
    assert d.needs[AGG] == pytest.approx(0.6 * d.predicted["rate"]) and conn.counts == {AGG: 3}
