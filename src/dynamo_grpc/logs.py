"""Logging for every process: one variable, `DYN_LOG` (Dynamo's), and one `--log-level` flag that defaults to it.

The value is a level (`debug`, `info`, `warning`, `error`), optionally followed by per-logger levels, as in
Dynamo: `DYN_LOG=info,dynamo_grpc.router=debug`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

ENV = "DYN_LOG"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LEVELS = ("debug", "info", "warning", "error", "critical")


def parse_log_spec(spec: str) -> tuple[int, dict[str, int]]:
    """`level[,logger=level...]` -> (root level, {logger: level}); ValueError names what is wrong."""
    root = logging.INFO
    targets: dict[str, int] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, level = part.rpartition("=")
        if level.lower() not in _LEVELS:
            raise ValueError(f"unknown log level {level!r} in {spec!r} (one of {', '.join(_LEVELS)})")
        value = logging.getLevelNamesMapping()[level.upper()]
        if name:
            targets[name] = value
        else:
            root = value
    return root, targets


def add_log_flag(parser: argparse.ArgumentParser) -> None:
    """`--log-level`, defaulting to $DYN_LOG (then info)."""
    parser.add_argument(
        "--log-level",
        default=os.environ.get(ENV, "info"),
        help=f"level[,logger=level...], e.g. debug or info,dynamo_grpc.router=debug (default: ${ENV} or info)",
    )


def setup_logging(spec: str | None = None) -> None:
    """Configure the root logger on stderr from `spec` (default: $DYN_LOG); a bad value exits with a message."""
    spec = os.environ.get(ENV, "info") if spec is None else spec
    try:
        root, targets = parse_log_spec(spec)
    except ValueError as e:
        raise SystemExit(f"--log-level / {ENV}: {e}") from None
    logging.basicConfig(level=root, format=FORMAT, stream=sys.stderr, force=True)
    for name, level in targets.items():
        logging.getLogger(name).setLevel(level)
