"""Load predictors on synthetic series: a level, a ramp, a fall to zero."""

from __future__ import annotations

import pytest

from dynamo_grpc.planner.predictors import MIN_FIT_POINTS, make_predictor

try:
    import statsmodels  # noqa: F401

    HAVE_STATSMODELS = True
except ImportError:
    HAVE_STATSMODELS = False
needs_statsmodels = pytest.mark.skipif(
    not HAVE_STATSMODELS, reason="arima/holt need the planner extra: pip install 'dynamo-grpc[planner]'"
)


def feed(name: str, values: list[float]) -> float:
    p = make_predictor(name, window=3)
    for v in values:
        p.add(v)
    return p.predict()


def test_constant_and_moving_average() -> None:
    assert feed("constant", [1, 2, 7]) == 7
    assert feed("moving-average", [100, 1, 2, 6]) == pytest.approx(3.0)
    assert feed("constant", []) == 0.0


@needs_statsmodels
@pytest.mark.parametrize("name", ["arima", "holt"])
def test_trend_predictors_follow_a_ramp(name: str) -> None:
    ramp = [10.0 * i for i in range(1, 11)]  # 10 .. 100
    assert feed(name, ramp) == pytest.approx(110.0, abs=6.0)
    assert feed("constant", ramp) == 100.0  # what a level predictor would say: behind the ramp


@needs_statsmodels
@pytest.mark.parametrize("name", ["arima", "holt"])
def test_trend_predictors_on_a_level_and_a_fall(name: str) -> None:
    assert feed(name, [5.0] * 8) == pytest.approx(5.0)
    assert feed(name, [40.0, 30.0, 20.0, 10.0, 0.0, 0.0]) >= 0.0  # never a negative rate


@needs_statsmodels
@pytest.mark.parametrize("name", ["arima", "holt"])
def test_trend_predictors_answer_last_value_until_they_can_fit(name: str) -> None:
    assert feed(name, [3.0, 9.0][: MIN_FIT_POINTS - 1]) == 9.0


def test_trend_adds_half_the_fitted_slope_to_the_last_value() -> None:
    assert feed("trend", [1.0, 1.0, 2.0, 3.0]) == pytest.approx(3.5)  # slope 1 through 1, 2, 3: 3 + 0.5
    assert feed("trend", [5.0]) == 5.0  # one point: no slope yet
    assert feed("trend", [9.0, 4.0, 0.0]) == 0.0  # a fall is clamped at zero (0 - 0.5 * 4.5)
    # the bench's ramp: 1.7, 3.2, 4.1 req/s (slope 1.2) -> 4.7, where the full line said 5.4 past a peak of 4
    assert feed("trend", [1.2, 1.7, 3.2, 4.1]) == pytest.approx(4.7)
    # a falling ramp is followed the same way: 4.1, 3.8, 3.2 (slope -0.45) -> 2.975
    assert feed("trend", [4.1, 3.8, 3.2]) == pytest.approx(2.975)


def test_trend_stops_at_a_turn() -> None:
    # the slope through 3.2, 4.1, 3.8 still rises (+0.3), but the last step fell: the ramp is over, say the last
    assert feed("trend", [3.2, 4.1, 3.8]) == pytest.approx(3.8)
    assert feed("trend", [2.0, 1.0, 1.5]) == pytest.approx(1.5)  # a fall that turned up again
    assert feed("trend", [1.0, 3.0, 3.0]) == pytest.approx(3.0)  # a level reached: no step, no trend


def test_trend_damping_is_bounded() -> None:
    from dynamo_grpc.planner.predictors import TrendPredictor

    full = TrendPredictor(window=3, damping=1.0)
    for v in (1.0, 2.0, 3.0):
        full.add(v)
    assert full.predict() == pytest.approx(4.0)  # damping 1: the undamped line, one step ahead of the last
    with pytest.raises(ValueError, match="damping"):
        TrendPredictor(damping=1.5)


def test_unknown_predictor_names_the_choices() -> None:
    with pytest.raises(ValueError, match="constant, moving-average, trend, arima, holt"):
        make_predictor("prophet")
