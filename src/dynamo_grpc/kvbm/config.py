"""The block manager's knobs: capacities per tier and the mocker's modelled bandwidths."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass
class KvbmConfig:
    """One typed config; 0 bytes disables a tier (G1 only is the default)."""

    #: G2 host-memory pool (--kv-host-mib)
    host_bytes: int = 0
    #: G3 directory (--kv-disk-dir); None disables G3
    disk_dir: str | None = None
    #: G3 capacity (--kv-disk-mib)
    disk_bytes: int = 0
    #: mocker: modelled G1<->G2 bandwidth, GB/s (--kv-host-gbps; PCIe 4 x16 is about 25)
    host_gbps: float = 25.0
    #: mocker: modelled G3 read bandwidth, GB/s (--kv-disk-gbps; one NVMe drive is about 3)
    disk_gbps: float = 3.0
    #: G3 writes waiting for the writer thread; past it an offload to disk is skipped (counted)
    max_pending_writes: int = 256

    @property
    def enabled(self) -> bool:
        return self.host_bytes > 0 or self.disk_enabled

    @property
    def disk_enabled(self) -> bool:
        return self.disk_dir is not None and self.disk_bytes > 0

    def problems(self) -> list[tuple[str, str]]:
        """(field, what is wrong) for each out-of-range knob."""
        out = []
        for name in ("host_bytes", "disk_bytes"):
            if getattr(self, name) < 0:
                out.append((name, f"must be >= 0, got {getattr(self, name)}"))
        for name in ("host_gbps", "disk_gbps"):
            if not getattr(self, name) > 0:
                out.append((name, f"must be > 0, got {getattr(self, name)}"))
        if self.max_pending_writes <= 0:
            out.append(("max_pending_writes", f"must be > 0, got {self.max_pending_writes}"))
        if self.disk_bytes > 0 and not self.disk_dir:
            out.append(("disk_bytes", "a G3 capacity needs a directory (--kv-disk-dir)"))
        if self.disk_dir and self.disk_bytes <= 0:
            out.append(("disk_dir", "a G3 directory needs a capacity (--kv-disk-mib)"))
        return out

    def validate(self) -> None:
        bad = self.problems()
        if bad:
            raise ValueError("; ".join(f"{f} {m}" for f, m in bad))
