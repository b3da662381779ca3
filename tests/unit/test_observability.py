"""Tracing setup, the --trace-file exporter, JSON logs with request and trace ids, and the frontend metric set."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_grpc.frontend.metrics import FrontendMetrics
from dynamo_grpc.frontend.pipeline import Timings
from dynamo_grpc.observability import interceptors, tracing

OTEL_VARS = (
    "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_SDK_DISABLED",
)  # fmt: skip


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_tracing_is_off_by_default_and_adds_no_interceptor(no_otel_env: pytest.MonkeyPatch) -> None:
    assert tracing.setup_tracing("dynamo-test") is False
    assert not tracing.enabled()
    assert interceptors.server_interceptors() == [] and interceptors.client_interceptors() == []


def test_exporters_follow_the_standard_variables(no_otel_env: pytest.MonkeyPatch) -> None:
    no_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    assert tracing.exporters_from_env() == ["otlp"] and tracing.otlp_protocol() == "grpc"
    no_otel_env.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    assert tracing.otlp_protocol() == "http/protobuf"
    no_otel_env.setenv("OTEL_TRACES_EXPORTER", "none")
    assert tracing.exporters_from_env() == []
    no_otel_env.setenv("OTEL_SDK_DISABLED", "true")
    no_otel_env.setenv("OTEL_TRACES_EXPORTER", "otlp")
    assert tracing.exporters_from_env() == []


@pytest.mark.parametrize(
    ("var", "value"), [("OTEL_TRACES_EXPORTER", "zipkin"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]
)
def test_an_unsupported_otel_value_is_refused_by_name(no_otel_env: pytest.MonkeyPatch, var: str, value: str) -> None:
    no_otel_env.setenv("OTEL_TRACES_EXPORTER", "otlp")
    no_otel_env.setenv(var, value)
    with pytest.raises(SystemExit, match=f"{var}={value!r} is not supported"):
        tracing.setup_tracing("dynamo-test")
    assert not tracing.enabled()


SCRIPT = textwrap.dedent(
    """
    import logging, sys
    from dynamo_grpc.logs import request_id_var, setup_logging
    from dynamo_grpc.observability import setup_tracing, shutdown_tracing, spans
    setup_logging("info", "json")
    assert setup_tracing("dynamo-unit", sys.argv[1])
    with spans.span("frontend.request", request_id="r-1", model="m") as outer:
        request_id_var.set("r-1")
        spans.event(outer, "first_token", ttft_s=0.25)
        with spans.span("route", request_id="r-1") as inner:
            spans.set_attributes(inner, worker="w-7", overlap_blocks=3)
            logging.getLogger("dynamo_grpc.test").info("routed to %s", "w-7")
    shutdown_tracing()
    """
)


def test_trace_file_and_json_logs_share_ids(tmp_path: Path) -> None:
    trace_file = tmp_path / "spans.jsonl"
    env = {k: v for k, v in __import__("os").environ.items() if k not in OTEL_VARS}
    p = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(trace_file)], capture_output=True, text=True, env=env, timeout=60
    )
    assert p.returncode == 0, p.stderr
    spans = {s["name"]: s for s in map(json.loads, trace_file.read_text().splitlines())}
    outer, inner = spans["frontend.request"], spans["route"]
    assert inner["trace_id"] == outer["trace_id"] and inner["parent_span_id"] == outer["span_id"]
    assert outer["parent_span_id"] is None and outer["service"] == "dynamo-unit"
    assert inner["attributes"] == {"dynamo.request_id": "r-1", "dynamo.worker": "w-7", "dynamo.overlap_blocks": 3}
    assert outer["events"][0]["name"] == "first_token" and outer["events"][0]["attributes"] == {"dynamo.ttft_s": 0.25}
    logs = [json.loads(ln) for ln in p.stderr.splitlines() if ln.startswith("{")]
    routed = next(r for r in logs if r["message"] == "routed to w-7")
    assert routed["request_id"] == "r-1" and routed["level"] == "info" and routed["logger"] == "dynamo_grpc.test"
    assert routed["trace_id"] == inner["trace_id"] and routed["span_id"] == inner["span_id"]


def test_a_bad_log_format_is_refused_by_name() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "dynamo_grpc.cli", "consul-dev", "--port", "0", "--log-format", "xml"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode != 0 and "--log-format / DYN_LOG_FORMAT: 'xml' is not one of text, json" in p.stderr


def _families(m: FrontendMetrics) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    from prometheus_client import generate_latest

    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    for line in m.triton.exposition().decode().splitlines():  # exact names: a parser would add `_total`
        if not line.startswith("#"):
            name, rest = line.split("{", 1)
            labels, value = rest.rsplit("} ", 1)
            pairs = tuple(sorted((k, v.strip('"')) for k, v in (kv.split("=") for kv in labels.split(","))))
            out.setdefault(name, {})[pairs] = float(value)
    return out


def test_frontend_metrics_true_ttft_itl_queue_and_triton_names() -> None:
    m = FrontendMetrics()
    ms = 1_000_000
    t = Timings(arrival_ns=0, routed_at_ns=4 * ms, first_token_at_ns=30 * ms, last_token_at_ns=50 * ms)
    t.token_gaps = [(0.005, 2), (0.01, 1)]  # two responses after the first: 2 tokens, then 1
    t.prompt_tokens, t.output_tokens = 12, 4
    m.started("m")
    m.finished("m", "kserve", "model_infer", False, "success", 60 * ms, t)
    m.started("m")
    m.finished("m", "openai", "completions", True, "error", 2 * ms, None)
    f = _families(m)
    assert f["dynamo_frontend_inflight_requests"][(("model", "m"),)] == 0  # both finished
    ttft = f["dynamo_frontend_time_to_first_token_seconds_sum"][(("model", "m"),)]
    assert ttft == pytest.approx(0.030)  # arrival to first token, not routing to first token
    assert f["dynamo_frontend_inter_token_latency_seconds_count"][(("model", "m"),)] == 3  # per token
    assert f["dynamo_frontend_inter_token_latency_seconds_sum"][(("model", "m"),)] == pytest.approx(0.02)
    assert f["dynamo_frontend_queue_duration_seconds_sum"][(("model", "m"),)] == pytest.approx(0.004)
    assert f["dynamo_frontend_output_tokens_total"][(("model", "m"),)] == 4
    ok = (("endpoint", "model_infer"), ("model", "m"), ("protocol", "kserve"), ("request_type", "unary"))
    assert f["dynamo_frontend_requests_total"][(*ok, ("status", "success"))] == 1
    mv = (("model", "m"), ("version", "1"))
    assert f["nv_inference_request_success"][mv] == 1 and f["nv_inference_request_failure"][mv] == 1
    assert f["nv_inference_request_duration_us"][mv] == pytest.approx(62_000)
    assert f["nv_inference_queue_duration_us"][mv] == pytest.approx(4_000)
    assert f["dynamo_frontend_migrations_total"][(("model", "m"),)] == 0  # charted from the first request
