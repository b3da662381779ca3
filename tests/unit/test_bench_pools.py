"""`bench pools`: the work-balanced split, the --split layout specs, and the pools.yaml each layout runs with
(parsed by the global router's own config loader, so a spec can never ask for an option the router lacks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_grpc.bench.pools import parse_split, pools_yaml, summarize_rounds
from dynamo_grpc.bench.pools_split import (
    cross_pool_prefix_tokens,
    prefill_work_ms,
    uncached_tokens,
    work_balanced_split,
)
from dynamo_grpc.bench.replay_trace import Trace, TraceRequest
from dynamo_grpc.engines.mocker.timing import prefill_ms
from dynamo_grpc.router.pool_config import parse_pool_config


def trace(rows: list[tuple[int, tuple[int, ...]]]) -> Trace:
    reqs = tuple(TraceRequest(i, float(i), n, 8, h) for i, (n, h) in enumerate(rows))
    return Trace("t.jsonl", "mooncake", reqs, 512)


def test_a_cached_prefix_is_not_prefill_work() -> None:
    t = trace([(1024, (1, 2)), (1536, (1, 2, 3)), (1024, (7, 8))])
    assert uncached_tokens(t) == [1024, 512, 1024]  # the second turn re-uses the first one's two blocks
    assert prefill_work_ms(20000) == pytest.approx(2 * prefill_ms(8192) + prefill_ms(20000 - 2 * 8192))


def test_the_auto_split_gives_each_pool_half_the_work_not_half_the_requests() -> None:
    # nine 1k prompts and one 40k prompt: half the requests are short at 1,024 tokens, but the work is in the 40k one
    rows = [(1000 + i, (i,)) for i in range(9)] + [(40000, tuple(range(100, 179)))]
    t = trace(rows)
    assert work_balanced_split(t) == 40000  # the nine short prompts together are still under half the work
    assert work_balanced_split(t, 0.05) == 1002  # two 1k prefills are ~5 % of it
    with pytest.raises(ValueError, match="short_share"):
        work_balanced_split(t, 1.0)
    with pytest.raises(ValueError, match="two different input lengths"):
        work_balanced_split(trace([(1000, (1,)), (1000, (2,))]))


def test_split_specs_become_the_pools_config_the_global_router_loads() -> None:
    import yaml

    t = trace([(1000, (1,)), (40000, tuple(range(100, 179)))])
    spec = parse_split("auto,spill=16384,accept=4096", t)
    assert spec.auto and spec.split == 40000
    assert spec.name == "split@40000(auto),spill=16384,accept=4096"
    grid = parse_pool_config(yaml.safe_load(pools_yaml(spec)))
    assert grid.pools["long"].busy_prefill_tokens == 16384 and grid.pools["short"].busy_prefill_tokens is None
    assert grid.pools["short"].accept_spill_prefill_tokens == 4096
    both = parse_pool_config(yaml.safe_load(pools_yaml(parse_split("8192,busy=49152"))))
    assert both.pools["short"].busy_prefill_tokens == both.pools["long"].busy_prefill_tokens == 49152
    assert list(parse_pool_config(yaml.safe_load(pools_yaml(None))).pools) == ["all"]
    assert parse_split("auto:0.05", t).split == 40000  # the only cut that leaves a request on each side
    for bad, msg in [
        ("fast", "positive token count or 'auto'"),
        ("8192,spil=1", "unknown option 'spil'"),
        ("8192,accept=0", "accept must be a positive token count"),
        ("auto:1.5", "SHARE in \\(0, 1\\)"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_split(bad, t)


def test_the_summary_compares_each_split_with_one_pool_at_the_same_cut() -> None:
    def cls(sp99: float, lp50: float) -> dict[str, dict[str, float]]:
        return {"short": {"p99": sp99, "p50": 0.0}, "long": {"p50": lp50, "p99": 0.0}}

    spec = parse_split("100")
    rounds = [
        {"one-pool": {"by_split": {"100": cls(3.0, 2.0)}}, spec.name: {"by_split": {"100": cls(1.5, 2.2)}}},
        {"one-pool": {"by_split": {"100": cls(4.0, 2.0)}}, spec.name: {"by_split": {"100": cls(4.0, 3.0)}}},
        {"one-pool": {"by_split": {"100": cls(6.0, 2.0)}}, spec.name: {"by_split": {"100": cls(2.0, 2.0)}}},
    ]
    s = summarize_rounds(rounds, [spec])[spec.name]
    assert s["short_p99_one_over_split"]["per_round"] == [2.0, 1.0, 3.0]
    assert s["short_p99_one_over_split"]["median"] == 2.0 and s["target_short_p99_gain_1_5x"]
    assert s["long_p50_split_over_one"]["median"] == pytest.approx(1.1) and s["target_long_p50_cost_le_20pct"]


def test_a_conversation_that_crosses_the_split_recomputes_its_history() -> None:
    # turn 1 (1,024 tokens) is short; turn 2 re-uses its two blocks but is long at a 1,500 cut, not at 2,000
    t = trace([(1024, (1, 2)), (1536, (1, 2, 3)), (600, (9, 10))])
    assert cross_pool_prefix_tokens(t, 1500) == 1024
    assert cross_pool_prefix_tokens(t, 2000) == 0


def test_a_hold_spec_sets_the_long_pools_hold_and_needs_its_backlog() -> None:
    import yaml

    spec = parse_split("8192,spill=8192,accept=4096,hold=4")
    assert spec.hold == 4.0 and spec.name == "split@8192,spill=8192,accept=4096,hold=4"
    grid = parse_pool_config(yaml.safe_load(pools_yaml(spec)))
    assert grid.pools["long"].hold_spill_s == 4.0 and grid.pools["long"].busy_prefill_tokens == 8192
    assert grid.pools["short"].hold_spill_s is None
    for bad, msg in [("8192,hold=4", "hold needs spill"), ("8192,spill=1,hold=0", "hold must be seconds")]:
        with pytest.raises(ValueError, match=msg):
            parse_split(bad)


def test_resume_adds_rounds_only_to_a_report_of_the_same_layouts_and_settings(tmp_path: Path) -> None:
    import argparse
    import json

    from dynamo_grpc.bench.pools import RESUME_SAME, resumed_rounds

    settings = {k: 1 for k in RESUME_SAME}
    report = tmp_path / "pools.json"
    report.write_text(
        json.dumps({"layouts": {"split@100": {}}, "config": settings, "rounds": [{"r": 1}], "wall_total_s": 7.5})
    )
    args = argparse.Namespace(json=report, **settings)
    assert resumed_rounds(args, ["split@100"]) == ([{"r": 1}], 7.5)
    with pytest.raises(ValueError, match="ran layouts"):
        resumed_rounds(args, ["split@200"])
    with pytest.raises(ValueError, match="ran --speedup 1"):
        resumed_rounds(argparse.Namespace(json=report, **{**settings, "speedup": 5}), ["split@100"])
    with pytest.raises(ValueError, match="cannot read the report"):
        resumed_rounds(argparse.Namespace(json=tmp_path / "none.json", **settings), ["split@100"])
