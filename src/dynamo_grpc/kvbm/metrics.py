"""The tiers' Prometheus metrics, read at scrape time from the engine's counters (no bookkeeping twice).

Per tier (label ``tier`` = host | disk): blocks and bytes held, prompt tokens served (hits),
offloaded and onboarded blocks and bytes, the seconds those transfers took (bytes/s is
``rate(bytes) / rate(seconds)``), and offloads skipped under pressure; plus corrupt G3 files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

PREFIX = "dynamo_worker_kvbm_"
#: counter suffix -> (stats key suffix, help)
COUNTERS = {
    "hit_tokens": ("hit_tokens", "Prompt tokens onboarded from this tier instead of recomputed"),
    "offload_blocks": ("offloads", "Blocks offloaded into this tier"),
    "offload_bytes": ("offload_bytes", "Bytes offloaded into this tier"),
    "offload_seconds": ("offload_seconds", "Seconds spent offloading into this tier"),
    "onboard_blocks": ("onboards", "Blocks onboarded from this tier to the device"),
    "onboard_bytes": ("onboard_bytes", "Bytes onboarded from this tier"),
    "onboard_seconds": ("onboard_seconds", "Seconds spent onboarding from this tier (real, not modelled)"),
    "skipped_offloads": ("skipped", "Offloads into this tier dropped under pressure"),
}
GAUGES = {
    "blocks": ("blocks", "Blocks held in this tier"),
    "bytes": ("bytes", "Bytes held in this tier (modelled bytes for the mocker)"),
}


class KvbmCollector:
    """A collector over ``stats()`` (the flat dict of :func:`dynamo_grpc.kvbm.stats.kvbm_stats`)."""

    def __init__(self, model: str, stats: Callable[[], dict[str, Any]]) -> None:
        self.model = model
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        tiers = [t for t in ("host", "disk") if f"kvbm_{t}_blocks" in s]
        for name, (key, doc) in COUNTERS.items():
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model", "tier"])
            for t in tiers:
                c.add_metric([self.model, t], float(s.get(f"kvbm_{t}_{key}", 0)))
            yield c
        for name, (key, doc) in GAUGES.items():
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model", "tier"])
            for t in tiers:
                g.add_metric([self.model, t], float(s.get(f"kvbm_{t}_{key}", 0)))
            yield g
        doc = "G3 files found torn or corrupt (recomputed)"
        c = CounterMetricFamily(PREFIX + "corrupt_blocks", doc, labels=["model"])
        c.add_metric([self.model], float(s.get("kvbm_disk_corrupt", 0)))
        yield c


def register_kvbm_metrics(registry: CollectorRegistry, model: str, engine: object) -> bool:
    """Add the tiers' metrics when ``engine`` has tiers (``kvbm_stats()`` non-empty); False otherwise."""
    stats = getattr(engine, "kvbm_stats", None)
    if not callable(stats) or not stats():
        return False
    registry.register(KvbmCollector(model, stats))  # type: ignore[arg-type]
    return True
