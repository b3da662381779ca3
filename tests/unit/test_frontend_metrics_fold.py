"""Requests are queued and folded into the Prometheus series in batches (FrontendMetrics.fold); every read of the
registry or of the Triton counters must see exactly what per-request updates would have written."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_grpc.frontend.metrics import FOLD_EVERY, FrontendMetrics
from dynamo_grpc.frontend.pipeline import Timings

_GAPS = st.lists(st.tuples(st.sampled_from([0.0004, 0.001, 0.003, 0.02, 3.0]), st.integers(1, 6)), max_size=3)
_REQ = st.tuples(
    st.sampled_from(["a", "b"]),
    st.sampled_from(["success", "success", "error", "cancelled"]),
    st.integers(1, 10**10),  # total ns
    st.booleans(),  # timings present
    st.integers(0, 10**7),  # queue ns (0: not routed)
    st.integers(0, 10**8),  # first token ns (0: none)
    _GAPS,
    st.integers(1, 5000),
    st.integers(0, 3000),
    st.integers(0, 2),  # migrations
    st.booleans(),  # read the registry after this request (a scrape in the middle)
)


def _series(m: FrontendMetrics) -> dict[str, float]:
    return {
        f"{s.name}{sorted(s.labels.items())}": s.value
        for metric in m.registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def _per_request(ref: FrontendMetrics, model: str, status: str, total_ns: int, t: Timings | None) -> None:
    """What a request's end wrote before folding: one update per observation, straight into the series."""
    ref._model(model).inflight.dec()
    ref.requests.labels(model, "kserve", "model_stream_infer", "stream", status).inc()
    tri = [("nv_inference_request_duration_us", total_ns / 1e3)]
    if status != "success":
        ref.triton.add(model, (*tri, ("nv_inference_request_failure", 1.0)))
        return
    tri += [("nv_inference_request_success", 1.0), ("nv_inference_count", 1.0), ("nv_inference_exec_count", 1.0)]
    if t is not None and t.routed_at_ns:
        tri.append(("nv_inference_queue_duration_us", (t.routed_at_ns - t.arrival_ns) / 1e3))
    ref.triton.add(model, tuple(tri))
    ref.e2e.labels(model).observe(total_ns / 1e9)
    if t is None:
        return
    if t.routed_at_ns:
        ref.queue.labels(model).observe((t.routed_at_ns - t.arrival_ns) / 1e9)
    if t.first_token_at_ns:
        ref.ttft.labels(model).observe((t.first_token_at_ns - t.arrival_ns) / 1e9)
    for gap, k in t.token_gaps:
        for _ in range(k):
            ref.itl.labels(model).observe(gap)
    ref.isl.labels(model).observe(t.prompt_tokens)
    ref.osl.labels(model).observe(t.output_tokens)
    ref.input_tokens.labels(model).inc(t.prompt_tokens)
    ref.output_tokens.labels(model).inc(t.output_tokens)
    if t.migrations:
        ref.migrations.labels(model).inc(t.migrations)


def _same(m: FrontendMetrics, ref: FrontendMetrics) -> None:
    got, want = _series(m), _series(ref)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9), k
    assert m.triton.exposition().splitlines() == ref.triton.exposition().splitlines() or _close(m, ref)


def _close(m: FrontendMetrics, ref: FrontendMetrics) -> bool:
    """The Triton sums may differ in float rounding only."""
    mine, theirs = m.triton.exposition().decode().splitlines(), ref.triton.exposition().decode().splitlines()
    for a, b in zip(mine, theirs, strict=True):
        if a != b:
            (ka, va), (kb, vb) = a.rsplit(" ", 1), b.rsplit(" ", 1)
            assert ka == kb and float(va) == pytest.approx(float(vb), rel=1e-9), (a, b)
    return True


@settings(max_examples=25, deadline=None)
@given(st.lists(_REQ, max_size=90), st.integers(0, 3))
def test_folded_series_read_as_per_request_updates(reqs: list[tuple], still_running: int) -> None:
    m, ref = FrontendMetrics(), FrontendMetrics()
    for model, status, total, has_t, queue, first, gaps, isl, osl, mig, scrape in reqs:
        t = None
        if has_t:
            t = Timings(arrival_ns=1000, routed_at_ns=1000 + queue if queue else 0,
                        first_token_at_ns=1000 + first if first else 0, prompt_tokens=isl, output_tokens=osl,
                        token_gaps=list(gaps), migrations=mig)  # fmt: skip
        m.started(model)
        ref._model(model).inflight.inc()  # the start made every series of the model (migrations 0 included)
        m.finished(model, "kserve", "model_stream_infer", True, status, total, t)
        _per_request(ref, model, status, total, t)
        if scrape:
            _same(m, ref)
    for _ in range(still_running):
        m.started("a")
        ref._model("a").inflight.inc()
    _same(m, ref)
    if still_running:
        assert _series(m)["dynamo_frontend_inflight_requests[('model', 'a')]"] == still_running


def test_unread_requests_are_folded_every_batch() -> None:
    """Without a scrape the queue stays bounded: the request that fills a batch folds it."""
    m = FrontendMetrics()
    for _ in range(FOLD_EVERY * 3 + 5):
        m.started("a")
        m.finished("a", "kserve", "model_stream_infer", True, "error", 1000, None)
        assert len(m._pending) < FOLD_EVERY * 2
    assert m.requests.labels("a", "kserve", "model_stream_infer", "stream", "error")._value.get() >= FOLD_EVERY * 3
    assert _series(m)["dynamo_frontend_requests_total[('endpoint', 'model_stream_infer'), ('model', 'a'), " \
                      "('protocol', 'kserve'), ('request_type', 'stream'), ('status', 'error')]"] == FOLD_EVERY * 3 + 5
