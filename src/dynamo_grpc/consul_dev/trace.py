"""Where the time of one change goes inside the agent: a JSON line per answered blocking health query.

Debugging aid for `bench discovery --trace` (``--trace-file PATH`` / ``CONSUL_DEV_TRACE_FILE``): for every
health query that blocked and then returned, the system-wide monotonic times of the write that woke it
(``commit``), of the reader resuming (``woke``) and of its answer being built (``ready``), with the query's
tags, the index answered and the bytes sent. Monotonic time is one clock for every process on a Linux host,
so the bench lines these up with the watchers' own times. Off (and free) unless a path is given.
"""

from __future__ import annotations

import gc
import json
import time
from typing import IO, Any


class AnswerTrace:
    """Appends one JSON object per line; line-buffered so a bench can read it while the agent runs. Also
    records the garbage collector's pauses of 1 ms or more (``{"gc": generation, "start", "end"}``): a
    full collection stops the agent's one event loop, and every answer waiting behind it."""

    GC_MIN_S = 0.001

    def __init__(self, path: str) -> None:
        self.path = path
        self._fh: IO[str] = open(path, "a", buffering=1, encoding="utf-8")
        self._gc_started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        now = time.monotonic()
        if phase == "start":
            self._gc_started = now
        elif now - self._gc_started >= self.GC_MIN_S:
            self.record(gc=info.get("generation"), start=self._gc_started, end=now, collected=info.get("collected"))

    def record(self, **fields: Any) -> None:
        self._fh.write(json.dumps(fields, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        self._fh.close()
