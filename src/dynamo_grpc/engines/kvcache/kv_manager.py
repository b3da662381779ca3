"""The part of a KV manager both engines share: prefix lookup, sizing, registration, hit counters.

The engines differ only in where a request's block table lives (the mocker keeps it on the
request, the torch engine in a dict keyed by request id) and in their request field names, so
they subclass this with thin adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from dynamo_grpc.events.kv import KvEvent, KvStored

from .block_pool import BlockPool, KvBlock


class HashedRequest(Protocol):
    """What the shared code reads from a request (both engines' request classes have it)."""

    block_hashes: list[int]
    tokens_hashes: list[int]

    @property
    def num_tokens(self) -> int: ...


class KvManagerBase:
    """A :class:`BlockPool` plus the block-table arithmetic; subclasses own the tables."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        #: prompt tokens looked up / found in the prefix cache (hit rate = hit / queried)
        self.queried_tokens = 0
        self.hit_tokens = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def record_lookup(self, req: HashedRequest, hit_tokens: int) -> None:
        self.queried_tokens += req.num_tokens
        self.hit_tokens += hit_tokens

    def _cached_prefix(self, req: HashedRequest) -> list[KvBlock]:
        """Longest cached prefix of a hashed request; always leaves at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        limit = (req.num_tokens - 1) // self.block_size
        return self.pool.longest_prefix(req.block_hashes[:limit])

    def _needs(self, held: int, computed: int, num_new_tokens: int, prefix: list[KvBlock]) -> tuple[int, int]:
        """(fresh blocks to allocate, prefix blocks to reclaim from the free queue)."""
        need_new = max(self.blocks_for(computed + num_new_tokens) - held - len(prefix), 0)
        reclaim = sum(1 for b in prefix if b.ref_cnt == 0)
        return need_new, reclaim

    def _register(
        self,
        req: HashedRequest,
        hash_blocks: Callable[[int], None],
        table: Sequence[KvBlock],
        num_computed: int,
        done: int,
    ) -> int:
        """Register the table's newly full, computed blocks (KvStored); returns the new registered count.

        ``hash_blocks(block_size)`` brings the request's hash chain up to date (only called when
        there is something to register).
        """
        full = min(num_computed // self.block_size, len(table))
        if full <= done:
            return done
        hash_blocks(self.block_size)
        self.pool.register_chain(table, req.block_hashes, req.tokens_hashes, done, full)
        return full

    def take_events(self) -> list[KvEvent]:
        return self.pool.take_events()

    def dump(self) -> list[KvStored]:
        return self.pool.dump()
