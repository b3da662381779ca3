"""What KV blocks a request holds: prefix lookup, allocation, registration, freeing, hit counters.

The block table lives on the request (``Request.blocks``); the pool (``block_pool.py``) owns the
blocks, the free queue and the prefix-cache map, and records the KV events. Allocation never
half-succeeds: it returns False and changes nothing when the free queue cannot cover it.

A decode worker that pulls a prompt's KV from a prefill worker first *reserves* the blocks the request
will own (:meth:`KvManager.reserve`: the cached prefix, pinned, and fresh blocks for the rest); the
transfer writes straight into them, and the request *claims* them when it enters the scheduler. A
reservation that is cancelled (a failed or cut pull) frees its blocks unregistered: nothing
half-written ever reaches the prefix cache.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from dynamo_grpc.events.kv import KvEvent, KvStored
from dynamo_grpc.kvbm.manager import TierManager
from dynamo_grpc.kvbm.tier import BlockMeta, Medium

from .block_pool import BlockPool, KvBlock
from .request import Request


@dataclass(eq=False)
class KvReservation:
    """Blocks held for a prompt whose KV arrives from elsewhere, before its request is scheduled."""

    reservation_id: int
    #: the request's block table: ``first_block`` cached prefix blocks, the blocks to fill up to
    #: ``end_block`` (the prompt's last, maybe partial), and one more when the first generated token
    #: starts a block (so the request needs no other block to be admitted)
    blocks: list[KvBlock]
    first_block: int
    end_block: int
    #: prompt tokens the transferred blocks cover
    num_tokens: int

    @property
    def fill_block_ids(self) -> list[int]:
        """The blocks the transfer writes, in the handle's order from ``first_block``."""
        return [b.block_id for b in self.blocks[self.first_block : self.end_block]]


class KvManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, tiers: TierManager | None = None
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        #: G2/G3 below the device pool (kvbm); None: an evicted block is gone
        self.tiers = tiers if enable_prefix_caching else None
        #: device blocks onboarded this step (withdrawn from the cache if the copy fails)
        self._onboarded: list[KvBlock] = []
        if self.tiers is not None:
            on_evict = self.tiers.on_evict
            self.pool.on_evict = lambda b: on_evict(
                b.block_id, BlockMeta(int(b.block_hash or 0), int(b.tokens_hash or 0), b.parent_hash)
            )
        #: prompt tokens looked up / found in the prefix cache (hit rate = hit / queried)
        self.queried_tokens = 0
        self.hit_tokens = 0
        #: reservations not yet claimed by a request nor cancelled
        self.reservations: dict[int, KvReservation] = {}
        self._reservation_ids = itertools.count()

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def record_lookup(self, req: Request, hit_tokens: int) -> None:
        self.queried_tokens += req.num_tokens
        self.hit_tokens += hit_tokens

    def find_prefix(self, req: Request) -> list[KvBlock]:
        """Longest cached prefix of ``req``; always leaves at least one token to compute (for logits)."""
        if not self.enable_prefix_caching:
            return []
        req.update_block_hashes(self.block_size)
        limit = (req.num_tokens - 1) // self.block_size
        prefix = self.pool.longest_prefix(req.block_hashes[:limit])
        if self.tiers is not None and len(prefix) < limit:
            rest = req.block_hashes[len(prefix) : limit]
            lookup = self.pool.lookup
            hits = self.tiers.lookup(rest)
            for i, h in enumerate(rest[: len(hits)]):
                if lookup(h) is not None:  # back on the device under another parent: stop here
                    del hits[i:]
                    break
            req.lower_hits = hits
        else:
            req.lower_hits = []
        return prefix

    def prefix_credit(self, req: Request, host_weight: float, disk_weight: float) -> float:
        """Blocks of ``req``'s prompt cached now, each at its tier's weight (device 1.0); changes nothing
        (the lpm admission order ranks the waiting queue by it)."""
        if not self.enable_prefix_caching:
            return 0.0
        req.update_block_hashes(self.block_size)
        limit = (req.num_tokens - 1) // self.block_size
        hashes = req.block_hashes[:limit]
        g1 = len(self.pool.longest_prefix(hashes))
        if self.tiers is None or g1 >= limit:
            return float(g1)
        credit = float(g1)
        lookup = self.pool.lookup
        for h, medium in zip(hashes[g1:], self.tiers.lookup(hashes[g1:]), strict=False):
            if lookup(h) is not None:
                break  # as find_prefix: back on the device under another parent ends the run
            credit += host_weight if medium is Medium.HOST else disk_weight
        return credit

    def prefix_tokens(self, req: Request, prefix: list[KvBlock]) -> int:
        """Tokens a fresh request would not compute: the device prefix and the blocks below it."""
        return (len(prefix) + len(req.lower_hits)) * self.block_size

    def admit(self, req: Request, num_new_tokens: int, prefix: list[KvBlock]) -> int:
        """Allocate for a request leaving the queue and onboard its lower-tier hits; returns its computed tokens.

        Onboarded blocks are registered at once (their bytes land before the step executes);
        a G3 block that cannot be read ends the onboarded run, and the rest is computed.
        """
        if not self.allocate(req, num_new_tokens, prefix):
            raise RuntimeError("admit() after can_allocate() said yes must not fail")
        g1 = len(prefix)
        hits, req.lower_hits = req.lower_hits, []
        if not hits or self.tiers is None:
            return g1 * self.block_size
        fresh = req.blocks[g1 : g1 + len(hits)]
        k = self.tiers.fetch(req.block_hashes[g1 : g1 + len(hits)], hits, [b.block_id for b in fresh])
        if k:
            self.pool.register_chain(req.blocks, req.block_hashes, req.tokens_hashes, g1, g1 + k)
            req.num_registered = g1 + k
            self._onboarded.extend(fresh[:k])
        return (g1 + k) * self.block_size

    def run_tiers(self) -> float:
        """Move this step's offloads and onboards (before the executor runs); modelled seconds.

        If the copy fails, the blocks it was filling are withdrawn from the prefix cache (a
        KvRemoved) and the error propagates: the step's requests fail, no wrong KV is reused.
        """
        if self.tiers is None:
            return 0.0
        onboarded, self._onboarded = self._onboarded, []
        try:
            return self.tiers.run_step()
        except Exception:
            self.pool.uncache(onboarded)
            raise

    def _needs(self, req: Request, num_new_tokens: int, prefix: list[KvBlock]) -> tuple[int, int]:
        """(fresh blocks to allocate, prefix blocks to reclaim from the free queue)."""
        held = len(req.blocks)
        computed = req.num_computed_tokens if held else (len(prefix) + len(req.lower_hits)) * self.block_size
        need_new = max(self.blocks_for(computed + num_new_tokens) - held - len(prefix), 0)
        reclaim = sum(1 for b in prefix if b.ref_cnt == 0)
        return need_new, reclaim

    def can_allocate(self, req: Request, num_new_tokens: int, prefix: list[KvBlock], reserve: int = 0) -> bool:
        """Whether ``allocate`` would succeed and still leave ``reserve`` blocks free (the watermark)."""
        need_new, reclaim = self._needs(req, num_new_tokens, prefix)
        return need_new + reclaim + reserve <= self.pool.num_free

    def allocate(self, req: Request, num_new_tokens: int, prefix: list[KvBlock] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``req`` (after ``prefix`` on admission).

        Prefix blocks sitting in the free queue count against the free blocks, since taking them
        removes them from it.
        """
        if not prefix and req.num_computed_tokens + num_new_tokens <= len(req.blocks) * self.block_size:
            return True  # fits in the blocks it holds (most decode steps)
        prefix = prefix or []
        need_new, reclaim = self._needs(req, num_new_tokens, prefix)
        if need_new + reclaim > self.pool.num_free:
            return False
        if prefix:
            self.pool.touch(prefix)
            req.blocks.extend(prefix)
            req.num_registered = len(prefix)
        if need_new:
            req.blocks.extend(self.pool.allocate(need_new))
        return True

    def register_full_blocks(self, req: Request) -> None:
        """Register blocks whose tokens are all computed (a KvStored event for the new ones)."""
        if not self.enable_prefix_caching:
            return
        full = min(req.num_computed_tokens // self.block_size, len(req.blocks))
        done = req.num_registered
        if full <= done:
            return
        req.update_block_hashes(self.block_size)
        self.pool.register_chain(req.blocks, req.block_hashes, req.tokens_hashes, done, full)
        req.num_registered = full

    def free(self, req: Request) -> None:
        """Release every block of ``req``, tail first (tails are evicted before shared prefixes)."""
        blocks, req.blocks = req.blocks, []
        req.num_registered = 0
        req.num_sent_blocks = 0
        if blocks:
            self.pool.free(reversed(blocks))

    # ------------------------------------------------------------------ reservations (pulled KV)

    @property
    def num_reserved_blocks(self) -> int:
        return sum(len(r.blocks) for r in self.reservations.values())

    def reserve(self, block_hashes: Sequence[int], num_tokens: int, reserve: int = 0) -> KvReservation | None:
        """Pin the cached prefix of ``block_hashes`` and allocate blocks for the rest of ``num_tokens`` and
        the first generated token; None (nothing changed) when that would leave fewer than ``reserve``
        blocks free."""
        prefix = self.pool.longest_prefix(block_hashes) if self.enable_prefix_caching else []
        need = max(self.blocks_for(num_tokens + 1) - len(prefix), 0)
        reclaim = sum(1 for b in prefix if b.ref_cnt == 0)
        if need + reclaim + reserve > self.pool.num_free:
            return None
        self.pool.touch(prefix)
        blocks = prefix + self.pool.allocate(need)
        res = KvReservation(next(self._reservation_ids), blocks, len(prefix), self.blocks_for(num_tokens), num_tokens)
        self.reservations[res.reservation_id] = res
        return res

    def claim(self, res: KvReservation) -> KvReservation | None:
        """Hand a reservation's blocks to its request (None: it was cancelled meanwhile)."""
        return self.reservations.pop(res.reservation_id, None)

    def cancel(self, res: KvReservation) -> bool:
        """Free an unclaimed reservation's blocks, unregistered (idempotent; False once claimed or cancelled)."""
        if self.reservations.pop(res.reservation_id, None) is None:
            return False
        self.pool.free(reversed(res.blocks))
        return True

    def take_events(self) -> list[KvEvent]:
        events = self.pool.take_events()
        if self.tiers is not None:
            events.extend(self.tiers.take_events())
        return events

    def dump(self) -> list[KvStored]:
        out = self.pool.dump()
        if self.tiers is not None:
            out.extend(self.tiers.dump())
        return out
