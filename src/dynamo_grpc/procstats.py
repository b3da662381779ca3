"""Process gauges that show whether a role is back to idle: asyncio tasks, open fds, RSS.

A soak run (bench/soak.py) reads them from each role's /metrics before and after: a leaked stream or
task shows up as a count that does not come back. Each role registers the collector once, with the
event loop it serves on (``register(registry, loop)``); the gauges are computed at scrape time.
``register_view`` exports the process's WorkerView (workers skipped, by source) the same way.
"""

from __future__ import annotations

import asyncio
import os
import resource
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from dynamo_grpc.discovery.usable import WorkerView

TASKS = "dynamo_process_asyncio_tasks"
FDS = "dynamo_process_open_fds"
RSS = "dynamo_process_resident_memory_bytes"


def open_fds() -> int:
    """File descriptors open in this process (Linux /proc; elsewhere /dev/fd)."""
    for path in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(path)) - 1  # the listing's own descriptor
        except OSError:
            continue
    return -1


def rss_bytes() -> int:
    """Resident set size now (Linux /proc/self/statm), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ProcessStats:
    """Prometheus collector of the three gauges; ``loop`` is the role's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def tasks(self) -> int:
        # all_tasks reads a WeakSet; it is safe from a scrape thread (it retries a concurrent change)
        return sum(1 for t in asyncio.all_tasks(self.loop) if not t.done())

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(TASKS, "asyncio tasks not done on the serving loop", value=self.tasks())
        yield GaugeMetricFamily(FDS, "Open file descriptors", value=open_fds())
        yield GaugeMetricFamily(RSS, "Resident set size in bytes", value=rss_bytes())


class _ViewCollector:
    """The role's current WorkerView (a role served again in one process moves it to its new view)."""

    def __init__(self, view: WorkerView) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        yield from self.view.collect()


#: (registry id, kind) -> the collector registered there, so a role served twice in one process
#: re-points it instead of registering a duplicate (prometheus_client refuses those)
_registered: dict[tuple[int, str], Any] = {}


def _register_once(registry: CollectorRegistry | None, kind: str, attr: str, value: Any, make: Any) -> None:
    reg = registry or REGISTRY
    known = _registered.get((id(reg), kind))
    if known is not None:
        setattr(known, attr, value)
        return
    _registered[(id(reg), kind)] = collector = make(value)
    reg.register(collector)


def register_view(view: WorkerView, registry: CollectorRegistry | None = None) -> None:
    """Export the process's worker view (skipped workers by source) on ``registry``."""
    _register_once(registry, "view", "view", view, _ViewCollector)


def register(registry: CollectorRegistry | None = None, loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Add the gauges to ``registry`` (default: prometheus_client's) for ``loop`` (default: the running one)."""
    _register_once(registry, "process", "loop", loop or asyncio.get_running_loop(), ProcessStats)
