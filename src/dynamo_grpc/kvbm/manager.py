"""The tiers of one engine: what to offload and onboard this step, the KV events, the counters.

The engine core calls in three places (its hooks are in ``engines/core/kv_manager.py``):

- ``on_evict`` while scheduling, for each cached block the device pool hands out again: the block
  is queued for offload (its bytes are still intact: nothing runs until the step executes);
- ``lookup`` + ``fetch`` when a waiting request is admitted: after the device prefix, the leading
  blocks found in G2, then G3, are taken for onboarding into freshly allocated device blocks
  (G3 payloads are read and verified here; the first unreadable one ends the run, and the rest
  is recomputed);
- ``run_step`` once per step before the executor runs: copy evicted device blocks out, copy
  onboarded blocks in, then file the offloads in G2 (whose LRU victims go to the G3 writer
  thread; a full writer queue skips the offload, never waits).

The bytes move through the executor's :class:`BlockIO`: the torch executor copies real KV
tensors; the mocker moves nothing and reports the time its modelled bandwidths would take.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from dynamo_grpc.events.kv import KvEvent, KvRemoved, KvStored, StoredBlock

from .config import KvbmConfig
from .disk import DiskTier
from .tier import BlockMeta, HostTier, Medium


class BlockIO(Protocol):
    """How the tiers reach an executor's KV bytes (one block = every layer's K and V for its tokens)."""

    #: what the bytes mean (model, dtype, geometry): G3 files of another layout are never loaded
    layout: str
    #: bytes of one block (real for torch, modelled for the mocker)
    block_nbytes: int
    #: True when nothing moves and transfers only cost modelled time (the mocker)
    simulated: bool

    def alloc_host(self, num_slots: int) -> None:
        """Preallocate the G2 buffers."""

    def to_host(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy device blocks into host slots: (device block id, host slot)."""

    def from_host(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy host slots into device blocks: (host slot, device block id)."""

    def host_bytes(self, slot: int) -> bytes:
        """A host slot's payload as bytes (for a G3 file)."""
        ...

    def device_bytes(self, block_id: int) -> bytes:
        """A device block's payload as bytes (G1 → G3 when there is no G2)."""
        ...

    def from_bytes(self, items: Sequence[tuple[bytes, int]]) -> None:
        """Write payloads read from G3 into device blocks: (payload, device block id)."""


@dataclass
class TierCounters:
    """Per medium: what moved (exported as metrics)."""

    hit_tokens: int = 0
    #: blocks that came into this tier from the one above (offloads)
    offloads: int = 0
    offload_bytes: int = 0
    #: blocks onboarded from this tier into the device
    onboards: int = 0
    onboard_bytes: int = 0
    #: time spent moving bytes in (real) or modelled (mocker)
    onboard_seconds: float = 0.0
    offload_seconds: float = 0.0
    #: offloads into this tier that were dropped under pressure
    skipped: int = 0


@dataclass
class TierStats:
    host: TierCounters = field(default_factory=TierCounters)
    disk: TierCounters = field(default_factory=TierCounters)

    def of(self, medium: Medium) -> TierCounters:
        return self.host if medium is Medium.HOST else self.disk


class TierManager:
    """G2 and G3 of one engine. Called from the engine's step thread only (G3 has its own writer)."""

    def __init__(self, config: KvbmConfig, io: BlockIO, block_size: int) -> None:
        config.validate()
        self.config = config
        self.io = io
        self.block_size = block_size
        slots = config.host_bytes // io.block_nbytes if config.host_bytes else 0
        if config.host_bytes and not slots:
            raise ValueError(f"--kv-host-mib holds no block of {io.block_nbytes} bytes")
        self.host: HostTier | None = HostTier(slots) if slots else None
        if slots:
            io.alloc_host(slots)
        self.disk: DiskTier | None = (
            DiskTier(config.disk_dir, config.disk_bytes, io.layout, config.max_pending_writes, io.block_nbytes)
            if config.disk_enabled and config.disk_dir is not None
            else None
        )
        self.stats = TierStats()
        self._offload: list[tuple[int, BlockMeta]] = []
        self._onboard_host: list[tuple[int, int]] = []
        self._onboard_disk: list[tuple[bytes, int]] = []
        self._events: list[KvEvent] = []

    # ---------------------------------------------------------------- scheduling hooks

    def on_evict(self, block_id: int, meta: BlockMeta) -> None:
        """A cached device block is being reused: keep it below (copied in :meth:`run_step`)."""
        if self.host is not None and meta.block_hash in self.host:
            self.host.touch(meta.block_hash)  # already there (onboarded earlier): nothing to copy
            return
        self._offload.append((block_id, meta))

    def lookup(self, block_hashes: Sequence[int]) -> list[Medium]:
        """The tier of each leading block found below the device (stops at the first miss)."""
        out: list[Medium] = []
        host, disk = self.host, self.disk
        for h in block_hashes:
            if host is not None and h in host:
                out.append(Medium.HOST)
            elif disk is not None and h in disk:
                out.append(Medium.DISK)
            else:
                break
        return out

    def fetch(self, block_hashes: Sequence[int], media: Sequence[Medium], block_ids: Sequence[int]) -> int:
        """Take ``block_hashes`` (found by :meth:`lookup`) for onboarding into ``block_ids``.

        Returns how many leading blocks will be onboarded; a G3 block that cannot be read ends
        the run (it and the rest are recomputed).
        """
        n = 0
        for h, medium, bid in zip(block_hashes, media, block_ids, strict=False):
            if medium is Medium.HOST and self.host is not None:
                slot = self.host.slot_of(h)
                if slot is None:
                    break
                self.host.touch(h)
                self._onboard_host.append((slot, bid))
            elif medium is Medium.DISK and self.disk is not None:
                t0 = time.perf_counter()
                payload = self.disk.read(h)
                if payload is None:
                    break
                self.stats.disk.onboard_seconds += time.perf_counter() - t0
                self._onboard_disk.append((payload, bid))
            else:
                break
            c = self.stats.of(medium)
            c.hit_tokens += self.block_size
            c.onboards += 1
            c.onboard_bytes += self.io.block_nbytes
            n += 1
        return n

    # ---------------------------------------------------------------- the step

    def run_step(self) -> float:
        """Move this step's bytes; returns the modelled seconds onboarding adds to the step (mocker)."""
        io = self.io
        nb = io.block_nbytes
        modelled = 0.0
        offload, self._offload = self._offload, []
        host = self.host
        # 1. copy evicted device blocks out, before onboarding (or the step) overwrites them
        staged_host: list[tuple[int, BlockMeta]] = []
        if offload and host is not None:
            staged_host = self._stage_offloads(offload)
        elif offload:
            self._offload_to_disk(offload)
        # 2. onboard: host slots and disk payloads into the requests' fresh device blocks
        t0 = time.perf_counter()
        if self._onboard_host:
            io.from_host(self._onboard_host)
            n = len(self._onboard_host)
            self.stats.host.onboard_seconds += time.perf_counter() - t0
            if io.simulated:
                modelled += n * nb / (self.config.host_gbps * 1e9)
            self._onboard_host = []
        if self._onboard_disk:
            t1 = time.perf_counter()
            io.from_bytes(self._onboard_disk)
            self.stats.disk.onboard_seconds += time.perf_counter() - t1
            if io.simulated:
                modelled += len(self._onboard_disk) * nb / (self.config.disk_gbps * 1e9)
            self._onboard_disk = []
        modelled /= getattr(io, "speedup_ratio", 1.0)
        if staged_host:
            self._events.append(
                KvStored(
                    staged_host[0][1].parent_hash,
                    [StoredBlock(m.block_hash, m.tokens_hash) for _, m in staged_host],
                    Medium.HOST.value,
                )
            )
        return modelled

    def _offload_to_disk(self, offload: list[tuple[int, BlockMeta]]) -> None:
        """Device blocks straight to the G3 writer (no G2, or G2 cannot take them); skipped without G3."""
        disk = self.disk
        if disk is None:
            self.stats.host.skipped += len(offload)
            return
        t0 = time.perf_counter()
        for bid, meta in offload:
            if disk.put_async(meta, self.io.device_bytes(bid)):
                self.stats.disk.offloads += 1
                self.stats.disk.offload_bytes += self.io.block_nbytes
            else:
                self.stats.disk.skipped += 1
        self.stats.disk.offload_seconds += time.perf_counter() - t0

    def _stage_offloads(self, offload: list[tuple[int, BlockMeta]]) -> list[tuple[int, BlockMeta]]:
        """File evicted device blocks in G2 (LRU victims to G3); returns (slot, meta) filed.

        Host slots being onboarded this step are never victims (their bytes are read after this),
        so a pool smaller than one step's evictions keeps the most recent of them and sends the
        others straight to G3.
        """
        host = self.host
        assert host is not None
        io = self.io
        nb = io.block_nbytes
        pinned = {slot for slot, _ in self._onboard_host}
        budget = host.num_slots - len(pinned)
        if len(offload) > budget:  # more evictions than the pool can take: the oldest go straight down
            cut = len(offload) - max(budget, 0)
            self._offload_to_disk(offload[:cut])
            offload = offload[cut:]
        t0 = time.perf_counter()
        removed: list[int] = []
        pairs: list[tuple[int, int]] = []
        filed: list[tuple[int, BlockMeta]] = []
        # victims first, so their bytes leave before their slots are reused
        while host.num_slots - len(host) < len(offload):
            slot, victim = host.pop_lru(skip=pinned)
            removed.append(victim.block_hash)
            if self.disk is not None:
                if self.disk.put_async(victim, io.host_bytes(slot)):
                    self.stats.disk.offloads += 1
                    self.stats.disk.offload_bytes += nb
                else:
                    self.stats.disk.skipped += 1
        for bid, meta in offload:
            if meta.block_hash in host:
                continue
            slot = host.insert(meta)
            pairs.append((bid, slot))
            filed.append((slot, meta))
        if removed:
            self._events.append(KvRemoved(removed, Medium.HOST.value))
        if pairs:
            io.to_host(pairs)
            self.stats.host.offloads += len(pairs)
            self.stats.host.offload_bytes += len(pairs) * nb
        self.stats.host.offload_seconds += time.perf_counter() - t0
        return filed

    # ---------------------------------------------------------------- events and views

    def take_events(self) -> list[KvEvent]:
        events, self._events = self._events, []
        if self.disk is not None:
            for kind, metas in self.disk.take_events():
                if kind == "stored":
                    for m in metas:
                        events.append(KvStored(m.parent_hash, [StoredBlock(m.block_hash, m.tokens_hash)], "disk"))
                else:
                    events.append(KvRemoved([m.block_hash for m in metas], "disk"))
        return events

    def dump(self) -> list[KvStored]:
        """Every block below the device, as Stored events of its medium (router start-up, gap recovery)."""
        out: list[KvStored] = []
        for tier in (self.host, self.disk):
            if tier is None:
                continue
            for m in tier.metas():
                out.append(KvStored(m.parent_hash, [StoredBlock(m.block_hash, m.tokens_hash)], tier.medium.value))
        return out

    def gauges(self) -> dict[str, dict[str, float]]:
        """Blocks and bytes held per tier (metrics)."""
        out: dict[str, dict[str, float]] = {}
        nb = self.io.block_nbytes
        if self.host is not None:
            host = self.host
            out["host"] = {"blocks": len(host), "bytes": len(host) * nb, "capacity_blocks": host.num_slots}
        if self.disk is not None:
            disk = self.disk
            out["disk"] = {"blocks": len(disk), "bytes": disk.used_bytes, "pending_writes": disk.pending}
        return out

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
