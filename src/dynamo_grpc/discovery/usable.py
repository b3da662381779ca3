"""ONE view of which workers may get requests, shared by everything that picks workers in a process.

The frontend's model registry skips workers whose registration or card is not to be trusted; an
embedded KV router skips workers whose events it cannot reach. Each marks its reason here under its
own ``source``, and both read ``usable()``: a worker skipped by one is skipped by all, and becomes usable
again when every source that skipped it has cleared it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)


class WorkerView:
    """instance_id -> {source: reason} for skipped workers; listeners hear every change."""

    def __init__(self) -> None:
        self._skipped: dict[str, dict[str, str]] = {}
        self._listeners: list[Callable[[], None]] = []
        #: skips counted by source, once per (instance, source) episode
        self.skips_total: dict[str, int] = {}

    def usable(self, instance_id: str) -> bool:
        return instance_id not in self._skipped

    def skipped(self) -> dict[str, str]:
        """instance_id -> the reasons it is skipped, joined."""
        return {iid: "; ".join(f"{s}: {r}" for s, r in sorted(why.items())) for iid, why in self._skipped.items()}

    def skip(self, instance_id: str, source: str, reason: str, quiet: bool = False) -> None:
        """``quiet``: an expected, passing state (a new worker's card not in KV yet): logged at debug,
        not counted."""
        why = self._skipped.setdefault(instance_id, {})
        if why.get(source) == reason:
            return
        if source not in why and not quiet:
            self.skips_total[source] = self.skips_total.get(source, 0) + 1
        # one warning per worker that becomes unusable; another source agreeing is a detail
        level = logging.WARNING if not why and not quiet else logging.DEBUG
        why[source] = reason
        log.log(level, "worker %s skipped (%s): %s", instance_id, source, reason)
        self._notify()

    def clear(self, instance_id: str, source: str) -> None:
        why = self._skipped.get(instance_id)
        if why is None or source not in why:
            return
        del why[source]
        if not why:
            del self._skipped[instance_id]
            log.info("worker %s usable again (%s)", instance_id, source)
        self._notify()

    def retain(self, source: str, instance_ids: set[str]) -> None:
        """Forget ``source``'s skips of workers that are gone (not in ``instance_ids``)."""
        for iid in [i for i, why in self._skipped.items() if source in why and i not in instance_ids]:
            self.clear(iid, source)

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def collect(self) -> Iterator[Metric]:
        """Prometheus: workers skipped now and skips so far, by source (register the view once)."""
        now = GaugeMetricFamily("dynamo_discovery_skipped_workers", "Workers skipped now", labels=["source"])
        total = CounterMetricFamily("dynamo_discovery_worker_skips", "Workers skipped so far", labels=["source"])
        by_source: dict[str, int] = {}
        for why in self._skipped.values():
            for source in why:
                by_source[source] = by_source.get(source, 0) + 1
        for source in sorted(set(by_source) | set(self.skips_total)):
            now.add_metric([source], by_source.get(source, 0))
            total.add_metric([source], self.skips_total.get(source, 0))
        yield from (now, total)

    def _notify(self) -> None:
        for fn in list(self._listeners):
            fn()
