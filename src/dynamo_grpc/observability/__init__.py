"""Traces (OpenTelemetry, off unless asked for) and the helpers every hop uses to add its span.

`tracing.setup_tracing` once per process (from its main), `grpc.server_interceptors` /
`grpc.client_interceptors` where servers and channels are built, `spans.span(...)` at each hop.
"""

from dynamo_grpc.observability.spans import event, span
from dynamo_grpc.observability.tracing import add_tracing_flags, enabled, setup_tracing, shutdown_tracing

__all__ = ["add_tracing_flags", "enabled", "event", "setup_tracing", "shutdown_tracing", "span"]
