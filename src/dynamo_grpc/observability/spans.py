"""The span each hop adds (and its attributes), costing one boolean test when tracing is off."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from dynamo_grpc.observability import tracing

#: the attribute every span of a request carries
REQUEST_ID = "dynamo.request_id"

_tracer = trace.get_tracer("dynamo_grpc")


_OFF: contextlib.nullcontext[None] = contextlib.nullcontext(None)  # reusable: what every hop gets when off


def span(
    name: str, kind: trace.SpanKind = trace.SpanKind.INTERNAL, /, **attributes: Any
) -> contextlib.AbstractContextManager[trace.Span | None]:
    """A child of the current span, current while the block runs; None (and no work) when tracing is off.

    Attribute names are given without the `dynamo.` prefix (`request_id=...` becomes `dynamo.request_id`).
    """
    if not tracing._enabled:
        return _OFF
    return _recorded(name, kind, attributes)


@contextlib.contextmanager
def _recorded(name: str, kind: trace.SpanKind, attributes: dict[str, Any]) -> Iterator[trace.Span]:
    attrs = {f"dynamo.{k}": v for k, v in attributes.items() if v is not None}
    with _tracer.start_as_current_span(name, kind=kind, attributes=attrs) as s:
        yield s


def set_attributes(s: trace.Span | None, **attributes: Any) -> None:
    """Add `dynamo.*` attributes to a span from `span()` (a no-op on None)."""
    if s is not None:
        s.set_attributes({f"dynamo.{k}": v for k, v in attributes.items() if v is not None})


def event(s: trace.Span | None, name: str, **attributes: Any) -> None:
    """A timestamped event (e.g. the first token) on a span from `span()`."""
    if s is not None:
        s.add_event(name, {f"dynamo.{k}": v for k, v in attributes.items() if v is not None})


@contextlib.contextmanager
def continued(headers: Mapping[str, str]) -> Iterator[None]:
    """Continue the caller's trace from W3C `traceparent`/`tracestate` headers (HTTP) while the block runs."""
    if not tracing.enabled():
        yield
        return
    token = otel_context.attach(propagate.extract(dict(headers)))
    try:
        yield
    finally:
        otel_context.detach(token)


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span in hex, for log lines; None outside a recorded span."""
    if not tracing.enabled():
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"
