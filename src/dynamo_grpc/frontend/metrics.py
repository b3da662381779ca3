"""The frontend's Prometheus metrics: Dynamo's names (so Dynamo dashboards work) and Triton's `nv_inference_*`
(so Triton dashboards work), fed once per request from its `Timings`.

Times are measured from the request's arrival at the frontend (before templating and tokenising):
TTFT to the first generated token, ITL between later tokens (per token, as vLLM and Dynamo count it), queue
time to the request's first placement on a worker (preprocess + routing), E2E to the last token.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import deque
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


#: requests recorded before `finished` folds them into the series itself (a scrape folds whatever is pending)
FOLD_EVERY = 64


class _FoldFirst:
    """A collector with no series whose `collect` folds the pending requests: registered before the metric set,
    it runs first in `CollectorRegistry.collect` (collectors run in registration order), so every read of the
    registry (generate_latest, get_sample_value) sees every request that has finished."""

    def __init__(self, fold: Any) -> None:
        self._fold = fold

    def collect(self) -> list[Any]:
        self._fold()
        return []


class FrontendMetrics:
    """One frontend's metric set, in a registry of its own (several frontends can share a test process).

    `started` and `finished` only queue the request's numbers; `fold` adds them to the series in batches (every
    FOLD_EVERY requests and before every read), one update per series and bucket touched per batch instead of
    ~17 locked updates per request. What a scrape reads is the same as per-request updates (up to float
    rounding of the sums).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self._pending: deque[tuple[Any, ...]] = deque()  # append/popleft are atomic: no lock per request
        self._fold_lock = threading.Lock()
        r.register(_FoldFirst(self.fold))  # type: ignore[arg-type]  # before the series: see _FoldFirst
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
        self.triton = TritonCounters(before_read=self.fold)
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
        self._pending.append((model,))

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
        pending = self._pending
        pending.append((model, protocol, endpoint, stream, status, total_ns, timings))
        if len(pending) >= FOLD_EVERY:
            self.fold()

    def fold(self) -> None:
        """Add the queued requests to the series: what per-request updates would have added."""
        with self._fold_lock:
            pending = self._pending
            n = len(pending)
            if not n:
                return
            inflight: dict[str, int] = {}
            requests: dict[tuple[str, ...], int] = {}
            adds: dict[Any, float] = {}  # counter or gauge child -> amount
            observed: dict[Any, list[tuple[float, int]]] = {}  # histogram child -> its new (amount, count) pairs
            nv: dict[str, dict[str, float]] = {}

            def observe(hist: Any, amount: float, k: int) -> None:
                observed.setdefault(hist, []).append((amount, k))

            for _ in range(n):
                rec = pending.popleft()
                model = rec[0]
                if len(rec) == 1:  # started
                    self._model(model)  # also makes the migrations series 0, so dashboards chart "none"
                    inflight[model] = inflight.get(model, 0) + 1
                    continue
                _, protocol, endpoint, stream, status, total_ns, t = rec
                m = self._model(model)
                inflight[model] = inflight.get(model, 0) - 1
                key = (model, protocol, endpoint, "stream" if stream else "unary", status)
                requests[key] = requests.get(key, 0) + 1
                tri = nv.setdefault(model, {})
                tri["nv_inference_request_duration_us"] = tri.get("nv_inference_request_duration_us", 0.0) + (
                    total_ns / 1e3
                )
                if status != "success":
                    tri["nv_inference_request_failure"] = tri.get("nv_inference_request_failure", 0.0) + 1.0
                    continue
                for name in _SUCCESS:
                    tri[name] = tri.get(name, 0.0) + 1.0
                queue_ns = t.routed_at_ns - t.arrival_ns if t is not None and t.routed_at_ns else None
                if queue_ns is not None:
                    q = "nv_inference_queue_duration_us"
                    tri[q] = tri.get(q, 0.0) + queue_ns / 1e3
                observe(m.e2e, total_ns / 1e9, 1)
                if t is None:
                    continue
                if queue_ns is not None:
                    observe(m.queue, queue_ns / 1e9, 1)
                if t.first_token_at_ns:
                    observe(m.ttft, (t.first_token_at_ns - t.arrival_ns) / 1e9, 1)
                for gap, k in t.token_gaps:
                    observe(m.itl, gap, k)
                observe(m.isl, t.prompt_tokens, 1)
                observe(m.osl, t.output_tokens, 1)
                adds[m.input_tokens] = adds.get(m.input_tokens, 0) + t.prompt_tokens
                adds[m.output_tokens] = adds.get(m.output_tokens, 0) + t.output_tokens
                if t.migrations:
                    adds[m.migrations] = adds.get(m.migrations, 0) + t.migrations
            for model, d in inflight.items():
                if d > 0:
                    self._model(model).inflight.inc(d)
                elif d < 0:
                    self._model(model).inflight.dec(-d)
            for labels, k in requests.items():
                counter = self._requests.get(labels)
                if counter is None:
                    counter = self._requests[labels] = self.requests.labels(*labels)
                counter.inc(k)
            for model, amounts in nv.items():
                self.triton.add(model, tuple(amounts.items()))
            for hist, pairs in observed.items():
                observe_pairs(hist, pairs)
            for child, amount in adds.items():
                child.inc(amount)


_SUCCESS = ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count")


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

    def __init__(self, before_read: Any = None) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str], float] = {}
        self._before_read = before_read  # FrontendMetrics.fold: queued requests counted before a read

    def add(self, model: str, amounts: tuple[tuple[str, float], ...]) -> None:
        """Several counters of one model under one lock (a request's end adds to four or five)."""
        values = self._values
        with self._lock:
            for name, amount in amounts:
                key = (name, model)
                values[key] = values.get(key, 0.0) + amount

    def exposition(self) -> bytes:
        """The counters in the Prometheus text format (one HELP/TYPE per family, as Triton writes them)."""
        if self._before_read is not None:
            self._before_read()
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
