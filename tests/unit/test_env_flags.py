"""Every option of every role reads its environment variable (envflags.env_defaults), checked option by option."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

import pytest

from dynamo_grpc.envflags import ENV_NAMES, env_defaults, env_name

#: role -> (module, parser factory, variable prefix)
PARSERS: dict[str, tuple[str, str, str]] = {
    "frontend": ("dynamo_grpc.frontend.main", "build_parser", "DYN_"),
    "worker": ("dynamo_grpc.worker.main", "build_parser", "DYN_"),
    "router": ("dynamo_grpc.router.main", "build_parser", "DYN_"),
    "consul-dev": ("dynamo_grpc.consul_dev.main", "build_parser", "CONSUL_DEV_"),
    "run-local": ("dynamo_grpc.launch.run_local", "build_parser", "DYN_"),
}


def factory(role: str) -> Callable[[], argparse.ArgumentParser]:
    module, name, _ = PARSERS[role]
    fn: Callable[[], argparse.ArgumentParser] = getattr(importlib.import_module(module), name)
    return fn


def options(role: str) -> list[argparse.Action]:
    parser = factory(role)()
    return [a for a in parser._actions if env_name(a, PARSERS[role][2]) and not isinstance(a, argparse._HelpAction)]


def cases() -> list[tuple[str, str]]:
    return [(role, a.option_strings[0]) for role in PARSERS for a in options(role)]


def _good(action: argparse.Action) -> tuple[str, object]:
    """A valid variable value for an option and what the parsed namespace should then hold."""
    if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+"):
        raw, one = _one(action)
        return f"{raw},{raw}", [one, one]  # a comma-separated list
    return _one(action)


def _one(action: argparse.Action) -> tuple[str, object]:
    if isinstance(action, argparse.BooleanOptionalAction):
        return "false", not action.default if isinstance(action.default, bool) else False
    if isinstance(action, argparse._StoreTrueAction):
        return "yes", True
    if isinstance(action, argparse._StoreFalseAction):
        return "1", False
    if action.choices is not None:
        choice = list(action.choices)[-1]
        return str(choice), choice
    if action.type is int:
        return "7", 7
    if action.type is float:
        return "0.25", 0.25
    if callable(action.type):
        return "somewhere", action.type("somewhere")
    return "somewhere", "somewhere"


def _bad(action: argparse.Action) -> str | None:
    """A value the option refuses, or None for free text."""
    if isinstance(action, argparse.BooleanOptionalAction | argparse._StoreTrueAction | argparse._StoreFalseAction):
        return "maybe"
    if action.choices is not None:
        return "no-such-choice"
    if action.type in (int, float):
        return "twelve"
    return None


def _find(role: str, flag: str) -> argparse.Action:
    return next(a for a in options(role) if a.option_strings[0] == flag)


def test_every_role_has_options() -> None:
    for role in PARSERS:
        assert len(options(role)) >= 5, role


@pytest.mark.parametrize(("role", "flag"), cases())
def test_option_reads_its_variable(
    role: str, flag: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    action = _find(role, flag)
    var = env_name(action, PARSERS[role][2])
    assert var is not None
    raw, expected = _good(action)
    monkeypatch.setenv(var, raw)
    parser = factory(role)()
    ns = parser.parse_args([])
    assert getattr(ns, action.dest) == expected, f"{var}={raw}"
    assert var in parser.format_help()  # --help says which variable
    bad = _bad(action)
    if bad is not None:
        monkeypatch.setenv(var, bad)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            factory(role)()
        assert exc.value.code not in (0, None)
        assert var in f"{exc.value.code} {capsys.readouterr().err}"  # the message names the variable


def test_bad_variable_is_named(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DYN_GRPC_PORT", "eighty")
    with pytest.raises(SystemExit):
        factory("frontend")()
    err = capsys.readouterr().err
    assert "DYN_GRPC_PORT='eighty'" in err and "--grpc-port" in err


def test_explicit_flag_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_GRPC_PORT", "9001")
    monkeypatch.setenv("DYN_ROUTER_MODE", "random")
    ns = factory("frontend")().parse_args(["--grpc-port", "9002"])
    assert ns.grpc_port == 9002 and ns.router_mode == "random"


def test_historic_names_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ENV_NAMES["--log-level"] == "DYN_LOG"
    monkeypatch.setenv("DYN_LOG", "debug")
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "http://10.0.0.1:8500")
    monkeypatch.setenv("DYN_TLS_RELOAD_S", "2.5")
    monkeypatch.setenv("DYN_ROUTER_USE_KV_EVENTS", "no")
    ns = factory("worker")().parse_args([])
    assert ns.log_level == "debug" and ns.consul == "http://10.0.0.1:8500" and ns.reload_interval_s == 2.5
    assert factory("router")().parse_args([]).router_kv_events is False
    monkeypatch.setenv("CONSUL_DEV_TIME_SCALE", "0.5")
    assert factory("consul-dev")().parse_args([]).time_scale == 0.5


def test_list_options_split_on_commas_and_check_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    p = argparse.ArgumentParser(prog="t")
    p.add_argument("--tag", action="append", choices=["a", "b"])
    p.add_argument("--ids", nargs="+", type=int)
    p.add_argument("--off", action="store_false", dest="on")
    env = {"DYN_TAG": "a, b", "DYN_IDS": "1,2,3", "DYN_OFF": "true"}
    ns = env_defaults(p, env=env).parse_args([])
    assert ns.tag == ["a", "b"] and ns.ids == [1, 2, 3] and ns.on is False
    # a repeatable flag given on the command line replaces the variable's values (argparse would append)
    again = argparse.ArgumentParser(prog="t1")
    again.add_argument("--tag", action="append", choices=["a", "b"])
    assert env_defaults(again, env=env).parse_args(["--tag", "b", "--tag", "b"]).tag == ["b", "b"]
    with pytest.raises(SystemExit):
        env_defaults(argparse.ArgumentParser(prog="t2"), env={}).parse_args(["--nope"])
    q = argparse.ArgumentParser(prog="t3")
    q.add_argument("--tag", action="append", choices=["a", "b"])
    with pytest.raises(SystemExit):
        env_defaults(q, env={"DYN_TAG": "a,c"})


def test_empty_variable_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_GRPC_PORT", "")
    assert factory("frontend")().parse_args([]).grpc_port == 8001
