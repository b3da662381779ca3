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
        """One block on the wire: [layers, 2 (K, V), block_size, kv_heads, head_dim] (see :meth:`export_blocks`)."""
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

    def export_views(self, block_ids: list[int]) -> list[memoryview]:
        """Blocks as :meth:`export_blocks` lays them out, as views of the cache's own memory (no copy).

        For a socket's gather write (``sendmsg``): the views are valid while the blocks stay pinned
        (a lease), which is what keeps the cache from writing them meanwhile.
        """
        parts: list[memoryview] = []
        bs = self.block_size
        runs = _runs(block_ids)
        for k, v in zip(self.k, self.v, strict=True):
            for t in (k, v):
                raw = t.view(torch.uint8)  # numpy has no bfloat16: move bytes
                for start, n in runs:
                    chunk = raw[start * bs : (start + n) * bs].numpy()
                    parts.append(memoryview(chunk.data).cast("B"))
        return parts

    def export_blocks(self, block_ids: list[int]) -> bytes:
        """Blocks as row-major [layers, 2 (K, V), n, block_size, kv_heads, head_dim] bytes.

        Layer-major, so a run of consecutive blocks is one contiguous slice of each layer's K and V
        tensors: the export is one copy of each slice into the message, with no gather.
        """
        return b"".join(self.export_views(block_ids))

    def import_views(self, block_ids: list[int]) -> list[memoryview]:
        """Writable views of blocks in :meth:`export_blocks`'s layout: a transfer receives into them
        (``recv_into``), so pulled KV lands in the cache with no buffer in between. The blocks must be
        held by nobody else (a reservation): the engine neither reads nor writes them meanwhile."""
        return self.export_views(block_ids)


def _runs(block_ids: list[int]) -> list[tuple[int, int]]:
    """(first id, length) of each run of consecutive ids, in order."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs
