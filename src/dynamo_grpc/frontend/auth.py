"""API keys on the KServe gRPC endpoint: `authorization: Bearer <key>` metadata, else UNAUTHENTICATED.

Only the inference service is guarded; grpc.health.v1 and reflection stay open, because Kubernetes'
gRPC probes send no credentials (docs/security-limits.md). The key check itself is `Limits.authorized`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from dynamo_grpc import errors
from dynamo_grpc.frontend.limits import Limits, unauthenticated

GUARDED_PREFIX = "/inference.GRPCInferenceService/"


async def _refuse_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
    await errors.abort(context, unauthenticated())


async def _refuse_stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
    await errors.abort(context, unauthenticated())


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(GUARDED_PREFIX):
            return handler
        header = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        if self.limits.authorized(header if isinstance(header, str) else None):
            return handler
        des, ser = handler.request_deserializer, handler.response_serializer
        if handler.request_streaming:  # ModelStreamInfer
            return grpc.stream_stream_rpc_method_handler(_refuse_stream, des, ser)
        return grpc.unary_unary_rpc_method_handler(_refuse_unary, des, ser)
