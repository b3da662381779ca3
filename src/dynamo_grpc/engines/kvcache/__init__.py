"""Torch-free KV-cache bookkeeping shared by the mocker and torch engines.

One block pool (free queue in LRU order, prefix-cache map keyed by the DESIGN.md block hash, KV
events, full dump) and the per-request hash chain and stop rules, so both engines announce exactly
the same events for the same token streams.
"""

from dynamo_grpc.engines.kvcache.block_pool import BlockPool, KvBlock, NoFreeBlocks
from dynamo_grpc.engines.kvcache.request import extend_block_hashes, stop_reason

__all__ = ["BlockPool", "KvBlock", "NoFreeBlocks", "extend_block_hashes", "stop_reason"]
