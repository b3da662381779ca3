"""Where the time of one change goes inside the agent: a JSON line per answered blocking health query.

Debugging aid for `bench discovery --trace` (``--trace-file PATH`` / ``CONSUL_DEV_TRACE_FILE``): for every
health query that blocked and then returned, the system-wide monotonic times of the write that woke it
(``commit``), of the reader resuming (``woke``) and of its answer being built (``ready``), with the query's
tags, the index answered and the bytes sent. Monotonic time is one clock for every process on a Linux host,
so the bench lines these up with the watchers' own times. Off (and free) unless a path is given.
"""

from __future__ import annotations

import json
from typing import IO, Any


class AnswerTrace:
    """Appends one JSON object per line; line-buffered so a bench can read it while the agent runs."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fh: IO[str] = open(path, "a", buffering=1, encoding="utf-8")

    def record(self, **fields: Any) -> None:
        self._fh.write(json.dumps(fields, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._fh.close()
