"""What KV blocks a request holds: prefix lookup, slot allocation, caching of full blocks."""

from __future__ import annotations

from dynamo_grpc.engines.base import KvEvent, KvStored

from .block_pool import BlockPool, KvBlock
from .request import Request


class KvCacheManager:
    """Per-request block tables on top of a :class:`BlockPool`.

    A request's table covers ``ceil(tokens / block_size)`` blocks; its first
    ``cached[id]`` blocks are registered in the prefix cache.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.tables: dict[str, list[KvBlock]] = {}
        self._num_cached: dict[str, int] = {}
        self.hit_tokens = 0
        self.query_tokens = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.tables.get(request_id, [])]

    def find_prefix(self, req: Request) -> list[KvBlock]:
        """Longest cached prefix of ``req``; always leaves >= 1 token to compute for logits."""
        req.update_block_hashes(self.block_size)
        if not self.enable_prefix_caching:
            return []
        limit = (req.num_tokens - 1) // self.block_size
        hit: list[KvBlock] = []
        for h in req.block_hashes[:limit]:
            b = self.pool.lookup(h)
            if b is None:
                break
            hit.append(b)
        return hit

    def record_query(self, req: Request, hit_blocks: int) -> None:
        self.query_tokens += req.num_tokens
        self.hit_tokens += hit_blocks * self.block_size

    def allocate(self, req: Request, num_new_tokens: int, prefix: list[KvBlock] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``req`` (after ``prefix`` if given).

        Returns False, changing nothing, when the free queue cannot cover it (prefix
        blocks that sit in the free queue count against it: taking them removes them).
        """
        prefix = prefix or []
        table = self.tables.get(req.request_id, [])
        have = len(table) + len(prefix)
        computed = req.num_computed_tokens if table else len(prefix) * self.block_size
        need_total = -(-(computed + num_new_tokens) // self.block_size)
        need_new = max(need_total - have, 0)
        reclaim = sum(1 for b in prefix if b.ref_cnt == 0)
        if need_new + reclaim > self.pool.num_free:
            return False
        if prefix:
            self.pool.touch(prefix)
        new = self.pool.allocate(need_new) if need_new else []
        if req.request_id not in self.tables:
            self.tables[req.request_id] = list(prefix)
            self._num_cached[req.request_id] = len(prefix)
        self.tables[req.request_id].extend(new)
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register blocks whose tokens are all computed (a KvStored event for the new ones)."""
        if not self.enable_prefix_caching:
            return
        rid = req.request_id
        table = self.tables.get(rid)
        if table is None:
            return
        full = min(req.num_computed_tokens // self.block_size, len(table))
        done = self._num_cached[rid]
        if full <= done:
            return
        req.update_block_hashes(self.block_size)
        parent = req.block_hashes[done - 1] if done else None
        hashes = list(zip(req.block_hashes[done:full], req.tokens_hashes[done:full], strict=True))
        self.pool.cache_blocks(table[done:full], hashes, parent)
        self._num_cached[rid] = full

    def free(self, req: Request) -> None:
        """Release every block of ``req`` (tail first, so tails are evicted before prefixes)."""
        table = self.tables.pop(req.request_id, None)
        self._num_cached.pop(req.request_id, None)
        if table:
            self.pool.free(reversed(table))

    def take_events(self) -> list[KvEvent]:
        return self.pool.take_events()

    def dump(self) -> list[KvStored]:
        return self.pool.dump()
