"""The ITL histogram takes a (gap, tokens) pair in one call; it must read exactly as one observation per token."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Histogram

from dynamo_grpc.frontend.metrics import ITL_BUCKETS, FrontendMetrics, observe_n, observe_pairs
from dynamo_grpc.frontend.pipeline import Timings


def _series(reg: CollectorRegistry) -> dict[str, float]:
    return {
        f"{s.name}{sorted(s.labels.items())}": s.value
        for metric in reg.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def _two_itl_histograms() -> tuple[CollectorRegistry, CollectorRegistry, Any, Any]:
    """The same ITL histogram in two registries: one fed in bulk, one observation at a time."""
    bulk, single = CollectorRegistry(), CollectorRegistry()
    hb = Histogram("itl", "itl", ["model"], buckets=ITL_BUCKETS, registry=bulk).labels("m")
    hs = Histogram("itl", "itl", ["model"], buckets=ITL_BUCKETS, registry=single).labels("m")
    return bulk, single, hb, hs


def _assert_same_series(bulk: CollectorRegistry, single: CollectorRegistry) -> dict[str, float]:
    got, want = _series(bulk), _series(single)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k]), k
    return want


@pytest.mark.parametrize("pairs", [[(0.0004, 3)], [(0.001, 1), (0.001, 5)], [(0.02, 7), (3.0, 2), (0.0025, 16)]])
def test_observe_n_reads_as_one_observation_per_token(pairs: list[tuple[float, int]]) -> None:
    bulk, single, hb, hs = _two_itl_histograms()
    for gap, n in pairs:
        observe_n(hb, gap, n)
        for _ in range(n):
            hs.observe(gap)
    want = _assert_same_series(bulk, single)
    assert want["itl_count[('model', 'm')]"] == sum(n for _, n in pairs)


@pytest.mark.parametrize("pairs", [[], [(0.0004, 3)], [(0.02, 7), (3.0, 2), (0.0025, 16), (0.02, 1), (0.0005, 2)]])
def test_observe_pairs_reads_as_one_observation_per_token(pairs: list[tuple[float, int]]) -> None:
    """Pairs are grouped by bucket (one update per bucket touched); the series must read as per-token observes,
    a gap equal to a bound included (prometheus_client counts amount <= bound)."""
    bulk, single, hb, hs = _two_itl_histograms()
    observe_pairs(hb, pairs)
    for gap, n in pairs:
        for _ in range(n):
            hs.observe(gap)
    _assert_same_series(bulk, single)


def test_a_finished_request_feeds_every_series_once() -> None:
    m = FrontendMetrics()
    t = Timings(arrival_ns=0, routed_at_ns=2_000_000, first_token_at_ns=5_000_000, prompt_tokens=20,
                output_tokens=16, token_gaps=[(0.001, 3), (0.004, 12)])
    m.started("m")
    m.finished("m", "kserve", "model_stream_infer", True, "success", 9_000_000, t)
    m.started("m")
    m.finished("m", "kserve", "model_stream_infer", True, "error", 1_000_000, None)
    s = _series(m.registry)
    assert s["dynamo_frontend_inter_token_latency_seconds_count[('model', 'm')]"] == 15
    assert s["dynamo_frontend_inter_token_latency_seconds_sum[('model', 'm')]"] == pytest.approx(0.003 + 0.048)
    assert s["dynamo_frontend_inter_token_latency_seconds_bucket[('le', '0.001'), ('model', 'm')]"] == 3
    assert s["dynamo_frontend_queue_duration_seconds_sum[('model', 'm')]"] == pytest.approx(0.002)
    assert s["dynamo_frontend_time_to_first_token_seconds_bucket[('le', '0.005'), ('model', 'm')]"] == 1
    assert s["dynamo_frontend_time_to_first_token_seconds_bucket[('le', '0.0025'), ('model', 'm')]"] == 0
    assert s["dynamo_frontend_request_duration_seconds_count[('model', 'm')]"] == 1  # the successful one
    assert s["dynamo_frontend_input_sequence_tokens_sum[('model', 'm')]"] == 20
    assert s["dynamo_frontend_inflight_requests[('model', 'm')]"] == 0
    text = m.triton.exposition().decode()
    assert 'nv_inference_request_success{model="m",version="1"} 1.0' in text
    assert 'nv_inference_request_failure{model="m",version="1"} 1.0' in text
    assert 'nv_inference_request_duration_us{model="m",version="1"} 10000.0' in text
    assert 'nv_inference_queue_duration_us{model="m",version="1"} 2000.0' in text
    assert 'nv_inference_exec_count{model="m",version="1"} 1.0' in text
