"""`dynamo-grpc planner` as a user runs it: flags refused with a message naming them, and a dry run (virtual
connector) that reads a frontend's real metric set and writes its decisions."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from dynamo_grpc.frontend.metrics import FrontendMetrics
from dynamo_grpc.planner.main import build_parser, config_from_args
from dynamo_grpc.planner.scaling import AGG, DECODE, PREFILL, Bounds
from tests.unit.test_planner_observe import finish, serve
from tests.unit.test_planner_scaling import profile


def config(*argv: str):  # type: ignore[no-untyped-def]
    parser = build_parser()
    return config_from_args(parser.parse_args(["--profile", "p.json", *argv]), parser)


def test_pools_bounds_and_defaults() -> None:
    cfg = config("--mode", "disagg", "--bounds", "prefill=2:3", "--max-replicas", "6")
    assert cfg.pools == [PREFILL, DECODE]
    assert cfg.bounds == {PREFILL: Bounds(2, 3), DECODE: Bounds(1, 6)}
    assert (cfg.interval_s, cfg.targets.ttft_s, cfg.targets.itl_s) == (180.0, 0.5, 0.05)
    assert config().pools == [AGG]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bounds", "prefill=1:2"], "unknown pool 'prefill'"),
        (["--bounds", "worker=x:2"], "--bounds worker=x:2"),
        (["--min-replicas", "3", "--max-replicas", "2"], "min (3) <= max (2)"),
        (["--mode", "disagg", "--min-replicas", "2", "--max-total-replicas", "3"], "--max-total-replicas 3"),
        (["--adjustment-interval", "0"], "interval must be positive"),
    ],
)
def test_bad_flags_are_refused_by_name(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        config(*argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_dry_run_reads_a_frontend_and_writes_decisions(tmp_path: Path) -> None:
    prof = profile().save(tmp_path / "profile.json")
    decisions = tmp_path / "decisions.jsonl"
    fm = FrontendMetrics()
    with serve(lambda _: (200, generate_latest(fm.registry))) as host:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dynamo_grpc.cli", "planner", "--profile", str(prof), "--connector", "virtual",
             "--frontend-metrics", host, "--adjustment-interval", "1", "--decisions", str(decisions),
             "--metrics-port", "-1"],
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while (
                time.monotonic() < deadline
                and len(decisions.read_text().splitlines() if decisions.exists() else []) < 2
            ):
                for _ in range(5):  # traffic all along: every interval sees requests
                    finish(fm, 0.2, 0.03, 950, 100)
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in decisions.read_text().splitlines()]
    assert lines, err
    d = lines[-1]  # the first decision may straddle the start; the second saw a whole interval of traffic
    assert d["observed"]["requests"] > 0 and d["observed"]["isl"] == pytest.approx(950)
    assert d["target"][AGG] >= 1 and set(d) >= {"predicted", "corrections", "needs", "current"}
