"""The replay's metrics (percentiles, hit rate, load balance) and its plot."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dynamo_grpc.bench.replay_metrics import RequestRecord, coefficient_of_variation, percentiles, summarize
from dynamo_grpc.bench.replay_plot import plot_replay


def _rec(i: int, ttft: float, n: int, prompt: int, cached: int | None, worker: str | None) -> RequestRecord:
    r = RequestRecord(i, float(i), sent_s=float(i), expected_output_tokens=n)
    r.first_token_s = i + ttft
    r.output_tokens = n
    r.end_s = r.first_token_s + 0.01 * (n - 1)
    r.prompt_tokens, r.cached_tokens, r.worker_id = prompt, cached, worker
    return r


def test_percentiles_ignore_nan_and_scale() -> None:
    p = percentiles([1.0, 2.0, 3.0, math.nan], scale=10.0)
    assert p["p50"] == pytest.approx(20.0) and p["n"] == 3 and p["mean"] == pytest.approx(20.0)
    assert percentiles([])["p50"] is None


def test_cv() -> None:
    assert coefficient_of_variation([5, 5, 5]) == 0.0
    assert coefficient_of_variation([0, 10]) == pytest.approx(1.0)
    assert coefficient_of_variation([]) is None and coefficient_of_variation([0, 0]) is None


def test_summarize_hit_rate_balance_and_failures() -> None:
    recs = [
        _rec(0, 0.1, 11, 1000, 0, "a"),
        _rec(1, 0.2, 11, 1000, 500, "a"),
        _rec(2, 0.3, 1, 2000, 1000, "b"),
        RequestRecord(3, 3.0, error="RESOURCE_EXHAUSTED: too long"),
    ]
    s = summarize(recs, speedup=10.0, workers=["a", "b", "c"], bound=0.6)
    assert (s["requests"], s["completed"], s["failed"]) == (4, 3, 1)
    assert s["errors"] == {"RESOURCE_EXHAUSTED": 1}
    assert s["ttft_s"]["p50"] == pytest.approx(2.0)  # 0.2 wall s x speedup 10
    assert s["itl_s"]["n"] == 2 and s["itl_s"]["p50"] == pytest.approx(0.1)
    pc = s["prefix_cache"]
    assert pc["hit_rate"] == pytest.approx(1500 / 4000) and pc["gap_points"] == pytest.approx(22.5)
    lb = s["load_balance"]
    assert lb["requests_per_worker"] == {"a": 2, "b": 1, "c": 0}  # the idle worker counts
    assert lb["prefill_tokens_per_worker"] == {"a": 1500, "b": 1000, "c": 0}
    assert lb["requests_cv"] == pytest.approx(coefficient_of_variation([2, 1, 0]))
    assert s["throughput"]["requests_per_s"] > 0


def test_summarize_without_cache_facts() -> None:
    s = summarize([_rec(0, 0.1, 2, 10, None, None)], 1.0, [], None)
    assert s["prefix_cache"]["hit_rate"] is None and s["load_balance"]["requests_cv"] is None


def test_plot_writes_png(tmp_path: Path) -> None:
    recs = {
        "kv": [_rec(i, 0.1 + i / 100, 3, 100, 50, "a") for i in range(20)],
        "round-robin": [_rec(i, 0.5 + i / 50, 3, 100, 10, "b") for i in range(20)],
    }
    sums = {k: summarize(v, 1.0, ["a", "b"], 0.5) for k, v in recs.items()}
    out = plot_replay({k: [r.ttft for r in v] for k, v in recs.items()}, sums, tmp_path / "p.png", "t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_markdown_table_row_per_router() -> None:
    from dynamo_grpc.bench.replay_metrics import markdown_table

    s = summarize([_rec(0, 0.1, 11, 1000, 250, "a")], 10.0, ["a"], 0.5)
    table = markdown_table({"kv": s, "random": s})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| kv | 1.00 / 1.00 / 1.00 |")
    assert "25.0 %" in lines[2] and "50.0 %" in lines[2] and "1/1" in lines[2]
