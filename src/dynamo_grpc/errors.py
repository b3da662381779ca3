"""The one error model: each domain error carries its meaning once.

Every hop raises these classes and converts through this module only:

- ``to_grpc`` / ``abort``: a servicer's answer (status code, details, and a ``dynamo-error`` trailing
  metadata entry naming the error, so the next hop can tell two causes of one status apart, e.g.
  RESOURCE_EXHAUSTED from a prompt that is too long vs. from a full queue);
- ``from_grpc``: a client's view of a peer's status, back into the same class;
- ``to_http``: HTTP status, headers (``Retry-After``) and the OpenAI error body.

Whether the frontend migrates a request (``migrate``: the worker is gone, try another with the tokens
so far) or re-routes it once before the first token (``reroute``: this worker is full, another may not
be) is a property of the error, read by the route session. ``docs/errors.md`` is generated from
``ERRORS`` (``python -m dynamo_grpc.errors``) and a test keeps the two equal.

This module imports grpc lazily so that engines (which must stay grpc-free) can raise these classes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

if TYPE_CHECKING:  # pragma: no cover
    import grpc

#: trailing-metadata key that names the error class across a gRPC hop
METADATA_KEY = "dynamo-error"
#: seconds a client should wait before retrying an overloaded server (HTTP Retry-After)
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class Spec:
    """What an error means to every hop."""

    name: str  # stable wire name (the dynamo-error metadata value)
    grpc_code: str  # grpc.StatusCode member name
    http_status: int
    openai_type: str  # OpenAI error body "type"
    migrate: bool = False  # the frontend moves the request to another worker (tokens so far kept)
    reroute: bool = False  # before any token: try one other worker, not counted as a migration
    retry_after: bool = False  # HTTP answer carries Retry-After
    meaning: str = ""


class DynamoError(Exception):
    """Base class: a failure with the status every protocol should report."""

    spec: ClassVar[Spec]

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def name(self) -> str:
        return self.spec.name


def _spec(**kw: Any) -> Spec:
    return Spec(**kw)


class InvalidArgument(DynamoError):
    spec = _spec(
        name="invalid_argument",
        grpc_code="INVALID_ARGUMENT",
        http_status=400,
        openai_type="invalid_request_error",
        meaning="bad tensor, dtype, shape, JSON, value out of range",
    )


class UnsupportedOption(InvalidArgument):
    """An option the client sent that this server (or this engine) does not honour: refused, never ignored."""

    spec = _spec(
        name="unsupported_option",
        grpc_code="INVALID_ARGUMENT",
        http_status=400,
        openai_type="invalid_request_error",
        meaning="an option that is not honoured; the message names it",
    )

    def __init__(self, option: str, why: str = "is not supported") -> None:
        super().__init__(f"'{option}' {why}")
        self.option = option


class ModelNotFound(DynamoError):
    spec = _spec(
        name="model_not_found",
        grpc_code="NOT_FOUND",
        http_status=404,
        openai_type="not_found_error",
        meaning="unknown model or version",
    )


class NotFound(DynamoError):
    spec = _spec(
        name="not_found",
        grpc_code="NOT_FOUND",
        http_status=404,
        openai_type="not_found_error",
        meaning="unknown file, lease or other named resource",
    )


class PromptTooLong(DynamoError):
    """The prompt (plus max_tokens where the engine needs it) exceeds the context or the KV cache."""

    spec = _spec(
        name="prompt_too_long",
        grpc_code="RESOURCE_EXHAUSTED",
        http_status=400,
        openai_type="invalid_request_error",
        meaning="prompt longer than the context or the KV cache (can never fit)",
    )


class Overloaded(DynamoError):
    """This server (or this engine) cannot take more work now: its bounded queue is full."""

    spec = _spec(
        name="overloaded",
        grpc_code="RESOURCE_EXHAUSTED",
        http_status=429,
        openai_type="rate_limit_error",
        reroute=True,
        retry_after=True,
        meaning="queue full on one worker (re-routed once) or on all of them (reported)",
    )


class FailedPrecondition(DynamoError):
    """The request is well formed but this server cannot serve it as asked (e.g. a LoRA it does not have)."""

    spec = _spec(
        name="failed_precondition",
        grpc_code="FAILED_PRECONDITION",
        http_status=400,
        openai_type="invalid_request_error",
        meaning="cannot be served as asked here (LoRA not loaded, checksum mismatch, lease pulled twice)",
    )


class Unavailable(DynamoError):
    """Nothing can serve the request now (no live worker, router not ready)."""

    spec = _spec(
        name="unavailable",
        grpc_code="UNAVAILABLE",
        http_status=503,
        openai_type="service_unavailable",
        retry_after=True,
        meaning="no live worker, router not ready, migration limit reached",
    )


class WorkerLost(DynamoError):
    """A worker went away mid-request (connection lost, drain hand-back, stream ended without a finish)."""

    spec = _spec(
        name="worker_lost",
        grpc_code="UNAVAILABLE",
        http_status=503,
        openai_type="service_unavailable",
        migrate=True,
        retry_after=True,
        meaning="the worker died, drained or broke the stream: migrate",
    )


class Draining(WorkerLost):
    """The worker is draining and takes no new work (or hands a running request back)."""

    spec = _spec(
        name="draining",
        grpc_code="UNAVAILABLE",
        http_status=503,
        openai_type="service_unavailable",
        migrate=True,
        retry_after=True,
        meaning="the worker is shutting down: migrate",
    )


class DeadlineExceeded(DynamoError):
    spec = _spec(
        name="deadline_exceeded",
        grpc_code="DEADLINE_EXCEEDED",
        http_status=504,
        openai_type="timeout",
        meaning="the request's deadline passed",
    )


class Cancelled(DynamoError):
    spec = _spec(
        name="cancelled",
        grpc_code="CANCELLED",
        http_status=499,
        openai_type="cancelled",
        meaning="the client went away (the worker stops and frees its blocks)",
    )


class Unauthenticated(DynamoError):
    spec = _spec(
        name="unauthenticated",
        grpc_code="UNAUTHENTICATED",
        http_status=401,
        openai_type="authentication_error",
        meaning="missing or wrong credentials",
    )


class PermissionDenied(DynamoError):
    spec = _spec(
        name="permission_denied",
        grpc_code="PERMISSION_DENIED",
        http_status=403,
        openai_type="permission_error",
        meaning="credentials valid but not allowed",
    )


class Unimplemented(DynamoError):
    spec = _spec(
        name="unimplemented",
        grpc_code="UNIMPLEMENTED",
        http_status=501,
        openai_type="not_implemented",
        meaning="an API this server does not provide (e.g. shared-memory tensors)",
    )


class Internal(DynamoError):
    spec = _spec(
        name="internal",
        grpc_code="INTERNAL",
        http_status=500,
        openai_type="internal_error",
        meaning="a bug or a broken peer answer",
    )


#: every error class, in the order of docs/errors.md
ERRORS: tuple[type[DynamoError], ...] = (
    InvalidArgument,
    UnsupportedOption,
    ModelNotFound,
    NotFound,
    PromptTooLong,
    Overloaded,
    FailedPrecondition,
    Unavailable,
    WorkerLost,
    Draining,
    DeadlineExceeded,
    Cancelled,
    Unauthenticated,
    PermissionDenied,
    Unimplemented,
    Internal,
)
_BY_NAME: dict[str, type[DynamoError]] = {cls.spec.name: cls for cls in ERRORS}

# A peer's status without our metadata (an older peer, a proxy, grpc itself): the class it most likely means.
# Statuses that mean "the peer is gone or broke the connection" become WorkerLost (migrate).
_BY_CODE: dict[str, type[DynamoError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "OUT_OF_RANGE": InvalidArgument,
    "NOT_FOUND": NotFound,
    "RESOURCE_EXHAUSTED": Overloaded,
    "FAILED_PRECONDITION": FailedPrecondition,
    "DEADLINE_EXCEEDED": DeadlineExceeded,
    "UNAUTHENTICATED": Unauthenticated,
    "PERMISSION_DENIED": PermissionDenied,
    "UNIMPLEMENTED": Unimplemented,
    "UNAVAILABLE": WorkerLost,
    "INTERNAL": WorkerLost,
    "UNKNOWN": WorkerLost,
    "ABORTED": WorkerLost,
    "DATA_LOSS": WorkerLost,
    # CANCELLED that reaches a client was not its own cancel (that never surfaces): the peer stopped it
    "CANCELLED": WorkerLost,
}


def error_class(name: str) -> type[DynamoError] | None:
    """The class a wire name stands for."""
    return _BY_NAME.get(name)


# --- gRPC -------------------------------------------------------------------------------------------


def grpc_status(err: DynamoError) -> grpc.StatusCode:
    import grpc

    return grpc.StatusCode[err.spec.grpc_code]


def trailing_metadata(err: DynamoError) -> tuple[tuple[str, str], ...]:
    return ((METADATA_KEY, err.spec.name),)


async def abort(context: grpc.aio.ServicerContext, err: DynamoError) -> NoReturn:
    """End an RPC with ``err``'s status, details and name."""
    context.set_trailing_metadata(trailing_metadata(err))
    await context.abort(grpc_status(err), err.message)
    raise AssertionError("unreachable")  # context.abort raises


def from_grpc(e: grpc.aio.AioRpcError, hop: str = "") -> DynamoError:
    """A peer's gRPC error as our class; ``hop`` (e.g. "worker 127.0.0.1:5") prefixes the message."""
    name = ""
    for key, value in e.trailing_metadata() or ():
        if key == METADATA_KEY:
            name = value if isinstance(value, str) else value.decode()
    return from_status(e.code().name, e.details() or "", name, hop)


def from_status(code: str, details: str, name: str = "", hop: str = "") -> DynamoError:
    """A status (code name, details, our error name or "") as our class: `from_grpc`'s rule, also for a status
    that arrives inside a message (DecodeStream's DecodeStreamEnd)."""
    message = f"{hop}: {details}" if hop else details
    cls = _BY_NAME.get(name)
    if cls is None or cls.spec.grpc_code != code:
        cls = _BY_CODE.get(code, Internal)
        if cls is WorkerLost:
            message = f"{hop + ': ' if hop else ''}{code}: {details}"
    if cls is UnsupportedOption:
        err: DynamoError = InvalidArgument(message)  # the option's name is in the message
        return err
    return cls(message)


def from_exception(exc: BaseException) -> DynamoError:
    """Any exception as the error a client should see (unknown exceptions are Internal)."""
    if isinstance(exc, DynamoError):
        return exc
    if isinstance(exc, TimeoutError):
        return DeadlineExceeded("deadline exceeded")
    return Internal(f"internal error: {type(exc).__name__}: {exc}")


# --- HTTP / OpenAI ----------------------------------------------------------------------------------


def openai_body(err: DynamoError) -> dict[str, Any]:
    """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    param = err.option if isinstance(err, UnsupportedOption) else None
    return {
        "error": {
            "message": err.message,
            "type": err.spec.openai_type,
            "param": param,
            "code": err.spec.name,
        }
    }


def to_http(err: DynamoError) -> tuple[int, dict[str, str], dict[str, Any]]:
    """(status, headers, JSON body) for an HTTP answer."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if err.spec.retry_after else {}
    return err.spec.http_status, headers, openai_body(err)


# --- the table ----------------------------------------------------------------------------------------


def table_rows(errors: Iterable[type[DynamoError]] = ERRORS) -> list[str]:
    rows = [
        "| error | gRPC status | HTTP status | frontend | meaning |",
        "|---|---|---|---|---|",
    ]
    for cls in errors:
        s = cls.spec
        action = "migrate" if s.migrate else "re-route once" if s.reroute else "report"
        http = f"{s.http_status}" + (" + Retry-After" if s.retry_after else "")
        rows.append(f"| `{s.name}` | {s.grpc_code} | {http} | {action} | {s.meaning} |")
    return rows


if __name__ == "__main__":  # pragma: no cover
    print("\n".join(table_rows()))
