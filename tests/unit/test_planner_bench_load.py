"""The planner benchmark's load: a rate envelope x4 up and back down over a trace's arrivals."""

from __future__ import annotations

import pytest

from dynamo_grpc.bench.planner_load import Envelope, arrivals, workload
from dynamo_grpc.bench.replay_trace import Trace, TraceRequest


def test_envelope_shape_and_mean() -> None:
    env = Envelope(base_rate=1.0, peak_factor=4.0, low_s=10, ramp_s=10, hold_s=10, tail_s=10)
    assert env.duration_s == 50
    assert [env.rate(t) for t in (0, 10, 15, 20, 30, 35, 40, 49)] == [1, 1, 2.5, 4, 4, 2.5, 1, 1]
    assert env.mean_rate() == pytest.approx((10 + 25 + 40 + 25 + 10) / 50)


def test_arrivals_follow_the_envelope() -> None:
    env = Envelope(base_rate=2.0, peak_factor=4.0, low_s=20, ramp_s=10, hold_s=20, tail_s=20)
    times = arrivals(env, [1.0] * 10)
    assert len(times) == pytest.approx(env.mean_rate() * env.duration_s, abs=2)
    in_low = sum(1 for t in times if t < 20)
    in_peak = sum(1 for t in times if 30 <= t < 50)
    assert in_low == pytest.approx(40, abs=2) and in_peak == pytest.approx(160, abs=2)  # x4 the rate
    assert times == sorted(times) and times[-1] < env.duration_s


def test_workload_caps_lengths_and_says_when_the_slice_is_short() -> None:
    reqs = tuple(TraceRequest(i, float(i), 5000, 900) for i in range(300))
    trace = Trace("t", "azure", reqs, None)
    env = Envelope(base_rate=1.0, low_s=10, ramp_s=10, hold_s=10, tail_s=10)
    w = workload(trace, env, max_input=2048, max_output=64)
    assert {(r.input_length, r.output_length) for r in w} == {(2048, 64)}
    with pytest.raises(ValueError, match="trace slice has 5"):
        workload(Trace("t", "azure", reqs[:5], None), env, 2048, 64)


def test_a_quiet_trace_start_does_not_thin_the_envelope() -> None:
    # a trace whose first 50 gaps are 10x longer than the rest: the envelope still sets the rate everywhere
    gaps = [10.0] * 50 + [1.0] * 500
    env = Envelope(base_rate=2.0, peak_factor=1.0, low_s=20, ramp_s=0, hold_s=0, tail_s=0)
    times = arrivals(env, gaps)
    assert sum(1 for t in times if t < 10) == pytest.approx(20, abs=3)


def test_misses_are_counted_by_the_phase_a_request_was_sent_in() -> None:
    from dynamo_grpc.bench.planner import misses_by_phase
    from dynamo_grpc.planner.scaling import Targets

    env = Envelope(base_rate=1.0, peak_factor=4.0, low_s=10, ramp_s=10, hold_s=10, tail_s=10)
    rows = [
        [5.0, 0.1, 0.01],  # low, in SLA
        [12.0, 0.9, 0.01],  # ramp-up, TTFT miss
        [25.0, 0.9, 0.09],  # peak, both
        [29.9, 0.1, None],  # peak, one token: no ITL, in SLA
        [35.0, None, None],  # ramp-down, failed
        [45.0, 0.2, 0.06],  # tail, ITL miss
    ]
    got = misses_by_phase(rows, env, Targets(0.5, 0.05))
    assert got["low"] == {"requests": 1, "ttft_miss": 0, "itl_miss": 0, "failed": 0}
    assert got["ramp-up"] == {"requests": 1, "ttft_miss": 1, "itl_miss": 0, "failed": 0}
    assert got["peak"] == {"requests": 2, "ttft_miss": 1, "itl_miss": 1, "failed": 0}
    assert got["ramp-down"] == {"requests": 1, "ttft_miss": 0, "itl_miss": 0, "failed": 1}
    assert got["tail"] == {"requests": 1, "ttft_miss": 0, "itl_miss": 1, "failed": 0}
