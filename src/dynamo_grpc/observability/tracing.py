"""Tracing setup for one process, configured the standard OpenTelemetry way.

Off unless asked for: `--trace-file PATH` (JSON lines, see jsonl.py) and/or an OTLP exporter, chosen by the
standard variables (`OTEL_TRACES_EXPORTER=otlp`, or an `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`;
`OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` = grpc (default) or http/protobuf; `OTEL_TRACES_SAMPLER[_ARG]`,
`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES` as the SDK reads them). When off, no tracer provider is
installed, no interceptor is added and every `span()` is a no-op: requests pay one boolean test per hop.
"""

from __future__ import annotations

import argparse
import logging
import os

from opentelemetry import trace

log = logging.getLogger(__name__)

_enabled = False
_provider: object | None = None

_EXPORTERS = ("otlp", "console", "none")
_PROTOCOLS = ("grpc", "http/protobuf")


def enabled() -> bool:
    """True once setup_tracing installed a provider (spans are recorded and exported)."""
    return _enabled


def add_tracing_flags(parser: argparse.ArgumentParser) -> None:
    """`--trace-file`; OTLP export is configured by the standard OTEL_* variables."""
    parser.add_argument(
        "--trace-file",
        default=None,
        metavar="PATH",
        help="append finished trace spans to PATH as JSON lines (OTLP: set OTEL_EXPORTER_OTLP_ENDPOINT); default off",
    )


def _env(*names: str) -> str:
    for n in names:
        v = os.environ.get(n, "").strip()
        if v:
            return v
    return ""


def exporters_from_env() -> list[str]:
    """The exporters OTEL_TRACES_EXPORTER names; `otlp` implied by an OTLP endpoint. ValueError names a bad one."""
    if _env("OTEL_SDK_DISABLED").lower() == "true":
        return []
    names = [n.strip() for n in _env("OTEL_TRACES_EXPORTER").split(",") if n.strip()]
    bad = [n for n in names if n not in _EXPORTERS]
    if bad:
        raise ValueError(f"OTEL_TRACES_EXPORTER={bad[0]!r} is not supported (one of {', '.join(_EXPORTERS)})")
    if not names and _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        names = ["otlp"]
    return [n for n in names if n != "none"]


def otlp_protocol() -> str:
    proto = _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if proto not in _PROTOCOLS:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={proto!r} is not supported (one of {', '.join(_PROTOCOLS)})")
    return proto


def setup_tracing(service: str, trace_file: str | None = None) -> bool:
    """Install the SDK's tracer provider when a file or an exporter is configured; returns whether it did.

    A bad OTEL_* value exits with a message naming it (the process would otherwise trace nothing, silently).
    """
    global _enabled, _provider
    try:
        names = exporters_from_env()
        protocol = otlp_protocol() if "otlp" in names else ""
    except ValueError as e:
        raise SystemExit(f"tracing: {e}") from None
    if not names and not trace_file:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    attrs = {} if _env("OTEL_SERVICE_NAME") else {SERVICE_NAME: service}
    provider = TracerProvider(resource=Resource.create(attrs))  # sampler: OTEL_TRACES_SAMPLER[_ARG]
    exporters: list[SpanExporter] = []
    if trace_file:
        from dynamo_grpc.observability.jsonl import JsonlSpanExporter

        exporters.append(JsonlSpanExporter(trace_file))
    if "otlp" in names and protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        exporters.append(GrpcExporter())
    elif "otlp" in names:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        exporters.append(HttpExporter())
    if "console" in names:
        exporters.append(ConsoleSpanExporter())
    for exp in exporters:
        provider.add_span_processor(BatchSpanProcessor(exp, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    _provider = provider
    _enabled = True
    where = [f"otlp ({protocol})" if n == "otlp" else n for n in names] + ([trace_file] if trace_file else [])
    log.info("tracing on: %s", ", ".join(where))
    return True


def shutdown_tracing() -> None:
    """Flush and stop the exporters (call before the process exits, or the last spans are lost)."""
    global _enabled
    shutdown = getattr(_provider, "shutdown", None)
    if shutdown is not None:
        shutdown()
    _enabled = False
