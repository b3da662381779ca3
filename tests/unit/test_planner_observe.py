"""The planner reads the frontend's real metric set: scraped /metrics differences and the Prometheus HTTP API."""

from __future__ import annotations

import http.server
import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from prometheus_client import generate_latest

from dynamo_grpc.frontend.metrics import FrontendMetrics
from dynamo_grpc.planner.observe import SERIES, ObserveError, PrometheusSource, ScrapeSource


@contextmanager
def serve(handler: Callable[[str], tuple[int, bytes]]) -> Iterator[str]:
    """A loopback HTTP server answering GET path -> (status, body); yields host:port."""

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = handler(self.path)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def finish(fm: FrontendMetrics, ttft: float, itl: float, isl: int, osl: int) -> None:
    """One finished request, recorded the way the frontend records it."""
    fm.requests.labels("m", "kserve", "ModelStreamInfer", "stream", "success").inc()
    fm.ttft.labels("m").observe(ttft)
    for _ in range(osl - 1):
        fm.itl.labels("m").observe(itl)
    fm.isl.labels("m").observe(isl)
    fm.osl.labels("m").observe(osl)


def test_scrape_differences_two_frontends() -> None:
    a, b = FrontendMetrics(), FrontendMetrics()
    finish(a, 5.0, 1.0, 9999, 3)  # before the baseline: must not count
    with (
        serve(lambda _: (200, generate_latest(a.registry))) as ha,
        serve(lambda _: (200, generate_latest(b.registry))) as hb,
    ):
        src = ScrapeSource(lambda: [ha, hb])
        assert src.observe().duration_s == 0.0  # the baseline
        finish(a, 0.2, 0.01, 1000, 11)
        finish(b, 0.4, 0.03, 3000, 11)
        a.started("m")  # one more arrived and is still being served: it counts as an arrival
        obs = src.observe()
    assert obs.requests == 3
    assert obs.ttft_s == pytest.approx(0.3)
    assert obs.itl_s == pytest.approx(0.02)
    assert obs.isl == pytest.approx(2000)
    assert obs.osl == pytest.approx(11)
    assert obs.duration_s > 0 and obs.rate == pytest.approx(3 / obs.duration_s)


def test_scrape_with_every_frontend_down_says_so() -> None:
    src = ScrapeSource(lambda: ["127.0.0.1:1"], timeout_s=0.5)
    with pytest.raises(ObserveError, match="no frontend metrics"):
        src.observe()


def test_prometheus_queries_increase_over_the_interval() -> None:
    values = {
        "requests_total": 120, "time_to_first_token_seconds_sum": 36, "time_to_first_token_seconds_count": 120,
        "inter_token_latency_seconds_sum": 60, "inter_token_latency_seconds_count": 1200,
        "input_sequence_tokens_sum": 120_000, "input_sequence_tokens_count": 120,
        "output_sequence_tokens_sum": 1320, "output_sequence_tokens_count": 120,
    }  # fmt: skip
    asked: list[str] = []

    def api(path: str) -> tuple[int, bytes]:
        url = urllib.parse.urlparse(path)
        assert url.path == "/api/v1/query"
        q = urllib.parse.parse_qs(url.query)["query"][0]
        asked.append(q)
        if q.startswith("sum(delta("):  # the in-flight gauge's change: 4 more in flight than a minute ago
            return 200, json.dumps({"status": "success", "data": {"resultType": "vector", "result": [
                {"metric": {}, "value": [1700000000.0, "4"]}]}}).encode()  # fmt: skip
        name = q.split("increase(dynamo_frontend_", 1)[1].split("{", 1)[0]
        # Prometheus' documented instant-vector shape: value is [unix time, "string"]
        body = {"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {}, "value": [1700000000.0, str(values[name] / 2)]},
            {"metric": {"instance": "b"}, "value": [1700000000.0, str(values[name] / 2)]},
        ]}}  # fmt: skip
        return 200, json.dumps(body).encode()

    with serve(api) as host:
        obs = PrometheusSource(f"http://{host}", 60.0, '{namespace="dynamo"}').observe()
    assert f'sum(increase({SERIES["requests"]}{{namespace="dynamo"}}[60s]))' in asked
    assert 'sum(delta(dynamo_frontend_inflight_requests{namespace="dynamo"}[60s]))' in asked
    assert obs.rate == pytest.approx((120 + 4) / 60)
    assert obs.ttft_s == pytest.approx(0.3)
    assert obs.itl_s == pytest.approx(0.05)
    assert obs.isl == pytest.approx(1000)
    assert obs.osl == pytest.approx(11)


def test_prometheus_error_is_reported_with_its_type() -> None:
    body = json.dumps({"status": "error", "errorType": "bad_data", "error": "parse error"}).encode()
    with serve(lambda _: (200, body)) as host:
        with pytest.raises(ObserveError, match="bad_data: parse error"):
            PrometheusSource(f"http://{host}", 60.0).observe()
