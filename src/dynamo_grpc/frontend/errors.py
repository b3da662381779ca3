"""Errors the frontend reports, named by the gRPC status they become (kept free of grpc imports)."""

from __future__ import annotations

from enum import Enum


class Code(Enum):
    """The subset of gRPC status codes the frontend produces; `service.py` maps them to grpc.StatusCode."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"


class FrontendError(Exception):
    """A request failure with the status a client should see."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class WorkerLost(Exception):
    """The worker went away mid-request (connection lost, stream ended without a finish): migrate."""
