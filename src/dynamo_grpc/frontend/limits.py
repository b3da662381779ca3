"""The frontend's resource limits and client auth: one dataclass, its flags, and the checks that use them.

Every limit is refused with a clear error before the work it bounds is done (bytes before tokenising,
tokens before routing, a full queue before anything is kept in memory). `add_limit_flags` is the frontend's
block of these flags, `Limits.from_args` reads them back. Defaults (see docs/security-limits.md):
a 1 MiB prompt (bytes of text or messages, well above any context at ~4 bytes a token), 16 MiB gRPC
messages and HTTP bodies, 100 streams per HTTP/2 connection, 64 in-flight requests per ModelStreamInfer
stream, 1024 requests running and 4096 waiting per frontend.
"""

from __future__ import annotations

import argparse
import hmac
from dataclasses import dataclass
from pathlib import Path

from dynamo_grpc import errors

MiB = 1024 * 1024
#: a client's request id (KServe `id`, OpenAI `user`) is echoed in every response: bounded
MAX_CLIENT_ID_BYTES = 256
#: prompts above this many bytes are tokenised in a worker thread, so the event loop keeps serving others
OFFLOAD_TOKENISE_BYTES = 16 * 1024


@dataclass(frozen=True)
class Limits:
    """What one frontend accepts; every field has a flag in `add_limit_flags`."""

    max_input_bytes: int = 1 * MiB
    max_prompt_tokens: int = 0  # 0: the model's context length
    max_message_bytes: int = 16 * MiB
    max_concurrent_streams: int = 100
    max_stream_requests: int = 64
    max_inflight_requests: int = 1024
    max_queued_requests: int = 4096
    http_request_timeout_s: float = 0.0  # 0: none (the client's own deadline still applies)
    http_body_timeout_s: float = 30.0
    api_keys: tuple[str, ...] = ()
    metrics_api_key: str = ""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Limits:
        keys = list(args.api_key or [])
        if args.api_key_file:
            keys += _key_lines(Path(args.api_key_file).read_text())
        limits = cls(
            max_input_bytes=args.max_input_bytes,
            max_prompt_tokens=args.max_prompt_tokens,
            max_message_bytes=args.max_message_bytes,
            max_concurrent_streams=args.max_concurrent_streams,
            max_stream_requests=args.max_stream_requests,
            max_inflight_requests=args.max_inflight_requests,
            max_queued_requests=args.max_queued_requests,
            http_request_timeout_s=args.http_request_timeout,
            http_body_timeout_s=args.http_body_timeout,
            api_keys=tuple(dict.fromkeys(keys)),
            metrics_api_key=args.metrics_api_key or "",
        )
        limits.validate()
        return limits

    def validate(self) -> None:
        for name in ("max_input_bytes", "max_message_bytes", "max_concurrent_streams", "max_stream_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("max_prompt_tokens", "max_queued_requests"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        if self.max_inflight_requests < 1:
            raise ValueError("--max-inflight-requests must be >= 1")
        if self.http_request_timeout_s < 0 or self.http_body_timeout_s <= 0:
            raise ValueError("--http-request-timeout must be >= 0 and --http-body-timeout > 0")

    def authorized(self, header: str | None) -> bool:
        """Whether an `authorization` value carries one of the keys (always true when none are configured)."""
        return not self.api_keys or _bearer_matches(header, self.api_keys)

    def metrics_authorized(self, header: str | None) -> bool:
        return not self.metrics_api_key or _bearer_matches(header, (self.metrics_api_key,))


def _key_lines(text: str) -> list[str]:
    return [k.strip() for k in text.splitlines() if k.strip() and not k.strip().startswith("#")]


def _bearer_matches(header: str | None, keys: tuple[str, ...]) -> bool:
    if not header or not header[:7].lower() == "bearer ":
        return False
    given = header[7:].strip().encode()
    ok = False
    for k in keys:  # constant time per key, and every key is compared
        ok |= hmac.compare_digest(given, k.encode())
    return ok


def check_client_id(field: str, value: str) -> None:
    """A client-supplied request id is echoed in every response: bound it (INVALID_ARGUMENT naming it)."""
    if len(value) > MAX_CLIENT_ID_BYTES // 4 and len(value.encode()) > MAX_CLIENT_ID_BYTES:
        raise errors.InvalidArgument(f"'{field}' is {len(value.encode())} bytes, at most {MAX_CLIENT_ID_BYTES}")


def unauthenticated() -> errors.Unauthenticated:
    return errors.Unauthenticated("missing or invalid API key (send 'authorization: Bearer <key>')")


def add_limit_flags(p: argparse.ArgumentParser) -> None:
    """The frontend's limit and auth flags (kept apart from the router flags)."""
    d = Limits()
    g = p.add_argument_group("limits and auth")
    g.add_argument(
        "--max-input-bytes",
        type=int,
        default=d.max_input_bytes,
        help="largest prompt (text or messages) in bytes, refused before tokenising (default 1 MiB)",
    )
    g.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=d.max_prompt_tokens,
        help="longest prompt in tokens, refused before routing; 0: the model's context length",
    )
    g.add_argument(
        "--max-message-bytes",
        type=int,
        default=d.max_message_bytes,
        help="largest gRPC message received or sent, and HTTP request body (default 16 MiB)",
    )
    g.add_argument(
        "--max-concurrent-streams",
        type=int,
        default=d.max_concurrent_streams,
        help="concurrent RPCs per HTTP/2 connection (default 100)",
    )
    g.add_argument(
        "--max-stream-requests",
        type=int,
        default=d.max_stream_requests,
        help="requests in flight per ModelStreamInfer stream; more wait unread (default 64)",
    )
    g.add_argument(
        "--max-inflight-requests",
        type=int,
        default=d.max_inflight_requests,
        help="generation requests running at once in this frontend (default 1024)",
    )
    g.add_argument(
        "--max-queued-requests",
        type=int,
        default=d.max_queued_requests,
        help="requests waiting for a slot; beyond: RESOURCE_EXHAUSTED / HTTP 429 (default 4096)",
    )
    g.add_argument(
        "--http-request-timeout",
        type=float,
        default=d.http_request_timeout_s,
        help="seconds an HTTP generation request may run; 0: no limit (default)",
    )
    g.add_argument(
        "--http-body-timeout",
        type=float,
        default=d.http_body_timeout_s,
        help="seconds to receive an HTTP request body before closing the connection (default 30)",
    )
    g.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="accept this API key (repeatable; also --api-key-file); none: open",
    )
    g.add_argument("--api-key-file", default=None, help="file with one API key per line")
    g.add_argument("--metrics-api-key", default=None, help="key required by /metrics (default: open)")
