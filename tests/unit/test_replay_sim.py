"""The simulated-time replay: the real router over engines stepped by the mocker's timing model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynamo_grpc.bench.replay_sim import _config, main, simulate, summarize_sim
from dynamo_grpc.bench.replay_trace import Trace, TraceRequest
from dynamo_grpc.engines.mocker.timing import decode_ms, prefill_ms


def _trace(rows: list[tuple[float, int, int]], hash_ids: list[tuple[int, ...] | None] | None = None) -> Trace:
    reqs = tuple(
        TraceRequest(i, t, inp, out, hash_ids[i] if hash_ids else None) for i, (t, inp, out) in enumerate(rows)
    )
    return Trace("t", "mooncake" if hash_ids else "azure", reqs, 512 if hash_ids else None)


def test_one_request_takes_the_mocker_step_times() -> None:
    (r,) = simulate(_trace([(0.0, 1000, 3)]), _config([]), workers=2)
    assert r.first_token == pytest.approx(prefill_ms(1000) / 1000)
    # two decode steps after the prefill, each at the KV fraction the request holds (16 of 16384 blocks)
    assert r.end - r.first_token == pytest.approx(2 * decode_ms(16 / 16384) / 1000)


def test_kv_routing_avoids_a_queued_prefill_that_round_robin_walks_into() -> None:
    # a 4k prompt, then a short one while it prefills, then one more: round-robin puts the third behind
    # the first's worker again (w0, w1, w0); the router sees w0 still prefilling... and w1 done
    rows = [(0.0, 4000, 200), (0.01, 100, 200), (0.05, 1000, 200)]
    rr = simulate(_trace(rows), _config(["--router-mode", "round-robin"]), workers=2)
    kv = simulate(_trace(rows), _config([]), workers=2)
    assert [r.worker for r in rr] == [0, 1, 0] and rr[2].avoidable
    assert kv[2].worker != kv[0].worker and not kv[2].avoidable
    assert kv[2].first_token - kv[2].arrival < rr[2].first_token - rr[2].arrival


def test_shared_prefixes_are_cached_and_followed() -> None:
    # three requests with the same two 512-token hash blocks, spaced out: KV sends the later ones to the
    # worker that cached them, and they prefill only the uncached tail
    rows = [(0.0, 1100, 2), (5.0, 1100, 2), (10.0, 1100, 2)]
    ids: list[tuple[int, ...] | None] = [(1, 2, 3), (1, 2, 4), (1, 2, 5)]
    reqs = simulate(_trace(rows, ids), _config([]), workers=4)
    assert reqs[1].worker == reqs[0].worker == reqs[2].worker
    assert [r.cached for r in reqs] == [0, 1024, 1024]
    s = summarize_sim(reqs, 4)
    assert s["hit_rate"] == pytest.approx(2048 / 3300)


def test_the_report_compares_variants_with_round_robin(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [f"2023-11-16 18:15:{i // 10:02d}.{(i % 10) * 100000:06d},{500 + 37 * i % 3000},20" for i in range(60)]
    trace.write_text("\n".join(rows) + "\n")
    out = tmp_path / "sim.json"
    assert main(["--trace", str(trace), "--variant", "kv-prev=--router-prefill-load-scale=2", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert set(rep["runs"]) == {"round-robin", "kv", "kv-prev"}
    assert rep["runs"]["round-robin"]["round_robin_over_this"] == {"p50": 1.0, "p99": 1.0}
    assert rep["runs"]["kv-prev"]["flags"] == ["--router-prefill-load-scale=2"]
    assert rep["runs"]["kv"]["requests"] == 60


def test_windows_give_the_spread_of_the_ratios(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [f"{i * 0.05:.2f},{300 + 53 * i % 2000},10" for i in range(40)]
    trace.write_text("\n".join(rows) + "\n")
    out = tmp_path / "sim.json"
    argv = ["--trace", str(trace), "--limit", "20", "--windows", "2", "--json", str(out)]
    assert main(argv) == 0
    rep = json.loads(out.read_text())
    assert [w["offset"] for w in rep["windows"]] == [0, 20] and rep["windows"][1]["requests"] == 20
    rr = rep["spread"]["round-robin"]["round_robin_over_this_p50"]
    assert rr["windows"] == [1.0, 1.0] and rr["within_5_percent"] == 2
    assert len(rep["spread"]["kv"]["round_robin_over_this_p99"]["windows"]) == 2
    with pytest.raises(SystemExit, match="--windows needs --limit"):
        main(["--trace", str(trace), "--windows", "2", "--json", str(out)])
