"""`dynamo-grpc --help` lists the roles, and every role answers --help without starting anything."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dynamo_grpc.cli import ROLES


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dynamo_grpc.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_top_level_help_lists_every_role() -> None:
    res = _run("--help")
    assert res.returncode == 0
    for role in ROLES:
        assert role in res.stdout


@pytest.mark.parametrize("role", sorted(ROLES))
def test_role_help(role: str) -> None:
    res = _run(role, "--help")
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout.lower()


def test_base_roles_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from dynamo_grpc.cli import _entry\n"
        "for role in ('worker', 'frontend', 'router', 'consul-dev', 'run-local'):\n"
        "    _entry(role)\n"
        "assert 'torch' not in sys.modules, 'base roles must not import torch'\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_unknown_roles_and_missing_arguments_fail_clearly() -> None:
    res = _run("nope")
    assert res.returncode == 2 and "unknown role 'nope'" in res.stderr
    res = _run("global-router")  # a role now: without its required --config it says so
    assert res.returncode == 2 and "--config" in res.stderr
    res = _run("planner")  # a role now: without its required --profile it says so
    assert res.returncode == 2 and "--profile" in res.stderr


def test_missing_extra_is_named_not_a_traceback() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # as if the torch extra were not installed\n"
        "from dynamo_grpc.cli import main\n"
        "raise SystemExit(main(['bench', 'engine', '--help']))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "dynamo-grpc bench engine: needs the 'torch' package" in res.stderr and "Traceback" not in res.stderr
