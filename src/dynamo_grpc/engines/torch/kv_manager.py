"""What KV blocks a torch-engine request holds: block tables keyed by request id.

The runner reads a request's table (``block_ids``) to build slot mappings, so the tables live
here rather than on the request; everything else is the shared :class:`KvManagerBase`.
"""

from __future__ import annotations

from dynamo_grpc.engines.kvcache.block_pool import KvBlock
from dynamo_grpc.engines.kvcache.kv_manager import KvManagerBase

from .request import Request


class KvCacheManager(KvManagerBase):
    """Per-request block tables on top of the shared block pool.

    A request's table covers ``ceil(tokens / block_size)`` blocks; its first
    ``_num_cached[id]`` blocks are registered in the prefix cache.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        super().__init__(num_blocks, block_size, enable_prefix_caching)
        self.tables: dict[str, list[KvBlock]] = {}
        self._num_cached: dict[str, int] = {}

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.tables.get(request_id, [])]

    def find_prefix(self, req: Request) -> list[KvBlock]:
        """Longest cached prefix of ``req``; always leaves >= 1 token to compute for logits."""
        req.update_block_hashes(self.block_size)
        return self._cached_prefix(req)

    def allocate(self, req: Request, num_new_tokens: int, prefix: list[KvBlock] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``req`` (after ``prefix`` if given).

        Returns False, changing nothing, when the free queue cannot cover it (prefix
        blocks that sit in the free queue count against it: taking them removes them).
        """
        prefix = prefix or []
        table = self.tables.get(req.request_id, [])
        computed = req.num_computed_tokens if table else len(prefix) * self.block_size
        need_new, reclaim = self._needs(len(table), computed, num_new_tokens, prefix)
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
        self._num_cached[rid] = self._register(
            req, req.update_block_hashes, table, req.num_computed_tokens, self._num_cached[rid]
        )

    def free(self, req: Request) -> None:
        """Release every block of ``req`` (tail first, so tails are evicted before prefixes)."""
        table = self.tables.pop(req.request_id, None)
        self._num_cached.pop(req.request_id, None)
        if table:
            self.pool.free(reversed(table))
