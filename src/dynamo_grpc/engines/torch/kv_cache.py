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

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """One block on the wire: [layers, 2 (K, V), block_size, kv_heads, head_dim]."""
        _, heads, dim = self.k[0].shape
        return (len(self.k), 2, self.block_size, heads, dim)

    @property
    def block_nbytes(self) -> int:
        layers, two, bs, heads, dim = self.block_shape
        return layers * two * bs * heads * dim * self.k[0].element_size()

    def _slots(self, block_ids: list[int]) -> torch.Tensor:
        bs = self.block_size
        base = torch.tensor(block_ids, dtype=torch.long).unsqueeze(1) * bs
        return (base + torch.arange(bs)).reshape(-1)

    def export_blocks(self, block_ids: list[int]) -> bytes:
        """Blocks as row-major [n, layers, 2, block_size, kv_heads, head_dim] bytes (one message, not one per layer)."""
        n = len(block_ids)
        if not n:
            return b""
        slots = self._slots(block_ids)
        layers, _, bs, heads, dim = self.block_shape
        out = torch.empty((n, layers, 2, bs, heads, dim), dtype=self.k[0].dtype)
        for i, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
            out[:, i, 0] = k.index_select(0, slots).view(n, bs, heads, dim)
            out[:, i, 1] = v.index_select(0, slots).view(n, bs, heads, dim)
        return out.view(torch.uint8).numpy().tobytes()

    def import_blocks(self, block_ids: list[int], data: bytes) -> None:
        """Write blocks exported by :meth:`export_blocks` (same layout) into ``block_ids``."""
        n = len(block_ids)
        if not n:
            return
        layers, _, bs, heads, dim = self.block_shape
        dtype = self.k[0].dtype
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).view(n, layers, 2, bs, heads, dim)
        slots = self._slots(block_ids)
        for i, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
            k.index_copy_(0, slots, t[:, i, 0].reshape(n * bs, heads, dim))
            v.index_copy_(0, slots, t[:, i, 1].reshape(n * bs, heads, dim))
