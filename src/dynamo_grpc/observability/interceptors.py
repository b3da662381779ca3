"""OpenTelemetry's gRPC interceptors (opentelemetry-instrumentation-grpc) for our aio servers and channels.

They start a SERVER span per RPC from the caller's `traceparent` metadata and inject the current context into
every outgoing call, so Route, Decode, Prefill and KvTransfer continue one trace. Health checks and
reflection are not traced. Empty lists when tracing is off: an untraced process runs no interceptor at all.
"""

from __future__ import annotations

import inspect
from typing import Any

from dynamo_grpc.observability import tracing

_UNTRACED = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")


def _filter() -> Any:
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.any_of(*(filters.service_name(s) for s in _UNTRACED)))


def server_interceptors() -> list[Any]:
    if not tracing.enabled():
        return []
    from opentelemetry import trace
    from opentelemetry.instrumentation.grpc._aio_server import OpenTelemetryAioServerInterceptor

    class ServerInterceptor(OpenTelemetryAioServerInterceptor):  # type: ignore[misc]
        """OpenTelemetry's, plus streaming handlers that answer with `context.write` (a coroutine, as the
        frontend's ModelStreamInfer is): the library iterates every streaming handler as an async generator."""

        def _intercept_aio_server_stream(self, behavior: Any, handler_call_details: Any) -> Any:
            if inspect.isasyncgenfunction(behavior) or not inspect.iscoroutinefunction(behavior):
                return super()._intercept_aio_server_stream(behavior, handler_call_details)
            return self._intercept_aio_server_unary(behavior, handler_call_details)  # one await, same span

    tracer = trace.get_tracer("opentelemetry.instrumentation.grpc", schema_url="https://opentelemetry.io/schemas/1.11.0")
    return [ServerInterceptor(tracer, filter_=_filter())]


def client_interceptors() -> list[Any]:
    if not tracing.enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(filter_=_filter()))
