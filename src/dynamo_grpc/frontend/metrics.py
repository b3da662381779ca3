"""The frontend's Prometheus metrics: Dynamo's names (so Dynamo dashboards work) and Triton's `nv_inference_*`
(so Triton dashboards work), fed once per request from its `Timings`.

Times are measured from the request's arrival at the frontend (before templating and tokenising):
TTFT to the first generated token, ITL between later tokens (per token, as vLLM and Dynamo count it), queue
time to the request's first placement on a worker (preprocess + routing), E2E to the last token.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:  # pragma: no cover
    from dynamo_grpc.frontend.pipeline import Timings

# Dynamo's frontend latency buckets (seconds), wide enough for long generations
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TOKEN_BUCKETS = (1, 8, 32, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)
TRITON_VERSION = "1"  # the version the KServe metadata reports for every model


class FrontendMetrics:
    """One frontend's metric set, in a registry of its own (several frontends can share a test process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        p = "dynamo_frontend_"
        self.requests = Counter(
            p + "requests",
            "Requests by model, protocol (kserve|openai), endpoint, request type (stream|unary) and status",
            ["model", "protocol", "endpoint", "request_type", "status"],
            registry=r,
        )
        self.inflight = Gauge(p + "inflight_requests", "Requests being served", ["model"], registry=r)
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "Arrival to first token", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            p + "inter_token_latency_seconds", "Time between tokens", ["model"], buckets=ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            p + "request_duration_seconds", "Arrival to last token", ["model"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue = Histogram(
            p + "queue_duration_seconds",
            "Arrival to first placement on a worker (preprocess + routing)",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.isl = Histogram(
            p + "input_sequence_tokens", "Prompt tokens per request", ["model"], buckets=TOKEN_BUCKETS, registry=r
        )
        self.osl = Histogram(
            p + "output_sequence_tokens", "Generated tokens per request", ["model"], buckets=TOKEN_BUCKETS, registry=r
        )
        self.input_tokens = Counter(p + "input_tokens", "Prompt tokens", ["model"], registry=r)
        self.output_tokens = Counter(p + "output_tokens", "Generated tokens", ["model"], registry=r)
        self.migrations = Counter(p + "migrations", "Requests moved off a lost worker", ["model"], registry=r)
        self.triton = TritonCounters()
        self._series: dict[str, _ModelSeries] = {}
        self._requests: dict[tuple[str, ...], Any] = {}

    def _model(self, model: str) -> _ModelSeries:
        """The model's series, looked up once (a `labels()` call takes a lock and builds a key each time)."""
        m = self._series.get(model)
        if m is None:
            m = self._series[model] = _ModelSeries(
                self.inflight.labels(model), self.ttft.labels(model), self.itl.labels(model), self.e2e.labels(model),
                self.queue.labels(model), self.isl.labels(model), self.osl.labels(model),
                self.input_tokens.labels(model), self.output_tokens.labels(model), self.migrations.labels(model),
            )  # fmt: skip
        return m

    def started(self, model: str) -> None:
        self._model(model).inflight.inc()  # also makes the migrations series 0, so dashboards chart "none"

    def finished(
        self,
        model: str,
        protocol: str,
        endpoint: str,
        stream: bool,
        status: str,
        total_ns: int,
        timings: Timings | None,
    ) -> None:
        """One request ended (`status`: success, error or cancelled); pairs with `started`."""
        m = self._model(model)
        m.inflight.dec()
        key = (model, protocol, endpoint, "stream" if stream else "unary", status)
        counter = self._requests.get(key)
        if counter is None:
            counter = self._requests[key] = self.requests.labels(*key)
        counter.inc()
        nv = self.triton
        duration = ("nv_inference_request_duration_us", total_ns / 1e3)
        if status != "success":
            nv.add(model, (duration, ("nv_inference_request_failure", 1.0)))
            return
        # one lock for the Triton counters, one bucket lookup per histogram (bisect, not a scan): this runs
        # once per request on the event loop
        t = timings
        queue_ns = t.routed_at_ns - t.arrival_ns if t is not None and t.routed_at_ns else None
        queued = () if queue_ns is None else (("nv_inference_queue_duration_us", queue_ns / 1e3),)
        nv.add(model, (duration, *_SUCCESS, *queued))
        observe_n(m.e2e, total_ns / 1e9, 1)
        if t is None:
            return
        if queue_ns is not None:
            observe_n(m.queue, queue_ns / 1e9, 1)
        if t.first_token_at_ns:
            observe_n(m.ttft, (t.first_token_at_ns - t.arrival_ns) / 1e9, 1)
        observe_pairs(m.itl, t.token_gaps)
        observe_n(m.isl, t.prompt_tokens, 1)
        observe_n(m.osl, t.output_tokens, 1)
        m.input_tokens.inc(t.prompt_tokens)
        m.output_tokens.inc(t.output_tokens)
        if t.migrations:
            m.migrations.inc(t.migrations)


_SUCCESS = (("nv_inference_request_success", 1.0), ("nv_inference_count", 1.0), ("nv_inference_exec_count", 1.0))


def observe_n(hist: Any, amount: float, n: int) -> None:
    """Record ``n`` observations of ``amount`` in a histogram series: what ``n`` ``observe`` calls record
    (the count, the bucket, the sum), in one pass; per-token ITL arrives as (gap, tokens) pairs."""
    try:
        bounds, buckets, total = hist._upper_bounds, hist._buckets, hist._sum  # prometheus_client's own series
    except AttributeError:  # another implementation: one call per observation
        for _ in range(n):
            hist.observe(amount)
        return
    total.inc(amount * n)
    buckets[bisect_left(bounds, amount)].inc(n)  # the first bound >= amount (prometheus_client's rule; +Inf last)


def observe_pairs(hist: Any, pairs: list[tuple[float, int]]) -> None:
    """`observe_n` for each (amount, n) pair, with one update per bucket touched and one of the sum."""
    if len(pairs) < 2:
        for amount, n in pairs:
            observe_n(hist, amount, n)
        return
    try:
        bounds, buckets, total = hist._upper_bounds, hist._buckets, hist._sum
    except AttributeError:
        for amount, n in pairs:
            observe_n(hist, amount, n)
        return
    counts: dict[int, int] = {}
    s = 0.0
    for amount, n in pairs:
        s += amount * n
        i = bisect_left(bounds, amount)
        counts[i] = counts.get(i, 0) + n
    total.inc(s)
    for i, n in counts.items():
        buckets[i].inc(n)


@dataclass(frozen=True)
class _ModelSeries:
    inflight: Any
    ttft: Any
    itl: Any
    e2e: Any
    queue: Any
    isl: Any
    osl: Any
    input_tokens: Any
    output_tokens: Any
    migrations: Any


TRITON_COUNTERS = {
    "nv_inference_request_success": "Number of successful inference requests, all batch sizes",
    "nv_inference_request_failure": "Number of failed inference requests, all batch sizes",
    "nv_inference_count": "Number of inferences performed (does not include cached requests)",
    "nv_inference_exec_count": "Number of model executions performed (does not include cached requests)",
    "nv_inference_request_duration_us": "Cumulative inference request duration in microseconds",
    "nv_inference_queue_duration_us": "Cumulative inference queuing duration in microseconds",
}


class TritonCounters:
    """Triton's per-model counters under Triton's exact names: prometheus_client would add `_total` to a
    counter's name, and Triton dashboards query `nv_inference_request_success`, so these are written here."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str], float] = {}

    def inc(self, name: str, model: str, amount: float = 1.0) -> None:
        with self._lock:
            self._values[(name, model)] = self._values.get((name, model), 0.0) + amount

    def add(self, model: str, amounts: tuple[tuple[str, float], ...]) -> None:
        """Several counters of one model under one lock (a request's end adds to four or five)."""
        values = self._values
        with self._lock:
            for name, amount in amounts:
                key = (name, model)
                values[key] = values.get(key, 0.0) + amount

    def exposition(self) -> bytes:
        """The counters in the Prometheus text format (one HELP/TYPE per family, as Triton writes them)."""
        with self._lock:
            values = dict(self._values)
        models = sorted({m for _, m in values})
        lines: list[str] = []
        for name, doc in TRITON_COUNTERS.items():
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} counter"]
            for m in models:
                label = m.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
                lines.append(f'{name}{{model="{label}",version="{TRITON_VERSION}"}} {values.get((name, m), 0.0)}')
        return ("\n".join(lines) + "\n").encode()
