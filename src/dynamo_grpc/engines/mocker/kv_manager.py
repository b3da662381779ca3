"""What KV blocks a mocker request holds: its block table lives on the request itself."""

from __future__ import annotations

from dynamo_grpc.engines.kvcache.block_pool import KvBlock
from dynamo_grpc.engines.kvcache.kv_manager import KvManagerBase

from .request import MockRequest


class KvManager(KvManagerBase):
    """Block tables (``request.blocks``) on top of the shared block pool, with hit-rate counters."""

    def find_prefix(self, req: MockRequest) -> list[KvBlock]:
        """Longest cached prefix of ``req``; always leaves at least one token to compute."""
        req.hash_full_blocks(self.block_size)
        return self._cached_prefix(req)

    def can_allocate(self, req: MockRequest, num_new_tokens: int, prefix: list[KvBlock], reserve: int = 0) -> bool:
        need_new, reclaim = self._mock_needs(req, num_new_tokens, prefix)
        return need_new + reclaim + reserve <= self.pool.num_free

    def allocate(self, req: MockRequest, num_new_tokens: int, prefix: list[KvBlock] | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``req`` (after ``prefix`` on admission).

        Returns False and changes nothing when the free queue cannot cover it; prefix blocks
        sitting in the free queue count against it, since taking them removes them.
        """
        if not prefix and req.num_computed + num_new_tokens <= len(req.blocks) * self.block_size:
            return True  # fits in the blocks it holds (most decode steps)
        prefix = prefix or []
        if not self.can_allocate(req, num_new_tokens, prefix):
            return False
        need_new, _ = self._mock_needs(req, num_new_tokens, prefix)
        if prefix:
            self.pool.touch(prefix)
            req.blocks.extend(prefix)
            req.num_registered = len(prefix)
        if need_new:
            req.blocks.extend(self.pool.allocate(need_new))
        return True

    def _mock_needs(self, req: MockRequest, num_new_tokens: int, prefix: list[KvBlock]) -> tuple[int, int]:
        computed = len(prefix) * self.block_size if prefix else req.num_computed
        return self._needs(len(req.blocks), computed, num_new_tokens, prefix)

    def register_full_blocks(self, req: MockRequest) -> None:
        """Register blocks whose tokens are all computed (a KvStored event for the new ones)."""
        if not self.enable_prefix_caching:
            return
        req.num_registered = self._register(req, req.hash_full_blocks, req.blocks, req.num_computed, req.num_registered)

    def free(self, req: MockRequest) -> None:
        """Release every block of ``req``, tail first (tails are evicted before shared prefixes)."""
        blocks, req.blocks = req.blocks, []
        req.num_registered = 0
        if blocks:
            self.pool.free(reversed(blocks))
