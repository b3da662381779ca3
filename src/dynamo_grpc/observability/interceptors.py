"""OpenTelemetry's gRPC interceptors (opentelemetry-instrumentation-grpc) for our aio servers and channels.

They start a SERVER span per RPC from the caller's `traceparent` metadata and inject the current context into
every outgoing call, so Route, Decode, Prefill and KvTransfer continue one trace. Health checks and
reflection are not traced. Empty lists when tracing is off: an untraced process runs no interceptor at all.
"""

from __future__ import annotations

from typing import Any

from dynamo_grpc.observability import tracing

_UNTRACED = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection")


def _filter() -> Any:
    from opentelemetry.instrumentation.grpc import filters

    return filters.negate(filters.any_of(*(filters.service_name(s) for s in _UNTRACED)))


def server_interceptors() -> list[Any]:
    if not tracing.enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(filter_=_filter())]


def client_interceptors() -> list[Any]:
    if not tracing.enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(filter_=_filter()))
