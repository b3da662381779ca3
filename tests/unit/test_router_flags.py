"""The router's flags are defined once: `dynamo-grpc router` and `dynamo-grpc frontend` parse them alike."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dynamo_grpc.frontend.main import build_parser as frontend_parser
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.flags import router_config_from_args
from dynamo_grpc.router.main import build_parser as router_parser

NEW = [
    "--router-temperature=0.5",
    "--router-prefill-load-scale=2",
    "--router-busy-threshold=0.9",
    "--router-block-size=32",
    "--router-max-tree-size=1000",
    "--router-ttl-secs=30",
    "--router-resync-interval=0",
    "--router-seed=3",
    "--no-router-kv-events",
]
OLD = [
    "--temperature=0.5",
    "--prefill-load-scale=2",
    "--busy-threshold=0.9",
    "--block-size=32",
    "--max-indexed-blocks=1000",
    "--approx-ttl=30",
    "--resync-interval=0",
    "--seed=3",
    "--mode=approx",
]
EXPECTED = RouterConfig(
    mode="approx",
    block_size=32,
    max_indexed_blocks=1000,
    temperature=0.5,
    prefill_load_scale=2.0,
    busy_threshold=0.9,
    approx_ttl_s=30.0,
    resync_interval_s=0.0,
    seed=3,
)


@pytest.mark.parametrize("parser", [router_parser, frontend_parser], ids=["router", "frontend"])
def test_both_roles_take_the_same_router_flags(parser) -> None:  # type: ignore[no-untyped-def]
    cfg = router_config_from_args(parser().parse_args(NEW))
    assert cfg == EXPECTED
    assert router_config_from_args(parser().parse_args([])) == RouterConfig()


def test_deprecated_spellings_still_work_and_warn(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = router_config_from_args(router_parser().parse_args(OLD))
    assert cfg == EXPECTED
    err = capsys.readouterr().err
    assert "--temperature is deprecated, use --router-temperature" in err
    assert "--mode is deprecated, use --router-mode kv --no-router-kv-events" in err
    router_parser().parse_args(NEW)
    assert "deprecated" not in capsys.readouterr().err


def test_env_variables_set_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_ROUTER_TEMPERATURE", "0.25")
    monkeypatch.setenv("DYN_ROUTER_USE_KV_EVENTS", "false")
    monkeypatch.setenv("DYN_ROUTER_MODE", "kv")
    cfg = router_config_from_args(frontend_parser().parse_args([]))
    assert (cfg.temperature, cfg.mode) == (0.25, "approx")
    # the flag beats the variable
    assert router_config_from_args(frontend_parser().parse_args(["--router-temperature", "0"])).temperature == 0


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--router-busy-threshold", "1.5"], "--router-busy-threshold must be in (0, 1], got 1.5"),
        (["--router-temperature", "-1"], "--router-temperature must be >= 0"),
        (["--no-router-kv-events", "--router-ttl-secs", "0"], "--router-ttl-secs must be > 0"),
    ],
)
@pytest.mark.parametrize("role", ["router", "frontend"])
def test_out_of_range_flag_exits_naming_it(role: str, argv: list[str], named: str) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "dynamo_grpc.cli", role, *argv], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2, res.stderr
    assert named in res.stderr and "Traceback" not in res.stderr


def test_frontend_only_mode_is_refused_by_the_router() -> None:
    with pytest.raises(SystemExit):
        router_parser().parse_args(["--router-mode", "kv-service"])
    assert frontend_parser().parse_args(["--router-mode", "kv-service"]).router_mode == "kv-service"


@pytest.mark.parametrize(
    ("parser", "argv", "named"),
    [
        (router_parser, ["--router-mode", "round-robin", "--router-temperature", "0.5"], "--router-temperature"),
        (router_parser, ["--mode", "random", "--prefill-load-scale", "3"], "--router-prefill-load-scale"),
        (router_parser, ["--router-ttl-secs", "30"], "--router-ttl-secs: no effect with --router-mode kv"),
        (
            frontend_parser,
            ["--no-router-kv-events", "--router-resync-interval", "1"],
            "--router-resync-interval: no effect with --router-mode kv --no-router-kv-events",
        ),
        (frontend_parser, ["--router-mode", "kv-service", "--router-seed", "3"], "--router-seed"),
    ],
)
def test_a_flag_the_mode_would_ignore_is_refused(parser, argv: list[str], named: str) -> None:  # type: ignore[no-untyped-def]
    from dynamo_grpc.router.flags import refuse_unused_flags

    p = parser()
    with pytest.raises(ValueError, match="no effect") as e:
        refuse_unused_flags(p, p.parse_args(argv))
    assert named in str(e.value)


def test_flags_the_mode_uses_and_env_defaults_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    from dynamo_grpc.router.flags import refuse_unused_flags

    monkeypatch.setenv("DYN_ROUTER_TEMPERATURE", "0.5")  # a deployment-wide default is not a user's flag
    p = router_parser()
    for argv in (
        ["--router-mode", "random", "--router-seed", "1", "--router-busy-threshold", "0.9"],
        ["--no-router-kv-events", "--router-ttl-secs", "30", "--router-temperature", "0.2"],
        ["--router-resync-interval", "1", "--router-max-tree-size", "10"],
    ):
        refuse_unused_flags(p, p.parse_args(argv))


def test_bad_mode_variable_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_ROUTER_MODE", "fastest")
    with pytest.raises(SystemExit, match="DYN_ROUTER_MODE='fastest': expected one of kv, round-robin, random"):
        router_parser()
    monkeypatch.setenv("DYN_ROUTER_USE_KV_EVENTS", "maybe")
    monkeypatch.setenv("DYN_ROUTER_MODE", "kv")
    with pytest.raises(SystemExit, match="DYN_ROUTER_USE_KV_EVENTS='maybe': expected true or false"):
        frontend_parser()
