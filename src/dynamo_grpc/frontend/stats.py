"""Per-model inference statistics, in the shape Triton's ModelStatistics reports them."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from dynamo_grpc.frontend.metrics import FrontendMetrics


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(0, ns)


@dataclass
class ModelStats:
    """Counts and cumulative durations. `compute_input` is preprocessing (template, tokenise), `compute_infer`
    is routing plus generation, `compute_output` is building responses; `queue` is time to the first token."""

    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    responses: int = 0
    cancelled: Duration = field(default_factory=Duration)
    migrations: int = 0


class StatsBook:
    """All models' statistics; thread-safe so the HTTP and gRPC servers may share it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[str, ModelStats] = {}
        self.metrics = FrontendMetrics()  # the Prometheus side (histograms), fed by the same call sites

    def get(self, model: str) -> ModelStats:
        with self._lock:
            return self._stats.setdefault(model, ModelStats())

    def record_success(
        self,
        model: str,
        total_ns: int,
        preprocess_ns: int,
        infer_ns: int,
        first_token_ns: int,
        output_ns: int,
        responses: int,
        migrations: int = 0,
    ) -> None:
        with self._lock:
            s = self._stats.setdefault(model, ModelStats())
            s.last_inference_ms = int(time.time() * 1000)
            s.inference_count += 1
            s.execution_count += 1
            s.success.add(total_ns)
            s.compute_input.add(preprocess_ns)
            s.compute_infer.add(infer_ns)
            s.queue.add(first_token_ns)
            s.compute_output.add(output_ns)
            s.responses += responses
            s.migrations += migrations

    def record_failure(self, model: str, total_ns: int, cancelled: bool = False) -> None:
        with self._lock:
            s = self._stats.setdefault(model, ModelStats())
            if cancelled:
                s.cancelled.add(total_ns)
            else:
                s.fail.add(total_ns)

    def models(self) -> list[str]:
        with self._lock:
            return sorted(self._stats)
