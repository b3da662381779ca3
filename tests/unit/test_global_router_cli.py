"""The global router's and the workers' pool flags: what a user typing them sees when they are wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_grpc.discovery.pools import DEFAULT_POOL, pool_of
from dynamo_grpc.launch.run_local import pool_assignment
from dynamo_grpc.router import global_main
from dynamo_grpc.worker.main import build_parser as worker_parser

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pools.yaml"


def usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as e:
        global_main.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_config_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--config (or DYN_CONFIG) is required" in usage_error([], capsys)


def test_invalid_config_stops_start_up_naming_the_file_and_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "pools.yaml"
    bad.write_text("pools:\n  - name: a\n    input_tokens: [100, null]\ndefault_pool: a\n")
    err = usage_error(["--config", str(bad)], capsys)
    assert f"{bad}: input_tokens: no pool covers [0,100)" in err


def test_busy_threshold_flag_is_refused_in_favour_of_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(["--config", str(EXAMPLE), "--router-busy-threshold", "0.5"], capsys)
    assert "--router-busy-threshold: set busy_threshold in the pools config" in err


def test_worker_pool_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_parser().parse_args([]).pool == DEFAULT_POOL
    assert worker_parser().parse_args(["--pool", "long-ctx.v2"]).pool == "long-ctx.v2"
    with pytest.raises(SystemExit):
        worker_parser().parse_args(["--pool", "no spaces"])
    assert "pool name 'no spaces' must be" in capsys.readouterr().err
    assert pool_of(["namespace=dynamo", "pool=long"]) == "long"
    assert pool_of(["namespace=dynamo"]) == DEFAULT_POOL  # an older worker without the tag


def test_run_local_spreads_workers_over_the_pools() -> None:
    assert pool_assignment(EXAMPLE, 2, "kv") == ["short", "long"]
    assert pool_assignment(EXAMPLE, 5, "kv-service") == ["short", "long", "short", "long", "short"]
    with pytest.raises(ValueError, match="2 pools need --workers 2 or more, not 1"):
        pool_assignment(EXAMPLE, 1, "kv")
    with pytest.raises(ValueError, match="--router-mode round-robin cannot go with it"):
        pool_assignment(EXAMPLE, 2, "round-robin")
