"""The planner benchmark's load: request lengths from a public trace, arrivals from a rate envelope.

The envelope is piecewise linear: ``low`` seconds at the base rate, a ramp to ``peak_factor`` x base, a hold at
the peak, a ramp back down, and ``tail`` seconds at the base rate again. Arrivals keep the trace's burstiness:
its inter-arrival gaps, normalised to mean 1, form a unit-rate process that is time-warped through the
envelope's cumulative rate (request i arrives when the integral of the rate reaches u_i).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

import numpy as np

from dynamo_grpc.bench.replay_trace import Trace, TraceRequest


@dataclass(frozen=True, slots=True)
class Envelope:
    base_rate: float = 1.0  # requests/s
    peak_factor: float = 4.0
    low_s: float = 30.0
    ramp_s: float = 20.0
    hold_s: float = 30.0
    tail_s: float = 40.0

    @property
    def duration_s(self) -> float:
        return self.low_s + 2 * self.ramp_s + self.hold_s + self.tail_s

    @property
    def peak_rate(self) -> float:
        return self.base_rate * self.peak_factor

    def knots(self) -> tuple[list[float], list[float]]:
        t1 = self.low_s
        t2 = t1 + self.ramp_s
        t3 = t2 + self.hold_s
        t4 = t3 + self.ramp_s
        b, p = self.base_rate, self.peak_rate
        return [0.0, t1, t2, t3, t4, self.duration_s], [b, b, p, p, b, b]

    def rate(self, t: float) -> float:
        xs, ys = self.knots()
        return float(np.interp(t, xs, ys))

    def mean_rate(self) -> float:
        xs, ys = self.knots()
        area = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))
        return area / self.duration_s


#: gaps averaged around each one to find the trace's local rate
LOCAL_WINDOW = 21


def local_unit_gaps(gaps: list[float]) -> np.ndarray:
    """The gaps divided by their local mean (a centred window): the trace's own rate changes (a quiet start, a
    busy hour) are taken out, so the envelope alone sets the rate while the short-term burstiness stays."""
    g = np.clip(np.asarray(gaps, dtype=np.float64), 0.0, None)
    if g.size == 0 or g.sum() <= 0:
        return np.ones(max(1, g.size))
    k = min(LOCAL_WINDOW, g.size)
    kernel = np.ones(k) / k
    padded = np.pad(g, (k // 2, k - 1 - k // 2), mode="edge")
    local = np.convolve(padded, kernel, mode="valid")
    local[local <= 0] = g.mean()
    return g / local


def arrivals(env: Envelope, gaps: list[float], dt: float = 0.01) -> list[float]:
    """Arrival times in [0, duration): the unit-rate process of ``gaps`` (locally normalised) warped through
    ``env``."""
    if not gaps:
        raise ValueError("need at least one inter-arrival gap")
    g = local_unit_gaps(gaps)
    grid = np.arange(0.0, env.duration_s + dt, dt)
    rates = np.interp(grid, *env.knots())
    cum = np.concatenate([[0.0], np.cumsum((rates[1:] + rates[:-1]) / 2 * dt)])
    out: list[float] = []
    u = 0.0
    i = 0
    cum_list = cum.tolist()
    while True:
        u += float(g[i % len(g)])
        i += 1
        k = bisect.bisect_left(cum_list, u)
        if k >= len(cum_list):
            return out
        out.append(float(grid[k]))


def workload(trace: Trace, env: Envelope, max_input: int, max_output: int) -> list[TraceRequest]:
    """The trace's requests in order, with lengths capped and arrivals from the envelope."""
    src = trace.requests
    gaps = [b.arrival_s - a.arrival_s for a, b in itertools.pairwise(src)] or [1.0]
    times = arrivals(env, gaps)
    if len(times) > len(src):
        raise ValueError(f"the envelope wants {len(times)} requests; the trace slice has {len(src)}")
    return [
        TraceRequest(i, t, min(r.input_length, max_input), max(2, min(r.output_length, max_output)))
        for i, (t, r) in enumerate(zip(times, src, strict=False))
    ]
