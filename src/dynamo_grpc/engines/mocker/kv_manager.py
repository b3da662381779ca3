"""What KV blocks a request holds: prefix lookup, slot allocation, registration of full blocks."""

from __future__ import annotations

from dynamo_grpc.engines.base import KvEvent, KvStored

from .block_pool import Block, BlockPool
from .request import MockRequest


class KvManager:
    """Block tables (``request.blocks``) on top of a :class:`BlockPool`, with hit-rate counters."""

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

    def find_prefix(self, req: MockRequest) -> list[Block]:
        """Longest cached prefix of ``req``; always leaves at least one token to compute."""
        req.hash_full_blocks(self.block_size)
        if not self.enable_prefix_caching:
            return []
        limit = (req.num_tokens - 1) // self.block_size
        hit: list[Block] = []
        for h in req.block_hashes[:limit]:
            b = self.pool.lookup(h)
            if b is None:
                break
            hit.append(b)
        return hit

    def can_allocate(self, req: MockRequest, num_new_tokens: int, prefix: list[Block], reserve: int = 0) -> bool:
        need_new, reclaim = self._needs(req, num_new_tokens, prefix)
        return need_new + reclaim + reserve <= self.pool.num_free

    def allocate(self, req: MockRequest, num_new_tokens: int, prefix: list[Block] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``req`` (after ``prefix`` on admission).

        Returns False and changes nothing when the free queue cannot cover it; prefix blocks
        sitting in the free queue count against it, since taking them removes them.
        """
        if not prefix and req.num_computed + num_new_tokens <= len(req.blocks) * self.block_size:
            return True  # fits in the blocks it holds (most decode steps)
        prefix = prefix or []
        if not self.can_allocate(req, num_new_tokens, prefix):
            return False
        need_new, _ = self._needs(req, num_new_tokens, prefix)
        if prefix:
            self.pool.touch(prefix)
            req.blocks.extend(prefix)
            req.num_registered = len(prefix)
        if need_new:
            req.blocks.extend(self.pool.allocate(need_new))
        return True

    def _needs(self, req: MockRequest, num_new_tokens: int, prefix: list[Block]) -> tuple[int, int]:
        computed = len(prefix) * self.block_size if prefix else req.num_computed
        total = self.blocks_for(computed + num_new_tokens)
        need_new = max(total - len(req.blocks) - len(prefix), 0)
        reclaim = sum(1 for b in prefix if b.ref_cnt == 0)
        return need_new, reclaim

    def record_lookup(self, req: MockRequest, hit_tokens: int) -> None:
        self.queried_tokens += req.num_tokens
        self.hit_tokens += hit_tokens

    def register_full_blocks(self, req: MockRequest) -> None:
        """Register blocks whose tokens are all computed (a KvStored event for the new ones)."""
        if not self.enable_prefix_caching:
            return
        full = min(req.num_computed // self.block_size, len(req.blocks))
        done = req.num_registered
        if full <= done:
            return
        req.hash_full_blocks(self.block_size)
        parent = req.block_hashes[done - 1] if done else None
        hashes = list(zip(req.block_hashes[done:full], req.tokens_hashes[done:full], strict=True))
        self.pool.register(req.blocks[done:full], hashes, parent)
        req.num_registered = full

    def free(self, req: MockRequest) -> None:
        """Release every block of ``req``, tail first (tails are evicted before shared prefixes)."""
        blocks, req.blocks = req.blocks, []
        req.num_registered = 0
        if blocks:
            self.pool.free(reversed(blocks))

    def take_events(self) -> list[KvEvent]:
        return self.pool.take_events()

    def dump(self) -> list[KvStored]:
        return self.pool.dump()
