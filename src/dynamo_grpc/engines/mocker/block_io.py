"""The mocker's side of the KV tiers: nothing moves, the bookkeeping is real, time is modelled.

A block "weighs" what a Llama-3-8B fp16 block would (128 KiB per token: 2 × 32 layers × 8 KV
heads × 128 dims × 2 bytes) unless ``kv_bytes_per_token`` says otherwise; tier capacities in MiB
count those bytes, and onboarding costs ``bytes / bandwidth`` of simulated step time
(``--kv-host-gbps``, ``--kv-disk-gbps``). G3 files are real but carry an empty payload.
"""

from __future__ import annotations

from collections.abc import Sequence

#: Llama-3-8B in fp16: 2 (K, V) × 32 layers × 8 KV heads × 128 head dim × 2 bytes
DEFAULT_KV_BYTES_PER_TOKEN = 2 * 32 * 8 * 128 * 2


class MockerBlockIO:
    simulated = True

    def __init__(
        self, block_size: int, kv_bytes_per_token: int = DEFAULT_KV_BYTES_PER_TOKEN, speedup_ratio: float = 1.0
    ) -> None:
        #: modelled transfer times are divided by this, like every simulated step time
        self.speedup_ratio = speedup_ratio
        if kv_bytes_per_token <= 0:
            raise ValueError(f"kv_bytes_per_token must be positive, got {kv_bytes_per_token}")
        self.block_nbytes = block_size * kv_bytes_per_token
        self.layout = f"mocker/v1 block={block_size} bytes_per_token={kv_bytes_per_token}"

    def alloc_host(self, num_slots: int) -> None:
        pass  # no bytes to hold

    def to_host(self, pairs: Sequence[tuple[int, int]]) -> None:
        pass

    def from_host(self, pairs: Sequence[tuple[int, int]]) -> None:
        pass

    def host_bytes(self, slot: int) -> bytes:
        return b""

    def device_bytes(self, block_id: int) -> bytes:
        return b""

    def from_bytes(self, items: Sequence[tuple[bytes, int]]) -> None:
        pass
