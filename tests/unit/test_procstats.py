"""The process gauges a soak compares before and after: they move with what the process holds."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from dynamo_grpc import procstats
from dynamo_grpc.discovery.usable import WorkerView


def _values(reg: CollectorRegistry) -> dict[str, float]:
    return {s.name: s.value for m in reg.collect() for s in m.samples if not s.labels}


async def test_tasks_fds_and_rss_follow_the_process() -> None:
    reg = CollectorRegistry()
    procstats.register(reg)
    procstats.register(reg)  # a role served twice in one process: no duplicate-timeseries error
    before = _values(reg)
    hold = asyncio.Event()
    tasks = [asyncio.create_task(hold.wait()) for _ in range(5)]
    with open(__file__) as _f1, open(__file__) as _f2:
        during = _values(reg)
    hold.set()
    await asyncio.gather(*tasks)
    after = _values(reg)
    assert during[procstats.TASKS] == before[procstats.TASKS] + 5
    assert during[procstats.FDS] == before[procstats.FDS] + 2
    assert after[procstats.TASKS] == before[procstats.TASKS] and after[procstats.FDS] == before[procstats.FDS]
    assert before[procstats.RSS] > 10 * 1024 * 1024


def test_the_view_is_exported_by_source() -> None:
    reg = CollectorRegistry()
    view = WorkerView()
    procstats.register_view(view, reg)
    view.skip("w1", "registration", "dp_size: 2000000 is outside 1..1024")
    view.skip("w2", "events", "no Replay")
    view.clear("w2", "events")
    samples = {(s.name, s.labels.get("source")): s.value for m in reg.collect() for s in m.samples}
    assert samples[("dynamo_discovery_skipped_workers", "registration")] == 1
    assert samples[("dynamo_discovery_skipped_workers", "events")] == 0
    assert samples[("dynamo_discovery_worker_skips_total", "events")] == 1
