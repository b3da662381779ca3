"""Mocker scheduler: batching limits, chunked prefill, preemption without leaks, timing model."""

from __future__ import annotations

import pytest

from dynamo_grpc.engines.base import SamplingParams
from dynamo_grpc.engines.mocker.config import MockerConfig
from dynamo_grpc.engines.mocker.request import MockRequest, Status
from dynamo_grpc.engines.mocker.scheduler import Scheduler
from dynamo_grpc.engines.mocker.timing import TimingModel, decode_ms, prefill_ms


def _sched(**kw: object) -> Scheduler:
    base: dict[str, object] = {"block_size": 4, "num_gpu_blocks": 64, "vocab_size": 1000, "watermark": 0.0}
    base.update(kw)
    return Scheduler(MockerConfig(**base))  # type: ignore[arg-type]


def _add(s: Scheduler, rid: str, n_prompt: int, max_tokens: int = 4, offset: int = 0) -> MockRequest:
    r = MockRequest(rid, [offset + i for i in range(n_prompt)], SamplingParams(max_tokens=max_tokens))
    s.add(r)
    return r


def _run(s: Scheduler, max_steps: int = 10_000) -> list[tuple[int, int, int]]:
    """Run to completion; per step (scheduled requests, scheduled tokens, running)."""
    trace = []
    for _ in range(max_steps):
        if not s.has_work():
            return trace
        out = s.schedule()
        trace.append((len(out.num_new_tokens), sum(out.num_new_tokens.values()), len(s.running)))
        s.update(out)
    raise AssertionError("did not finish")


def test_max_num_seqs_caps_the_running_batch() -> None:
    s = _sched(max_num_seqs=2)
    reqs = [_add(s, f"r{i}", 6, offset=100 * i) for i in range(5)]
    trace = _run(s)
    assert max(n for n, _, _ in trace) == 2
    assert max(r for _, _, r in trace) <= 2
    assert all(r.status is Status.FINISHED and r.finish_reason == "length" for r in reqs)
    assert s.kv.pool.num_active == 0


def test_max_num_batched_tokens_caps_a_step_and_chunks_long_prompts() -> None:
    s = _sched(max_num_batched_tokens=10)
    long = _add(s, "long", 25, max_tokens=2)
    _add(s, "short", 3, max_tokens=2, offset=500)
    out = s.schedule()
    assert out.num_new_tokens == {"long": 10}  # the budget is spent on the first chunk
    s.update(out)
    assert long.num_computed == 10 and long.num_output == 0
    trace = _run(s)
    assert all(tokens <= 10 for _, tokens, _ in trace)
    assert long.num_output == 2


def test_decodes_and_prefill_chunks_share_a_step() -> None:
    s = _sched(max_num_batched_tokens=8)
    a = _add(s, "a", 3, max_tokens=10)
    s.update(s.schedule())  # a prefilled, first token sampled
    _add(s, "b", 20, max_tokens=2, offset=300)
    out = s.schedule()
    assert out.num_new_tokens == {"a": 1, "b": 7}
    assert out.num_decodes == 1 and out.prefill_tokens == 7
    assert a.num_output == 1


def test_preemption_under_a_tiny_cache_finishes_everything_without_leaks() -> None:
    s = _sched(num_gpu_blocks=6)  # 24 tokens of KV for two requests that want 2 x 20
    a = _add(s, "a", 8, max_tokens=12)
    b = _add(s, "b", 8, max_tokens=12, offset=100)
    _run(s)
    assert s.num_preemptions > 0
    assert a.finish_reason == b.finish_reason == "length"
    assert a.num_output == b.num_output == 12
    assert s.kv.pool.num_active == 0 and not s.requests


def test_abort_frees_blocks_wherever_the_request_is() -> None:
    s = _sched(max_num_seqs=1)
    run = _add(s, "run", 9)
    wait = _add(s, "wait", 9, offset=100)
    s.update(s.schedule())
    assert run.status is Status.RUNNING and wait.status is Status.WAITING
    assert s.kv.pool.num_active == 3
    s.abort("run")
    s.abort("wait")
    assert s.kv.pool.num_active == 0 and not s.has_work()
    assert run.finish_reason == "cancelled"


def test_request_stops_at_the_context_length() -> None:
    s = _sched(context_length=12)
    r = MockRequest("r", list(range(8)), SamplingParams(max_tokens=100), max_total_tokens=12)
    s.add(r)
    _run(s)
    assert r.finish_reason == "length" and r.num_tokens == 12


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
