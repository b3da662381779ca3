"""Forecast the next interval's value of a series (request rate, ISL, OSL) from the ones observed so far.

``constant`` (the last value), ``moving-average`` (mean of the last ``window``), ``trend`` (the last value plus
half the least-squares slope of the last ``window``, none once the last step turns), and two model-based ones from
statsmodels (the ``planner`` extra): ``arima`` (ARIMA(1,1,0) with drift: follows a ramp) and ``holt`` (Holt's
linear trend, exponential smoothing). The model-based ones need a few points; until they have them, and when a
fit fails, they answer as ``constant`` does. A forecast is never negative.
"""

from __future__ import annotations

import warnings
from collections import deque
from typing import Protocol

#: points a model-based predictor needs before it fits
MIN_FIT_POINTS = 5
#: points kept (old load says little about the next interval, and fits stay cheap)
HISTORY = 60


class Predictor(Protocol):
    name: str

    def add(self, value: float) -> None: ...

    def predict(self) -> float: ...


class _History:
    name = "constant"

    def __init__(self) -> None:
        self.values: deque[float] = deque(maxlen=HISTORY)

    def add(self, value: float) -> None:
        self.values.append(float(value))

    def last(self) -> float:
        return self.values[-1] if self.values else 0.0


class ConstantPredictor(_History):
    """Next = last."""

    name = "constant"

    def predict(self) -> float:
        return max(0.0, self.last())


class MovingAveragePredictor(_History):
    """Next = mean of the last ``window`` values."""

    name = "moving-average"

    def __init__(self, window: int = 3) -> None:
        super().__init__()
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window

    def predict(self) -> float:
        tail = list(self.values)[-self.window :]
        return max(0.0, sum(tail) / len(tail)) if tail else 0.0


#: share of the fitted slope the ``trend`` forecast adds to the last value (a damped trend, Gardner & McKenzie):
#: a full step overshoots a ramp's end by a whole interval's rise
TREND_DAMPING = 0.5


class TrendPredictor(_History):
    """A damped trend: the last value plus ``damping`` x the least-squares slope of the last ``window`` values.

    It follows a ramp from its second point (the model-based ones need five). Two rules keep it from overshooting a
    ramp's end, which costs workers for nothing: the slope is damped, and it is dropped (the forecast is the last
    value) when the last step went the other way (the ramp has turned, or a level was reached)."""

    name = "trend"

    def __init__(self, window: int = 3, damping: float = TREND_DAMPING) -> None:
        super().__init__()
        if window < 2:
            raise ValueError("the trend predictor needs a window of at least 2")
        if not 0.0 <= damping <= 1.0:
            raise ValueError("the trend damping must be in [0, 1]")
        self.window = window
        self.damping = damping

    def predict(self) -> float:
        tail = list(self.values)[-self.window :]
        if len(tail) < 2:
            return max(0.0, self.last())
        n = len(tail)
        mean_x, mean_y = (n - 1) / 2.0, sum(tail) / n
        sxx = sum((i - mean_x) ** 2 for i in range(n))
        slope = sum((i - mean_x) * (y - mean_y) for i, y in enumerate(tail)) / sxx
        step = tail[-1] - tail[-2]
        if slope * step <= 0:  # the last step turned (or stood still): no trend left to follow
            return max(0.0, tail[-1])
        return max(0.0, tail[-1] + self.damping * slope)


class _Fitted(_History):
    """A statsmodels model refit on the history each interval; too short, flat or unfittable: the last value."""

    def _forecast(self, values: list[float]) -> float:
        raise NotImplementedError

    def predict(self) -> float:
        if len(self.values) < MIN_FIT_POINTS or len(set(self.values)) == 1:
            return max(0.0, self.last())
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence chatter on short series
                value = self._forecast(list(self.values))
        except (ValueError, ArithmeticError, IndexError):
            return max(0.0, self.last())
        return max(0.0, value)


class ArimaPredictor(_Fitted):
    """ARIMA(1,1,0) with drift (statsmodels): a ramp continues, a level stays."""

    name = "arima"

    def __init__(self) -> None:
        super().__init__()
        from statsmodels.tsa.arima.model import ARIMA  # noqa: F401  (fail at construction if the extra is missing)

    def _forecast(self, values: list[float]) -> float:
        from statsmodels.tsa.arima.model import ARIMA

        return float(ARIMA(values, order=(1, 1, 0), trend="t").fit().forecast(1)[0])


class HoltPredictor(_Fitted):
    """Holt's linear trend (statsmodels ExponentialSmoothing, additive trend)."""

    name = "holt"

    def __init__(self) -> None:
        super().__init__()
        from statsmodels.tsa.holtwinters import ExponentialSmoothing  # noqa: F401

    def _forecast(self, values: list[float]) -> float:
        from statsmodels.tsa.holtwinters import ExponentialSmoothing

        return float(ExponentialSmoothing(values, trend="add").fit().forecast(1)[0])


PREDICTORS = ("constant", "moving-average", "trend", "arima", "holt")


def make_predictor(name: str, window: int = 3) -> Predictor:
    """A fresh predictor by its ``--predictor`` name; ValueError names the choices."""
    if name == "constant":
        return ConstantPredictor()
    if name == "moving-average":
        return MovingAveragePredictor(window)
    if name == "trend":
        return TrendPredictor(max(2, window))
    if name == "arima":
        return ArimaPredictor()
    if name == "holt":
        return HoltPredictor()
    raise ValueError(f"unknown predictor {name!r} (choose from {', '.join(PREDICTORS)})")
