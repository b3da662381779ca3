"""Topic names and the sequence-number frame shared by every publisher and subscriber."""

from __future__ import annotations

import struct

_SEQ = struct.Struct(">Q")


def kv_topic(model: str) -> bytes:
    """Topic of a worker's KvEventBatch messages."""
    return f"kv.{model}".encode()


def load_topic(model: str) -> bytes:
    """Topic of a worker's LoadMetrics messages."""
    return f"load.{model}".encode()


def active_topic(model: str) -> bytes:
    """Topic of a router replica's ActiveSequences messages."""
    return f"active.{model}".encode()


def pack_seq(seq: int) -> bytes:
    """The seq frame: u64 big-endian."""
    return _SEQ.pack(seq)


def unpack_seq(frame: bytes) -> int:
    """Parse a seq frame; ValueError if it is not 8 bytes."""
    if len(frame) != 8:
        raise ValueError(f"seq frame must be 8 bytes, got {len(frame)}")
    return int(_SEQ.unpack(frame)[0])
