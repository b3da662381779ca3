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


def test_trend_extrapolates_the_last_window() -> None:
    assert feed("trend", [1.0, 1.0, 2.0, 3.0]) == pytest.approx(4.0)  # the line through 1, 2, 3 goes on to 4
    assert feed("trend", [5.0]) == 5.0  # one point: no slope yet
    assert feed("trend", [9.0, 4.0, 0.0]) == 0.0  # a fall is clamped at zero


def test_unknown_predictor_names_the_choices() -> None:
    with pytest.raises(ValueError, match="constant, moving-average, trend, arima, holt"):
        make_predictor("prophet")
