"""Engine KV event dataclasses <-> protobuf (events.proto). No grpc here."""

from __future__ import annotations

from collections.abc import Iterable

from dynamo_grpc.events.kv import KvCleared, KvEvent, KvRemoved, KvStored, LoadMetrics, StoredBlock
from dynamo_grpc.v1 import events_pb2

#: engine medium name <-> events.proto KvMedium (unset reads as device)
MEDIUM_TO_PB: dict[str, int] = {
    "device": events_pb2.KV_MEDIUM_DEVICE,
    "host": events_pb2.KV_MEDIUM_HOST,
    "disk": events_pb2.KV_MEDIUM_DISK,
}
MEDIUM_FROM_PB: dict[int, str] = {v: k for k, v in MEDIUM_TO_PB.items()} | {events_pb2.KV_MEDIUM_UNSPECIFIED: "device"}


def medium_name(value: int) -> str:
    """A KvMedium as the engine's medium name; an unknown (newer) value is refused."""
    name = MEDIUM_FROM_PB.get(value)
    if name is None:
        raise ValueError(f"unknown KV medium {value}")
    return name


def event_to_pb(event: KvEvent) -> events_pb2.KvEvent:
    """One engine event as a protobuf KvEvent."""
    if isinstance(event, KvStored):
        stored = events_pb2.BlockStored(
            blocks=[events_pb2.StoredBlock(block_hash=b.block_hash, tokens_hash=b.tokens_hash) for b in event.blocks]
        )
        if event.parent_hash is not None:
            stored.parent_hash = event.parent_hash
        if event.medium != "device":
            stored.medium = events_pb2.KvMedium.ValueType(MEDIUM_TO_PB[event.medium])
        return events_pb2.KvEvent(stored=stored)
    if isinstance(event, KvRemoved):
        removed = events_pb2.BlockRemoved(block_hashes=list(event.block_hashes))
        if event.medium != "device":
            removed.medium = events_pb2.KvMedium.ValueType(MEDIUM_TO_PB[event.medium])
        return events_pb2.KvEvent(removed=removed)
    if isinstance(event, KvCleared):
        return events_pb2.KvEvent(cleared=events_pb2.AllBlocksCleared())
    raise TypeError(f"not a KV event: {event!r}")


def event_from_pb(msg: events_pb2.KvEvent) -> KvEvent:
    """A protobuf KvEvent as an engine event; ValueError when the oneof is empty."""
    kind = msg.WhichOneof("data")
    if kind == "stored":
        parent = msg.stored.parent_hash if msg.stored.HasField("parent_hash") else None
        blocks = [StoredBlock(b.block_hash, b.tokens_hash) for b in msg.stored.blocks]
        return KvStored(parent, blocks, medium_name(msg.stored.medium))
    if kind == "removed":
        return KvRemoved(list(msg.removed.block_hashes), medium_name(msg.removed.medium))
    if kind == "cleared":
        return KvCleared()
    raise ValueError("KvEvent without data")


def make_batch(
    instance_id: str,
    dp_rank: int,
    seq: int,
    epoch: int,
    block_size: int,
    events: Iterable[KvEvent],
    timestamp: float,
) -> events_pb2.KvEventBatch:
    """A numbered batch of events from one worker rank."""
    return events_pb2.KvEventBatch(
        instance_id=instance_id,
        dp_rank=dp_rank,
        seq=seq,
        epoch=epoch,
        block_size=block_size,
        timestamp=timestamp,
        events=[event_to_pb(e) for e in events],
    )


def load_to_pb(instance_id: str, dp_rank: int, m: LoadMetrics, timestamp: float) -> events_pb2.LoadMetrics:
    """Engine load metrics as the protobuf published on ``load.<model>``."""
    return events_pb2.LoadMetrics(
        instance_id=instance_id,
        dp_rank=dp_rank,
        active_blocks=m.active_blocks,
        total_blocks=m.total_blocks,
        waiting=m.waiting,
        running=m.running,
        timestamp=timestamp,
    )
