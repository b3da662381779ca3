"""End to end: `bench replay --compare` against real meshes (consul-dev, router, mocker workers, frontend).

The trace is a small Mooncake-schema file written here: a few multi-turn conversations whose turns extend
the previous prompt, interleaved in a shuffled order, so prefix reuse is guaranteed and the run is short.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from dynamo_grpc.bench.replay_bound import infinite_cache_bound
from dynamo_grpc.bench.replay_trace import load_trace

ROOT = Path(__file__).resolve().parents[2]


def _conversation_trace(path: Path, conversations: int = 5, turns: int = 5) -> Path:
    rng = random.Random(7)
    next_id = 1
    rows = []
    for _c in range(conversations):
        ids = [0]  # every conversation shares one system-prompt block, as in the Mooncake trace
        for _ in range(3):
            ids.append(next_id)
            next_id += 1
        for _t in range(turns):
            ids.append(next_id)
            next_id += 1
            length = 512 * (len(ids) - 1) + rng.randint(100, 512)
            rows.append({"input_length": length, "output_length": 8, "hash_ids": list(ids)})
    order = [r for turn in range(turns) for r in rng.sample(rows[turn::turns], conversations)]
    with open(path, "w") as f:
        for i, r in enumerate(order):
            f.write(json.dumps({"timestamp": 250 * i, **r}) + "\n")
    return path


@pytest.mark.slow
def test_replay_compare_three_routers(tmp_path: Path) -> None:
    trace = _conversation_trace(tmp_path / "conv.jsonl")
    bound = infinite_cache_bound(load_trace(trace)).engine_token_weighted
    out, png = tmp_path / "replay.json", tmp_path / "replay.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "gen")])}
    cmd = [
        sys.executable,
        "-m",
        "dynamo_grpc.bench.replay",
        "--trace",
        str(trace),
        "--compare",
        "--workers",
        "3",
        "--speedup",
        "20",
        "--json",
        str(out),
        "--plot",
        str(png),
        "--log-dir",
        str(tmp_path / "logs"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert report["trace"]["requests"] == 25
    assert report["trace"]["infinite_cache_bound"]["engine_token_weighted"] == pytest.approx(bound)
    runs = report["runs"]
    assert set(runs) == {"kv", "round-robin", "random"}
    for name, run in runs.items():
        assert run["completed"] == 25, (name, run["errors"])
        for metric in ("ttft_s", "itl_s", "e2e_s"):
            assert {"p50", "p90", "p99"} <= set(run[metric])
            assert run[metric]["p50"] > 0
        assert run["throughput"]["requests_per_s"] > 0
        assert run["prefix_cache"]["infinite_cache_bound"] == pytest.approx(bound)
        assert run["prefix_cache"]["requests_reporting"] == 25
        assert len(run["workers"]) == 3
        assert "requests_cv" in run["load_balance"]
        assert len(run["per_request"]["ttft_s"]) == 25
    kv_hit = runs["kv"]["prefix_cache"]["hit_rate"]
    rr_hit = runs["round-robin"]["prefix_cache"]["hit_rate"]
    assert kv_hit > rr_hit
    assert kv_hit <= bound + 1e-9
