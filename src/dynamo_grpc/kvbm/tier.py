"""What a tier is, the metadata a block carries between tiers, and the G2 host-memory pool.

A block is keyed by its sequence hash (DESIGN.md), the same key the router indexes, and keeps its
tokens hash and parent so a tier can announce it as a ``KvStored`` event of its own medium.
The host pool is a fixed number of slots (preallocated by the executor's :class:`BlockIO`) with
LRU eviction; it only does bookkeeping, the bytes live in the executor's buffers.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol


class Medium(enum.StrEnum):
    """Where a block lives (vLLM's ``medium`` of a KV event; Dynamo's G1/G2/G3)."""

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


@dataclass(frozen=True, slots=True)
class BlockMeta:
    block_hash: int
    tokens_hash: int
    parent_hash: int | None


class Tier(Protocol):
    """The part of a tier the manager and the KV dump need; a G4 store would implement it too."""

    medium: Medium

    def __contains__(self, block_hash: object) -> bool: ...

    def __len__(self) -> int: ...

    def metas(self) -> Iterator[BlockMeta]:
        """Every block held, least recently used first."""
        ...


class HostTier:
    """G2: ``num_slots`` preallocated host buffers, LRU by block hash."""

    medium = Medium.HOST

    def __init__(self, num_slots: int) -> None:
        if num_slots <= 0:
            raise ValueError(f"num_slots must be positive, got {num_slots}")
        self.num_slots = num_slots
        self._lru: OrderedDict[int, tuple[int, BlockMeta]] = OrderedDict()
        self._free = list(range(num_slots - 1, -1, -1))

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def full(self) -> bool:
        return not self._free

    def slot_of(self, block_hash: int) -> int | None:
        hit = self._lru.get(block_hash)
        return None if hit is None else hit[0]

    def touch(self, block_hash: int) -> None:
        """A use (onboard, or the block was evicted from G1 again): most recent now."""
        self._lru.move_to_end(block_hash)

    def pop_lru(self, skip: frozenset[int] | set[int] = frozenset()) -> tuple[int, BlockMeta]:
        """Evict the least recently used block whose slot is not in ``skip``: (slot, metadata)."""
        for h, (slot, meta) in self._lru.items():
            if slot not in skip:
                del self._lru[h]
                self._free.append(slot)
                return slot, meta
        raise LookupError("every host slot is pinned")

    def insert(self, meta: BlockMeta) -> int:
        """Take a free slot for ``meta`` (the caller evicts first when :attr:`full`)."""
        slot = self._free.pop()
        self._lru[meta.block_hash] = (slot, meta)
        return slot

    def metas(self) -> Iterator[BlockMeta]:
        return (m for _, m in self._lru.values())
