"""Which worker rank holds which KV block: block hash -> bitmask of worker slots.

Each (instance_id, dp_rank) gets a slot (a bit). One dict maps a sequence block hash to
the OR of the slots holding it; a query walks the request's hash chain and reports, per
worker, how many leading blocks it holds (the overlap depth). Since the hashes are chained
(DESIGN.md), a block hash names its whole prefix, so a Stored event needs no tree walk:
``parent_hash`` only tells us whether the chain is complete, which we count.

Memory is bounded: the dict's insertion order is kept as recency order (a store or a query
hit re-inserts the key), and past ``max_blocks`` the oldest entries are pruned down to 80 %.
Forgetting a worker (death, Cleared) is O(1): its slot is retired, queries mask it out,
and :meth:`sweep` (run when convenient) removes the stale bits in one pass; only then is
the slot reused.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

WorkerKey = Hashable  # the router uses (instance_id, dp_rank)

PRUNE_TO = 0.8


@dataclass
class IndexerStats:
    """Counters exported as metrics."""

    stored_blocks: int = 0
    removed_blocks: int = 0
    cleared: int = 0
    orphan_stores: int = 0
    pruned_blocks: int = 0
    sweeps: int = 0


class KvIndexer:
    """Exact index from KV events. Not thread-safe: call it from one thread (the router's loop)."""

    def __init__(self, max_blocks: int = 0) -> None:
        #: 0 = unbounded
        self.max_blocks = max_blocks
        self._owners: dict[int, int] = {}
        self._slot_of: dict[WorkerKey, int] = {}
        self._key_of: dict[int, WorkerKey] = {}
        self._free_slots: list[int] = []
        self._next_slot = 0
        self._retired = 0  # bitmask of slots whose bits are stale until the next sweep
        self._alive = 0  # bitmask of live slots
        self.stats = IndexerStats()

    # ---- workers -----------------------------------------------------------------------
    def _slot(self, key: WorkerKey) -> int:
        slot = self._slot_of.get(key)
        if slot is None:
            if self._free_slots:
                slot = self._free_slots.pop()
            else:
                slot = self._next_slot
                self._next_slot += 1
            self._slot_of[key] = slot
            self._key_of[slot] = key
            self._alive |= 1 << slot
        return slot

    @property
    def workers(self) -> list[WorkerKey]:
        return list(self._slot_of)

    def remove_worker(self, key: WorkerKey) -> None:
        """Forget a worker rank (death, or Cleared: it comes back with a fresh slot)."""
        slot = self._slot_of.pop(key, None)
        if slot is None:
            return
        del self._key_of[slot]
        bit = 1 << slot
        self._alive &= ~bit
        self._retired |= bit

    def clear_worker(self, key: WorkerKey) -> None:
        """All blocks of this worker rank are gone."""
        self.stats.cleared += 1
        self.remove_worker(key)

    def needs_sweep(self) -> bool:
        return self._retired != 0

    def sweep(self) -> None:
        """Drop the bits of retired slots (one pass, keeps recency order), then free those slots."""
        if not self._retired:
            return
        keep = self._alive
        self._owners = {h: m & keep for h, m in self._owners.items() if m & keep}
        r = self._retired
        while r:
            low = r & -r
            self._free_slots.append(low.bit_length() - 1)
            r ^= low
        self._retired = 0
        self.stats.sweeps += 1

    # ---- events ------------------------------------------------------------------------
    def store(self, key: WorkerKey, block_hashes: Iterable[int], parent_hash: int | None = None) -> None:
        """Blocks stored by a worker rank, in chain order."""
        bit = 1 << self._slot(key)
        d = self._owners
        if parent_hash is not None and not (d.get(parent_hash, 0) & bit):
            self.stats.orphan_stores += 1
        pop = d.pop
        n = 0
        for h in block_hashes:
            d[h] = pop(h, 0) | bit
            n += 1
        self.stats.stored_blocks += n
        if self.max_blocks and len(d) > self.max_blocks:
            self.prune()

    def remove(self, key: WorkerKey, block_hashes: Iterable[int]) -> None:
        """Blocks evicted by a worker rank."""
        slot = self._slot_of.get(key)
        if slot is None:
            return
        nbit = ~(1 << slot)
        d = self._owners
        get = d.get
        n = 0
        for h in block_hashes:
            m = get(h)
            if m is None:
                continue
            m &= nbit
            if m & self._alive:
                d[h] = m  # in place: removal does not refresh recency
            else:
                del d[h]
            n += 1
        self.stats.removed_blocks += n

    def prune(self) -> int:
        """Drop least recently used entries down to 80 % of max_blocks; returns how many."""
        target = int(self.max_blocks * PRUNE_TO)
        excess = len(self._owners) - target
        if excess <= 0:
            return 0
        d = self._owners
        for h in list(itertools.islice(d, excess)):
            del d[h]
        self.stats.pruned_blocks += excess
        return excess

    # ---- queries -----------------------------------------------------------------------
    def overlaps(self, block_hashes: Sequence[int], touch: bool = True) -> dict[WorkerKey, int]:
        """Per worker rank, how many leading blocks of the chain it holds (workers with 0 omitted).

        One dict operation or two per block; the walk stops at the first block no live worker
        holds, and a worker's bits are only visited when it drops out of the match.
        """
        d = self._owners
        depth: dict[WorkerKey, int] = {}
        n = len(block_hashes)
        if not n or not self._alive:
            return depth
        key_of = self._key_of
        pop = d.pop
        mask = self._alive
        i = 0
        while i < n:
            h = block_hashes[i]
            if touch:
                m = pop(h, 0)  # re-insert below: a hit refreshes recency
                if m:
                    d[h] = m
            else:
                m = d.get(h, 0)
            m &= mask
            if m != mask:
                if i:  # workers that held blocks 0..i-1 but not i
                    gone = mask ^ m
                    while gone:
                        low = gone & -gone
                        depth[key_of[low.bit_length() - 1]] = i
                        gone ^= low
                mask = m
                if not mask:
                    return depth
            i += 1
        while mask:
            low = mask & -mask
            depth[key_of[low.bit_length() - 1]] = n
            mask ^= low
        return depth

    def __len__(self) -> int:
        return len(self._owners)

    def workers_of(self, block_hash: int) -> list[WorkerKey]:
        m = self._owners.get(block_hash, 0) & self._alive
        out = []
        while m:
            low = m & -m
            out.append(self._key_of[low.bit_length() - 1])
            m ^= low
        return out

    def dump(self) -> dict[WorkerKey, list[int]]:
        """Every worker rank's indexed block hashes (admin/debug; O(blocks))."""
        out: dict[WorkerKey, list[int]] = {k: [] for k in self._slot_of}
        for h, m in self._owners.items():
            m &= self._alive
            while m:
                low = m & -m
                out[self._key_of[low.bit_length() - 1]].append(h)
                m ^= low
        return out
