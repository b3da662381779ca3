"""What the frontends saw over the last interval: request rate, mean ISL/OSL, mean TTFT and ITL.

Two sources of the same numbers, both from the frontend's own metrics (frontend/metrics.py):

* :class:`ScrapeSource` reads each frontend's ``/metrics`` and differences the cumulative counters and histogram
  sums between two reads (several frontends are summed);
* :class:`PrometheusSource` asks a Prometheus server (HTTP API ``/api/v1/query``) for
  ``sum(increase(<series>[<interval>s]))`` of the same series.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from dynamo_grpc.planner.scaling import Load

P = "dynamo_frontend_"
#: the series the planner reads, by what it makes of them
SERIES = {
    "requests": P + "requests_total",
    "ttft_sum": P + "time_to_first_token_seconds_sum",
    "ttft_count": P + "time_to_first_token_seconds_count",
    "itl_sum": P + "inter_token_latency_seconds_sum",
    "itl_count": P + "inter_token_latency_seconds_count",
    "isl_sum": P + "input_sequence_tokens_sum",
    "isl_count": P + "input_sequence_tokens_count",
    "osl_sum": P + "output_sequence_tokens_sum",
    "osl_count": P + "output_sequence_tokens_count",
}
#: a gauge: requests being served. Arrivals over an interval = finished + the change in this, so the rate the
#: planner sees is the arrival rate, not the completion rate (which lags a ramp by a request's duration)
INFLIGHT = P + "inflight_requests"


class ObserveError(RuntimeError):
    """No metrics could be read; the message names the source."""


@dataclass(frozen=True, slots=True)
class Observation:
    duration_s: float
    #: requests that arrived in the interval (finished ones + the change in those in flight)
    requests: float
    ttft_s: float | None  # None: no request finished in the interval
    itl_s: float | None
    isl: float | None
    osl: float | None

    @property
    def rate(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def load(self, fallback: Load | None = None) -> Load:
        """The interval as a :class:`Load` (lengths from ``fallback`` when nothing finished)."""
        fb = fallback or Load(0.0, 0.0, 0.0)
        return Load(
            self.rate, self.isl if self.isl is not None else fb.isl, self.osl if self.osl is not None else fb.osl
        )


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def observation(totals: dict[str, float], duration_s: float) -> Observation:
    t = totals
    return Observation(
        duration_s=duration_s,
        requests=max(0.0, t.get("requests", 0.0) + t.get("inflight_delta", 0.0)),
        ttft_s=_ratio(t.get("ttft_sum", 0.0), t.get("ttft_count", 0.0)),
        itl_s=_ratio(t.get("itl_sum", 0.0), t.get("itl_count", 0.0)),
        isl=_ratio(t.get("isl_sum", 0.0), t.get("isl_count", 0.0)),
        osl=_ratio(t.get("osl_sum", 0.0), t.get("osl_count", 0.0)),
    )


def parse_totals(text: str) -> dict[str, float]:
    """The planner's series summed over labels, from one Prometheus text exposition."""
    by_name = {v: k for k, v in SERIES.items()}
    by_name[INFLIGHT] = "inflight"
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = by_name.get(sample.name)
            if key is not None:
                out[key] = out.get(key, 0.0) + float(sample.value)
    return out


def _get(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body: bytes = resp.read()
    return body


class ScrapeSource:
    """Differences of the frontends' cumulative metrics between calls of :meth:`observe`.

    ``targets`` returns the current ``host:port`` (or URL) list, so frontends found later (Consul) are included;
    a frontend seen for the first time contributes from its second read on. A frontend that restarted (a counter
    went down) contributes from its restart.
    """

    def __init__(self, targets: Callable[[], list[str]], timeout_s: float = 5.0) -> None:
        self.targets = targets
        self.timeout_s = timeout_s
        self._last: dict[str, dict[str, float]] = {}
        self._last_t: float | None = None

    @staticmethod
    def url(target: str) -> str:
        base = target if "://" in target else f"http://{target}"
        return base if base.rstrip("/").endswith("/metrics") else base.rstrip("/") + "/metrics"

    def observe(self) -> Observation:
        now = time.monotonic()
        summed: dict[str, float] = {}
        errors: list[str] = []
        seen: dict[str, dict[str, float]] = {}
        for target in self.targets():
            try:
                cur = parse_totals(_get(self.url(target), self.timeout_s).decode())
            except (urllib.error.URLError, OSError, ValueError) as e:
                errors.append(f"{target}: {e}")
                continue
            seen[target] = cur
            prev = self._last.get(target)
            if prev is None:
                continue
            restarted = cur.get("requests", 0.0) < prev.get("requests", 0.0)
            for key, value in cur.items():
                if key == "inflight":  # a gauge: its change, not an increase
                    change = value - (0.0 if restarted else prev.get(key, 0.0))
                    summed["inflight_delta"] = summed.get("inflight_delta", 0.0) + change
                    continue
                delta = value - prev.get(key, 0.0)
                summed[key] = summed.get(key, 0.0) + (delta if delta >= 0 else value)
        if not seen and errors:
            raise ObserveError("no frontend metrics could be read: " + "; ".join(errors))
        duration = now - self._last_t if self._last_t is not None else 0.0
        self._last, self._last_t = seen, now
        return observation(summed, duration)


class PrometheusSource:
    """The same series through a Prometheus server's HTTP API, over the last ``interval_s``."""

    def __init__(self, base_url: str, interval_s: float, selector: str = "", timeout_s: float = 10.0) -> None:
        self.base = base_url.rstrip("/")
        self.interval_s = interval_s
        self.selector = selector  # e.g. '{namespace="dynamo"}'
        self.timeout_s = timeout_s

    def query(self, promql: str) -> float:
        url = f"{self.base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        try:
            body = json.loads(_get(url, self.timeout_s))
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ObserveError(f"prometheus {self.base}: {e}") from None
        if body.get("status") != "success":
            raise ObserveError(f"prometheus {self.base}: {body.get('errorType')}: {body.get('error')}")
        result = body.get("data", {}).get("result", [])
        return sum(float(r["value"][1]) for r in result) if result else 0.0

    def observe(self) -> Observation:
        window = f"{max(1, round(self.interval_s))}s"
        totals = {key: self.query(f"sum(increase({name}{self.selector}[{window}]))") for key, name in SERIES.items()}
        totals["inflight_delta"] = self.query(f"sum(delta({INFLIGHT}{self.selector}[{window}]))")
        return observation(totals, float(max(1, round(self.interval_s))))
