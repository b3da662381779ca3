"""The torch executor's side of the KV tiers: real K/V tensors between the paged cache and host/disk.

One block's payload is every layer's K and V for its ``block_size`` slots, laid out as
``(2, layers, block_size, kv_heads, head_dim)`` in the cache's dtype. G2 is one preallocated
host tensor of ``num_slots`` such blocks (pinned when a CUDA device is present, so copies can
overlap); G3 payloads are the same bytes. The layout string names the model's weights (a
fingerprint of the embedding), dtype and geometry, so a disk block from another model or
geometry is never loaded.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import xxhash

from .kv_cache import KvCache, bytes_per_block
from .weights import LlamaConfig


def weights_fingerprint(embed: torch.Tensor) -> str:
    """A short digest of the embedding matrix: two models that differ here never share KV bytes."""
    raw = embed.detach().contiguous().view(torch.uint8).numpy()
    return f"{xxhash.xxh3_64_intdigest(raw.tobytes()):016x}"


class TorchBlockIO:
    simulated = False

    def __init__(self, kv: KvCache, cfg: LlamaConfig, dtype: torch.dtype, fingerprint: str) -> None:
        self.kv = kv
        self.dtype = dtype
        self.bs = kv.block_size
        self.layers = cfg.num_hidden_layers
        self.shape = (2, self.layers, self.bs, cfg.num_key_value_heads, cfg.head_dim)
        self.block_nbytes = bytes_per_block(cfg, self.bs, dtype)
        self.layout = (
            f"torch-paged-kv/v1 weights={fingerprint} dtype={str(dtype).removeprefix('torch.')} "
            f"layers={self.layers} block={self.bs} kv_heads={cfg.num_key_value_heads} head_dim={cfg.head_dim}"
        )
        self.host: torch.Tensor | None = None
        # (num_blocks, block_size, heads, dim) views of each layer's slot tensors
        nb = kv.num_blocks
        self._k = [t.view(nb, self.bs, *t.shape[1:]) for t in kv.k]
        self._v = [t.view(nb, self.bs, *t.shape[1:]) for t in kv.v]

    def alloc_host(self, num_slots: int) -> None:
        # zeros, not empty: the pages are touched now, not on the first offload inside a step
        self.host = torch.zeros((num_slots, *self.shape), dtype=self.dtype, pin_memory=torch.cuda.is_available())

    def _host(self) -> torch.Tensor:
        if self.host is None:
            raise RuntimeError("no G2 host buffers were allocated")
        return self.host

    def to_host(self, pairs: Sequence[tuple[int, int]]) -> None:
        host = self._host()
        bids = torch.tensor([b for b, _ in pairs], dtype=torch.long)
        slots = torch.tensor([s for _, s in pairs], dtype=torch.long)
        for layer in range(self.layers):
            host[slots, 0, layer] = self._k[layer].index_select(0, bids)
            host[slots, 1, layer] = self._v[layer].index_select(0, bids)

    def from_host(self, pairs: Sequence[tuple[int, int]]) -> None:
        host = self._host()
        slots = torch.tensor([s for s, _ in pairs], dtype=torch.long)
        bids = torch.tensor([b for _, b in pairs], dtype=torch.long)
        for layer in range(self.layers):
            self._k[layer][bids] = host[slots, 0, layer]
            self._v[layer][bids] = host[slots, 1, layer]

    @staticmethod
    def _bytes(t: torch.Tensor) -> bytes:
        return bytes(t.contiguous().view(torch.uint8).numpy().tobytes())

    def host_bytes(self, slot: int) -> bytes:
        return self._bytes(self._host()[slot])

    def device_bytes(self, block_id: int) -> bytes:
        block = torch.stack(
            [torch.stack([self._k[layer][block_id], self._v[layer][block_id]]) for layer in range(self.layers)], dim=1
        )
        return self._bytes(block)

    def from_bytes(self, items: Sequence[tuple[bytes, int]]) -> None:
        for payload, block_id in items:
            if len(payload) != self.block_nbytes:
                raise ValueError(f"a G3 payload of {len(payload)} bytes is not a block of {self.block_nbytes}")
            block = torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(self.dtype).view(self.shape)
            for layer in range(self.layers):
                self._k[layer][block_id] = block[0, layer]
                self._v[layer][block_id] = block[1, layer]
