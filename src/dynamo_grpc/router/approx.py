"""Approximate routing for engines that cannot publish KV events (Dynamo's approx.rs).

Assume a worker caches what we routed to it for ``ttl_s`` seconds: each Route records the
request's block hashes for the chosen worker; entries expire in insertion order (a dict
ordered by last refresh), and the exact indexer does the prefix matching.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from dynamo_grpc.router.indexer import KvIndexer, WorkerKey


class ApproxIndexer:
    """A :class:`KvIndexer` fed by routing decisions, with a TTL per (worker, block)."""

    def __init__(self, ttl_s: float = 120.0, max_blocks: int = 0, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = ttl_s
        self.clock = clock
        self.index = KvIndexer(max_blocks)
        self._expiry: dict[tuple[WorkerKey, int], float] = {}

    def record(self, key: WorkerKey, block_hashes: Sequence[int]) -> None:
        """The router sent these blocks to ``key``: assume they are cached there now."""
        exp = self.clock() + self.ttl_s
        e = self._expiry
        for h in block_hashes:
            e.pop((key, h), None)
            e[(key, h)] = exp
        self.index.store(key, block_hashes)

    def expire(self) -> int:
        """Forget entries past their TTL; returns how many."""
        now = self.clock()
        e = self._expiry
        gone: dict[WorkerKey, list[int]] = {}
        for k, exp in e.items():
            if exp > now:
                break
            gone.setdefault(k[0], []).append(k[1])
        n = 0
        for key, hs in gone.items():
            for h in hs:
                del e[(key, h)]
            self.index.remove(key, hs)
            n += len(hs)
        return n

    def overlaps(self, block_hashes: Sequence[int]) -> dict[WorkerKey, int]:
        self.expire()
        return self.index.overlaps(block_hashes)

    def remove_worker(self, key: WorkerKey) -> None:
        self.index.remove_worker(key)
        for k in [k for k in self._expiry if k[0] == key]:
            del self._expiry[k]

    def __len__(self) -> int:
        return len(self.index)
