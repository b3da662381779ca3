"""Worker pools on the discovery plane: the one place the `--pool` flag, its Consul tag and its name rule live.

A worker joins a pool with ``--pool NAME`` (``DYN_POOL``); it registers with the Consul tag ``pool=NAME``.
A worker without the tag (an older release) is in the default pool. The global router runs one KV router
per pool over exactly the workers that carry its tag (docs/global-router.md).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable

#: the pool a worker is in when it names none
DEFAULT_POOL = "default"
#: Consul tag prefix: ``pool=<name>``
TAG_PREFIX = "pool="
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def pool_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a pool name (None when it can): it goes into a Consul tag and metric labels."""
    if not isinstance(name, str) or not _NAME.match(name):
        return f"pool name {name!r} must be 1-63 characters of letters, digits, '_', '.', '-', starting alphanumeric"
    return None


def check_pool_name(name: str) -> str:
    """``name`` if valid, else ValueError naming the rule (argparse turns it into a usage error)."""
    problem = pool_name_problem(name)
    if problem is not None:
        raise ValueError(problem)
    return name


def _pool_arg(value: str) -> str:
    try:
        return check_pool_name(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_pool_flag(parser: argparse.ArgumentParser) -> None:
    """The worker's ``--pool`` (env ``DYN_POOL`` through envflags)."""
    parser.add_argument(
        "--pool",
        type=_pool_arg,
        default=DEFAULT_POOL,
        help=f"worker pool to join (Consul tag pool=NAME); the global router routes per pool (default {DEFAULT_POOL})",
    )


def pool_tag(pool: str) -> str:
    return TAG_PREFIX + pool


def pool_of(tags: Iterable[str]) -> str:
    """The pool named by a registration's tags; the default pool when none is."""
    for t in tags:
        if t.startswith(TAG_PREFIX):
            return t[len(TAG_PREFIX) :]
    return DEFAULT_POOL
