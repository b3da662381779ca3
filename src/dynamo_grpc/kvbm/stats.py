"""The tiers' counters as one flat dict (engine ``stats()``, benchmarks, the worker's metrics)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .manager import TierManager


def kvbm_stats(tiers: TierManager | None) -> dict[str, Any]:
    """``kvbm_<tier>_<counter>`` for each tier and counter; empty when no tier is configured."""
    if tiers is None:
        return {}
    out: dict[str, Any] = {}
    for name, counters in (("host", tiers.stats.host), ("disk", tiers.stats.disk)):
        for k, v in asdict(counters).items():
            out[f"kvbm_{name}_{k}"] = v
    for name, gauges in tiers.gauges().items():
        for k, v in gauges.items():
            out[f"kvbm_{name}_{k}"] = v
    if tiers.disk is not None:
        d = tiers.disk.stats
        out.update(
            kvbm_disk_corrupt=d.corrupt,
            kvbm_disk_reused=d.reused,
            kvbm_disk_wiped=d.wiped,
            kvbm_disk_write_errors=d.write_errors,
        )
    return out
