"""The discovery bench's arithmetic: the stage breakdown of a change (--trace) and the before/after
summary of interleaved rounds (--baseline-src, --merge)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from dynamo_grpc.bench import discovery_compare as cmp
from dynamo_grpc.bench.discovery import stage_breakdown


def test_stage_breakdown_attributes_agent_lines_to_their_change() -> None:
    # two changes at t=10 and t=20; the agent answered two readers of each
    agent = [{"commit": 10.001, "woke": 10.010, "ready": 10.011}, {"commit": 10.001, "woke": 10.030, "ready": 10.031},
             {"commit": 20.002, "woke": 20.005, "ready": 20.006}, {"commit": 20.002, "woke": 20.007, "ready": 20.008},
             {"commit": 5.0, "woke": 5.1, "ready": 5.2}]  # fmt: skip  (before the first change: not counted)
    watcher = {"received": 10.040, "parsed": 10.041, "yielded": 10.050, "reported": 10.051, "bytes": 100}
    later = {k: (v + 10 if k != "bytes" else v) for k, v in watcher.items()}
    out = stage_breakdown([(10.0, [watcher, None]), (20.0, [later])], agent)
    after = out["after_change_ms"]
    assert after["commit"]["max"] == pytest.approx(2.0)
    assert after["woke"]["max"] == pytest.approx(30.0)  # the slowest reader of the first change
    assert after["reported"]["p50"] == pytest.approx(51.0)
    assert out["step_ms"]["merge"]["p50"] == pytest.approx(9.0)
    assert out["agent_answers_per_change"] == 2
    assert out["per_change_first_last_ms"][0]["woke"] == [10.0, 30.0]


def _side(p50: float, p99: float) -> dict[str, Any]:
    return {"loadavg_start": 1.0, "loadavg_end": 2.0,
            "phases": {"sharded": {"p50_ms": p50, "p99_ms": p99, "latencies_ms": [p50, p99]}}}


def test_interleaved_rounds_flip_the_order_and_summarize_medians(tmp_path: Path) -> None:
    order: list[str] = []
    results = iter([_side(100, 400), _side(50, 120), _side(40, 100), _side(110, 500), _side(90, 300), _side(45, 90)])

    async def run_side(side: str) -> dict[str, Any]:
        order.append(side)
        return next(results)

    doc = cmp.finish(asyncio.run(cmp.interleaved(3, run_side)), {"instances": 1000, "watchers": 50})
    assert order == ["before", "after", "after", "before", "before", "after"]
    row = doc["summary"]["phases"]["sharded"]
    assert row["before_p99_ms"] == [400, 500, 300] and row["after_p99_ms"] == [120, 100, 90]
    assert row["before_p99_ms_median"] == 400 and row["after_p99_ms_median"] == 100
    assert row["p99_ms_before_over_after"] == 4.0
    assert row["after_p99_under_250ms_rounds"] == 3
    assert "latencies_ms" not in doc["rounds"][0]["after"]["phases"]["sharded"]  # kept apart, per round
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(doc))
    b.write_text(json.dumps(doc))
    merged = cmp.merge([a, b], lambda p: json.loads(p.read_text()))
    assert merged["summary"]["rounds"] == 6
    assert [r["run"] for r in merged["rounds"]] == [0, 0, 0, 1, 1, 1] and len(merged["runs"]) == 2
    b.write_text(json.dumps({**doc, "instances": 10}))
    with pytest.raises(ValueError, match="instances"):
        cmp.merge([a, b], lambda p: json.loads(p.read_text()))
