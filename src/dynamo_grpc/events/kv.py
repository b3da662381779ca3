"""The event plane's engine-side types: KV cache events and load metrics.

Engines produce these (taken once per engine step), the publisher encodes them
(``events/codec.py``) for ``kv.<model>`` / ``load.<model>``, routers decode them back. Plain
dataclasses: no protobuf, no zmq, so an engine can import them cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class StoredBlock:
    block_hash: int  # sequence (chained) hash: the routing key
    tokens_hash: int  # local hash of the block's tokens


@dataclass
class KvStored:
    """Blocks that became reusable cache, in chain order; ``parent_hash`` precedes the first."""

    parent_hash: int | None
    blocks: list[StoredBlock]
    #: the tier the blocks entered: "device" (G1), "host" (G2) or "disk" (G3), as vLLM's ``medium``
    medium: str = "device"


@dataclass
class KvRemoved:
    block_hashes: list[int]
    #: the tier the blocks left (an offload is removed from "device" + stored in "host")
    medium: str = "device"


@dataclass
class KvCleared:
    pass


KvEvent = KvStored | KvRemoved | KvCleared
#: where an engine hands each step's events (one call per step, in the order they happened)
KvEventSink = Callable[[list[KvEvent]], None]


@dataclass
class LoadMetrics:
    """What a worker reports about its load (published on ``load.<model>``)."""

    active_blocks: int
    total_blocks: int
    waiting: int
    running: int
