"""Logging for every process: one variable, `DYN_LOG` (Dynamo's), and one `--log-level` flag that defaults to it.

The value is a level (`debug`, `info`, `warning`, `error`), optionally followed by per-logger levels, as in
Dynamo: `DYN_LOG=info,dynamo_grpc.router=debug`. `--log-format text|json` (default $DYN_LOG_FORMAT, then text):
json writes one object per line with the request id and the trace id of the request being served, so a log
search and a trace search meet.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import logging
import os
import sys
import time

ENV = "DYN_LOG"
FORMAT_ENV = "DYN_LOG_FORMAT"
LOG_FORMATS = ("text", "json")
#: the request being served by this task (set by the frontend's route session and the worker's stream)
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("dynamo_request_id", default=None)
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
    """`--log-level`, defaulting to $DYN_LOG (then info), and `--log-format`, defaulting to $DYN_LOG_FORMAT."""
    parser.add_argument(
        "--log-level",
        default=os.environ.get(ENV, "info"),
        help=f"level[,logger=level...], e.g. debug or info,dynamo_grpc.router=debug (default: ${ENV} or info)",
    )
    parser.add_argument(
        "--log-format",
        default=os.environ.get(FORMAT_ENV, "text"),
        help=f"text, or json: one object per line with request_id and trace_id (default: ${FORMAT_ENV} or text)",
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and the request id / trace id when serving one."""

    def format(self, record: logging.LogRecord) -> str:
        from dynamo_grpc.observability.spans import current_ids

        out: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None) or request_id_var.get()
        if rid:
            out["request_id"] = rid
        ids = current_ids()
        if ids is not None:
            out["trace_id"], out["span_id"] = ids
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(spec: str | None = None, fmt: str | None = None) -> None:
    """Configure the root logger on stderr from `spec` (default: $DYN_LOG) in `fmt` (default: $DYN_LOG_FORMAT).

    A bad value exits with a message naming the flag.
    """
    spec = os.environ.get(ENV, "info") if spec is None else spec
    fmt = os.environ.get(FORMAT_ENV, "text") if fmt is None else fmt
    try:
        root, targets = parse_log_spec(spec)
    except ValueError as e:
        raise SystemExit(f"--log-level / {ENV}: {e}") from None
    if fmt not in LOG_FORMATS:
        raise SystemExit(f"--log-format / {FORMAT_ENV}: {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    logging.basicConfig(level=root, format=FORMAT, stream=sys.stderr, force=True)
    if fmt == "json":
        for h in logging.getLogger().handlers:
            h.setFormatter(JsonFormatter())
    for name, level in targets.items():
        logging.getLogger(name).setLevel(level)
