"""One log-level variable, DYN_LOG, for every process (logs.py)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from dynamo_grpc.logs import parse_log_spec


def _consul_dev_stderr(env_log: str | None, *args: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "DYN_LOG"}
    if env_log is not None:
        env["DYN_LOG"] = env_log
    p = subprocess.Popen(
        [sys.executable, "-m", "dynamo_grpc.cli", "consul-dev", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert p.stdout is not None
    if "listening" in p.stdout.readline():
        time.sleep(0.5)  # the log line and the signal handlers follow the printed address
        p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    return p.returncode, err


def test_dyn_log_debug_turns_on_debug_lines_and_default_is_info() -> None:
    _, err = _consul_dev_stderr("debug")
    assert " DEBUG " in err and " INFO dynamo_grpc.consul_dev: consul-dev listening" in err
    _, err = _consul_dev_stderr(None)
    assert " DEBUG " not in err and "consul-dev listening" in err
    _, err = _consul_dev_stderr("warning")
    assert "consul-dev listening" not in err
    # the flag beats the variable
    _, err = _consul_dev_stderr("warning", "--log-level", "info")
    assert "consul-dev listening" in err


def test_per_logger_levels_and_bad_values() -> None:
    assert parse_log_spec("info,dynamo_grpc.router=debug") == (logging.INFO, {"dynamo_grpc.router": logging.DEBUG})
    assert parse_log_spec("WARNING") == (logging.WARNING, {})
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        parse_log_spec("info,x=loud")
    rc, err = _consul_dev_stderr("verbose")
    assert rc != 0 and "DYN_LOG" in err and "unknown log level 'verbose'" in err and "Traceback" not in err
