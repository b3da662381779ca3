"""The mocker's own parts: the timing model and its config (its scheduling is the engine core's:
tests/unit/engines/test_scheduler.py runs it against both executors)."""

from __future__ import annotations

import pytest

from dynamo_grpc.engines.mocker.config import MockerConfig
from dynamo_grpc.engines.mocker.timing import TimingModel, decode_ms, prefill_ms


def test_timing_model_formulas_and_speedup() -> None:
    assert prefill_ms(0) == 0.0
    assert prefill_ms(1000) == pytest.approx(1.25e-6 * 1e6 + 74.1 + 26.2)
    assert decode_ms(0.0) == pytest.approx(19.44)
    assert decode_ms(1.0) == pytest.approx(-5.47 + 43.88 + 19.44)
    assert decode_ms(2.0) == decode_ms(1.0)  # clamped
    t1, t10 = TimingModel(1.0), TimingModel(10.0)
    both = t1.step_seconds(512, 3, 0.5)
    assert both == pytest.approx((prefill_ms(512) + decode_ms(0.5)) / 1000)
    assert t10.step_seconds(512, 3, 0.5) == pytest.approx(both / 10)
    assert t1.step_seconds(0, 0, 0.3) == 0.0
    assert t1.step_seconds(0, 7, 0.3) == pytest.approx(decode_ms(0.3) / 1000)  # per step, not per sequence
    with pytest.raises(ValueError):
        TimingModel(0)


def test_config_validation_names_the_bad_field() -> None:
    with pytest.raises(ValueError, match="max_num_seqs"):
        MockerConfig(max_num_seqs=0).validate()
    with pytest.raises(ValueError, match="eos_probability"):
        MockerConfig(eos_probability=1.5).validate()
    with pytest.raises(ValueError, match="eos_token_ids"):
        MockerConfig(vocab_size=10, eos_token_ids=[10]).validate()
    with pytest.raises(ValueError, match="max_waiting"):
        MockerConfig(max_waiting=0).validate()
