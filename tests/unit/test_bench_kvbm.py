"""The kvbm benchmark's synthetic multi-turn trace: each turn extends the previous one, sizes follow from it."""

from __future__ import annotations

import itertools
from collections import defaultdict
from pathlib import Path

from dynamo_grpc.bench.kvbm import HASH_BLOCK, conversations, unique_engine_blocks


def test_each_turn_extends_its_conversation_and_arrivals_are_ordered() -> None:
    trace = conversations(n_conv=5, turns=4, first_blocks=2, add_blocks=3, rate=2.0, seed=3)
    reqs = trace.requests
    assert len(reqs) == 20 and reqs[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(reqs))
    by_first: dict[int, list[tuple[int, ...]]] = defaultdict(list)
    for r in reqs:
        assert r.hash_ids is not None and r.input_length == len(r.hash_ids) * HASH_BLOCK
        by_first[r.hash_ids[0]].append(r.hash_ids)
    assert len(by_first) == 5
    for turns in by_first.values():
        turns.sort(key=len)
        assert [len(t) for t in turns] == [2, 5, 8, 11]
        for prev, nxt in itertools.pairwise(turns):
            assert nxt[: len(prev)] == prev  # the next turn shares the whole previous prompt
    assert unique_engine_blocks(trace) == 5 * 11 * (HASH_BLOCK // 64)


def test_the_mesh_router_runs_with_the_flags_given() -> None:
    from dynamo_grpc.bench.kvbm import _parser, router_args
    from dynamo_grpc.router.config import RouterConfig

    # the router's own busy threshold and age cap, with the cache-aware queue (docs/kvbm.md, "Benchmark")
    assert router_args(_parser().parse_args([])) == [
        "--router-prefill-load-scale", "2", "--router-busy-threshold", str(RouterConfig.busy_threshold),
        "--router-queue-policy", "cache-aware", "--router-queue-age-cap-secs", str(RouterConfig.queue_age_cap_s),
    ]  # fmt: skip
    fcfs = router_args(_parser().parse_args(["--router-busy-threshold", "1", "--router-queue-policy", "fcfs"]))
    assert fcfs == [
        "--router-prefill-load-scale",
        "2",
        "--router-busy-threshold",
        "1.0",
        "--router-queue-policy",
        "fcfs",
    ]


def test_a_round_merged_into_a_run_of_other_router_flags_is_refused(tmp_path: Path) -> None:
    import json

    import pytest

    from dynamo_grpc.bench.kvbm import main

    path = tmp_path / "kvbm.json"
    path.write_text(json.dumps({"benchmark": "kvbm", "mocker": {"router_args": ["--router-busy-threshold", "1.0"]}}))
    with pytest.raises(SystemExit, match="other router_args"):
        main(["--only-round", "2", "--json", str(path), "--skip-torch", "--conversations", "4", "--turns", "2"])
    with pytest.raises(SystemExit, match=r"--only-round must be in 0\.\.3"):
        main(["--only-round", "4", "--json", str(path)])


def test_g2_recovers_prefix_hits_and_its_bound_is_no_worse(tmp_path: Path) -> None:
    """On the virtual clock: G1 alone loses repeated prefixes that G2 brings back; the bound holds at least as many."""
    from dynamo_grpc.bench.kvbm import simulate_core

    share = conversations(n_conv=6, turns=4, first_blocks=2, add_blocks=2, rate=1.5, seed=5)
    ws = unique_engine_blocks(share)
    sizes = {"g1_blocks": -(-ws // 4), "g2_blocks": -(-(ws - ws // 4) * 5 // 4), "g3_blocks": ws * 2}
    g1 = simulate_core(share, "g1", sizes, tmp_path)
    g2 = simulate_core(share, "g1+g2", sizes, tmp_path)
    bound = simulate_core(share, "g1+g2", dict(sizes, g2_blocks=ws * 4), tmp_path, host_gbps=1e9)
    assert g1["requests"] == g2["requests"] == bound["requests"] == len(share.requests)
    assert g1["hit_rate"]["host"] == 0.0 and g2["hit_rate"]["host"] > 0.0
    assert g2["hit_rate"]["total"] > g1["hit_rate"]["total"]
    assert bound["hit_rate"]["total"] >= g2["hit_rate"]["total"]
    assert bound["ttft_s"]["p50"] <= g2["ttft_s"]["p50"] <= g1["ttft_s"]["p50"]


def test_the_routed_virtual_clock_serves_every_request_and_repeats_exactly(tmp_path: Path) -> None:
    """N cores behind the real router on one clock: every request gets its first token, G2 adds host hits,
    and the answer does not depend on the machine (two runs agree to the last digit)."""
    from dynamo_grpc.bench.kvbm_sim import simulate_routed

    trace = conversations(n_conv=8, turns=4, first_blocks=2, add_blocks=2, rate=4.0, seed=3)
    ws = unique_engine_blocks(trace)
    sizes = {"g1_blocks": -(-ws // 4 // 2), "g2_blocks": -(-ws // 2), "g3_blocks": ws}
    flags = {"prefill_load_scale": 2.0, "queue_policy": "cache-aware"}
    g1 = simulate_routed(trace, "g1", sizes, tmp_path, 2, flags)
    g2 = simulate_routed(trace, "g1+g2", sizes, tmp_path, 2, flags)
    assert g1["requests"] == g2["requests"] == len(trace.requests)
    assert g1["hit_rate"]["host"] == 0.0 and g2["hit_rate"]["host"] > 0.0
    assert simulate_routed(trace, "g1+g2", sizes, tmp_path, 2, flags) == g2


def test_the_mesh_workers_and_the_simulated_cores_get_the_same_schedule_policy() -> None:
    from dynamo_grpc.bench.kvbm import _parser, engine_args, engine_fields

    assert engine_args(_parser().parse_args([])) == ["--schedule-policy", "fcfs"]
    args = _parser().parse_args(["--schedule-policy", "lpm", "--schedule-age-cap-secs", "12"])
    assert engine_args(args) == ["--schedule-policy", "lpm", "--schedule-age-cap-secs", "12.0"]
    assert engine_fields(args) == {"schedule_policy": "lpm", "schedule_age_cap_s": 12.0}
