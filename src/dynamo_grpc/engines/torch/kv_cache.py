"""The paged KV cache tensors: per layer, one K and one V tensor indexed by slot.

Slot ``block_id * block_size + offset`` holds one token's keys/values for every KV
head. Blocks are handed out by the block pool; a request's block table maps its
positions to slots. Sizing by bytes is how a user bounds memory.
"""

from __future__ import annotations

import torch

from .weights import LlamaConfig


def bytes_per_block(cfg: LlamaConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def num_blocks_for_bytes(cfg: LlamaConfig, block_size: int, dtype: torch.dtype, kv_cache_bytes: int) -> int:
    per_block = bytes_per_block(cfg, block_size, dtype)
    n = kv_cache_bytes // per_block
    if n <= 0:
        raise ValueError(f"kv_cache_bytes={kv_cache_bytes} holds no block of {per_block} bytes")
    return int(n)


class KvCache:
    def __init__(self, cfg: LlamaConfig, num_blocks: int, block_size: int, dtype: torch.dtype) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        slots = num_blocks * block_size
        shape = (slots, cfg.num_key_value_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_hidden_layers)]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))
