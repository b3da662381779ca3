"""gRPC channel arguments shared by servers and clients."""

from __future__ import annotations

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # internal hops; the client-facing frontend sets its own (16 MiB)


def common_channel_args(
    max_message_bytes: int, keepalive_time_s: float, keepalive_timeout_s: float
) -> list[tuple[str, int]]:
    """Message size limits and keepalive pings, so dead peers are noticed on idle streams."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
