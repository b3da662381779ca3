"""Where a worker keeps each block (device, host, disk), and the overlap credit that follows.

The device index is the router's ``KvIndexer`` (untouched, still the fast path); blocks a worker
announces in host memory (G2) or on disk (G3) go to one more ``KvIndexer`` each. A query walks
the chain once per tier only when some worker has lower-tier blocks: a worker's run of leading
blocks continues while any tier holds the next block, and each block earns the weight of the
best tier holding it (device 1.0, host ``host_weight``, disk ``disk_weight``; Dynamo's 1.0 /
0.75 / 0.25), so a worker with the prefix in host memory still beats one that must recompute,
and loses to one that holds it on the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from dynamo_grpc.router.indexer import KvIndexer, WorkerKey

LOWER = ("host", "disk")


class TierIndex:
    """The per-tier presence of every worker rank's blocks (one thread: the router's loop)."""

    def __init__(self, device: KvIndexer, host_weight: float = 0.75, disk_weight: float = 0.25) -> None:
        self.device = device
        self.weights = {"host": host_weight, "disk": disk_weight}
        self.lower = {m: KvIndexer(getattr(device, "max_blocks", 0)) for m in LOWER}  # benchmarks inject others

    # ---- events -----------------------------------------------------------------------
    def _index(self, medium: str) -> KvIndexer:
        if medium == "device":
            return self.device
        idx = self.lower.get(medium)
        if idx is None:
            raise ValueError(f"unknown KV medium {medium!r}")
        return idx

    def store(self, medium: str, key: WorkerKey, block_hashes: Iterable[int], parent_hash: int | None = None) -> None:
        self._index(medium).store(key, block_hashes, parent_hash)

    def remove(self, medium: str, key: WorkerKey, block_hashes: Iterable[int]) -> None:
        self._index(medium).remove(key, block_hashes)

    def clear_worker(self, key: WorkerKey) -> None:
        """Every tier of this rank is gone (Cleared, restart, before a full dump)."""
        self.device.clear_worker(key)
        for idx in self.lower.values():
            idx.remove_worker(key)

    def remove_worker(self, key: WorkerKey) -> None:
        self.device.remove_worker(key)
        for idx in self.lower.values():
            idx.remove_worker(key)

    def sweep(self) -> None:
        for idx in self.lower.values():
            if idx.needs_sweep():
                idx.sweep()

    # ---- queries ----------------------------------------------------------------------
    def overlaps(self, block_hashes: Sequence[int]) -> dict[WorkerKey, float]:
        """Per worker rank, the weighted credit of its leading run of blocks held in any tier."""
        dev = self.device.overlaps(block_hashes)  # also refreshes the device entries' recency
        host, disk = self.lower["host"], self.lower["disk"]
        if not len(host) and not len(disk):
            return dev  # type: ignore[return-value]  # ints are floats here
        device = self.device
        wh, wd = self.weights["host"], self.weights["disk"]
        credit: dict[WorkerKey, float] = {}
        alive: set[WorkerKey] | None = None
        for h in block_hashes:
            on_dev = set(device.workers_of(h))
            on_host = set(host.workers_of(h))
            on_disk = set(disk.workers_of(h))
            here = on_dev | on_host | on_disk
            alive = here if alive is None else alive & here
            if not alive:
                break
            for k in alive:
                w = 1.0 if k in on_dev else wh if k in on_host else wd
                credit[k] = credit.get(k, 0.0) + w
        return credit

    def tiers_of(self, key: WorkerKey) -> dict[str, int]:
        """Blocks indexed per tier for one rank (admin/debug; O(blocks))."""
        out = {"device": len(self.device.dump().get(key, []))}
        for m, idx in self.lower.items():
            out[m] = len(idx.dump().get(key, []))
        return out
