"""The pool of KV blocks: free list in eviction (LRU) order, the prefix-cache map, KV events.

A block is *cached* once it is full and registered under its sequence hash; it stays
cached after its last user frees it, sitting in the free queue until it is reused for
new tokens (eviction: a KvRemoved event) or hit again by a new request (it leaves the
free queue). Every registration is a KvStored event. This module knows nothing about
models or requests beyond block ids and hashes, so it is tested on its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from dynamo_grpc.engines.base import KvCleared, KvEvent, KvRemoved, KvStored, StoredBlock


class NoFreeBlocks(RuntimeError):
    """Asked for more blocks than the free queue holds."""


@dataclass(eq=False)
class KvBlock:
    block_id: int
    ref_cnt: int = 0
    #: sequence (chained) hash while the block is in the prefix cache
    block_hash: int | None = None
    tokens_hash: int | None = None
    parent_hash: int | None = None


class BlockPool:
    """Fixed set of blocks; ``events`` collects KV events until :meth:`take_events`."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError("num_blocks must be positive")
        self.num_blocks = num_blocks
        self.blocks = [KvBlock(i) for i in range(num_blocks)]
        # block_id -> None; the front is evicted first (least recently freed)
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, KvBlock] = {}
        self._events: list[KvEvent] = []

    # ------------------------------------------------------------------ queries

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def lookup(self, block_hash: int) -> KvBlock | None:
        return self._cached.get(block_hash)

    def free_order(self) -> list[int]:
        """Block ids in the order they would be evicted (for tests and debugging)."""
        return list(self._free)

    # ------------------------------------------------------------------ lifecycle

    def touch(self, blocks: Iterable[KvBlock]) -> None:
        """Take a reference on cached blocks a new request reuses (prefix hit)."""
        for b in blocks:
            if b.ref_cnt == 0:
                del self._free[b.block_id]
            b.ref_cnt += 1

    def allocate(self, n: int) -> list[KvBlock]:
        """``n`` blocks from the front of the free queue, evicting any cached ones."""
        if n > len(self._free):
            raise NoFreeBlocks(f"need {n} blocks, {len(self._free)} free")
        out: list[KvBlock] = []
        evicted: list[int] = []
        for _ in range(n):
            bid, _ = self._free.popitem(last=False)
            b = self.blocks[bid]
            if b.block_hash is not None:
                if self._cached.get(b.block_hash) is b:
                    del self._cached[b.block_hash]
                    evicted.append(b.block_hash)
                b.block_hash = b.tokens_hash = b.parent_hash = None
            b.ref_cnt = 1
            out.append(b)
        if evicted:
            self._events.append(KvRemoved(evicted))
        return out

    def free(self, blocks: Iterable[KvBlock]) -> None:
        """Drop one reference; blocks reaching zero join the back of the queue in the given order.

        Callers pass a request's blocks tail-first so that a chain's tail is evicted
        before its prefix (which other requests are likelier to share).
        """
        for b in blocks:
            if b.ref_cnt <= 0:
                raise RuntimeError(f"block {b.block_id} freed more often than taken")
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self._free[b.block_id] = None

    def cache_blocks(self, blocks: list[KvBlock], hashes: list[tuple[int, int]], parent: int | None) -> None:
        """Register full blocks under their (sequence hash, tokens hash), in chain order.

        A hash another block already holds (two requests computed the same prefix at
        once) leaves this block uncached; the chain is announced in contiguous runs.
        """
        run: list[StoredBlock] = []
        run_parent = parent
        prev = parent
        for b, (seq_hash, tok_hash) in zip(blocks, hashes, strict=True):
            if b.block_hash is not None or seq_hash in self._cached:
                if run:
                    self._events.append(KvStored(run_parent, run))
                    run = []
                run_parent = seq_hash
                prev = seq_hash
                continue
            b.block_hash, b.tokens_hash, b.parent_hash = seq_hash, tok_hash, prev
            self._cached[seq_hash] = b
            run.append(StoredBlock(seq_hash, tok_hash))
            prev = seq_hash
        if run:
            self._events.append(KvStored(run_parent, run))

    def clear_cache(self) -> bool:
        """Forget every cached block (only when none is in use); emits KvCleared."""
        if self.num_used:
            return False
        for b in self._cached.values():
            b.block_hash = b.tokens_hash = b.parent_hash = None
        self._cached.clear()
        self._events.append(KvCleared())
        return True

    # ------------------------------------------------------------------ events

    def take_events(self) -> list[KvEvent]:
        ev, self._events = self._events, []
        return ev

    def dump(self) -> list[KvStored]:
        """Every cached block as Stored events, parents before children, one event per linear chain."""
        children: dict[int | None, list[KvBlock]] = {}
        for b in self._cached.values():
            parent = b.parent_hash if b.parent_hash in self._cached else None
            children.setdefault(parent, []).append(b)
        out: list[KvStored] = []
        stack: list[KvBlock] = list(reversed(children.get(None, [])))
        while stack:
            b = stack.pop()
            chain = [b]
            while len(kids := children.get(chain[-1].block_hash, [])) == 1:
                chain.append(kids[0])
            out.append(
                KvStored(
                    chain[0].parent_hash, [StoredBlock(c.block_hash or 0, c.tokens_hash or 0) for c in chain]
                )
            )
            stack.extend(reversed(children.get(chain[-1].block_hash, [])))
        return out
