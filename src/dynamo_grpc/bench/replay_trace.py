"""Load public request traces into one plain shape the replay can drive.

Two schemas are understood, detected from the file's first character (``{`` means JSONL):

* Mooncake (FAST'25) JSONL: ``timestamp`` (ms), ``input_length``, ``output_length`` and ``hash_ids``,
  prefix block ids of ``hash_block_size`` (512) tokens; the last block may be partial.
* Azure LLM inference CSV: ``TIMESTAMP`` (wall clock, or seconds), ``ContextTokens``, ``GeneratedTokens``:
  lengths and arrivals only, so prompts are random and share nothing.

Any file with one of these schemas works; nothing here knows a particular trace.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

#: Mooncake's published traces hash 512-token blocks.
MOONCAKE_BLOCK_SIZE = 512

_AZURE_COLUMNS = {"timestamp": "TIMESTAMP", "input": "ContextTokens", "output": "GeneratedTokens"}


class TraceError(ValueError):
    """The trace file is malformed; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace; ``arrival_s`` is relative to the trace's first arrival."""

    index: int
    arrival_s: float
    input_length: int
    output_length: int
    #: prefix block ids (equal id = equal prefix up to and including that block); None: no prefix info
    hash_ids: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class Trace:
    """A loaded trace: its requests in arrival order and how its prefix ids were hashed."""

    path: str
    fmt: str  # "mooncake" | "azure"
    requests: tuple[TraceRequest, ...]
    hash_block_size: int | None  # tokens per hash id; None when the trace has no prefix info

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s if self.requests else 0.0

    def head(self, limit: int | None) -> Trace:
        """The first ``limit`` requests (all when ``limit`` is None)."""
        if limit is None or limit >= len(self.requests):
            return self
        if limit <= 0:
            raise ValueError("limit must be positive")
        return Trace(self.path, self.fmt, self.requests[:limit], self.hash_block_size)


def detect_format(path: str | Path) -> str:
    """``mooncake`` for JSON lines, ``azure`` for a CSV with a header."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            s = line.strip()
            if s:
                return "mooncake" if s.startswith("{") else "azure"
    raise TraceError(f"{path}: empty trace")


def load_trace(
    path: str | Path,
    fmt: str = "auto",
    limit: int | None = None,
    hash_block_size: int = MOONCAKE_BLOCK_SIZE,
) -> Trace:
    """Read a trace file (format ``auto``, ``mooncake`` or ``azure``), keeping the first ``limit`` requests."""
    if limit is not None and limit <= 0:
        raise ValueError("limit must be positive")
    kind = detect_format(path) if fmt == "auto" else fmt
    if kind == "mooncake":
        rows = _mooncake_rows(Path(path), hash_block_size)
        bs: int | None = hash_block_size
    elif kind == "azure":
        rows = _azure_rows(Path(path))
        bs = None
    else:
        raise ValueError(f"unknown trace format {fmt!r} (auto, mooncake, azure)")
    raw = list(rows)
    if not raw:
        raise TraceError(f"{path}: no requests")
    raw.sort(key=lambda r: r[0])  # stable: equal timestamps keep file order
    if limit is not None:
        raw = raw[:limit]
    t0 = raw[0][0]
    reqs = tuple(TraceRequest(i, t - t0, inp, out, hids) for i, (t, inp, out, hids) in enumerate(raw))
    return Trace(str(path), kind, reqs, bs)


def _mooncake_rows(path: Path, block_size: int) -> Iterator[tuple[float, int, int, tuple[int, ...] | None]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise TraceError(f"{where}: expected a JSON object")
            try:
                ts = float(obj["timestamp"]) / 1000.0
                inp = _length(obj["input_length"], where, "input_length")
                out = _length(obj["output_length"], where, "output_length")
            except KeyError as e:
                raise TraceError(f"{where}: missing field {e.args[0]!r}") from None
            except (TypeError, ValueError) as e:
                raise TraceError(f"{where}: {e}") from None
            hids_raw = obj.get("hash_ids")
            hids: tuple[int, ...] | None = None
            if hids_raw is not None:
                if not isinstance(hids_raw, list) or not all(
                    isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in hids_raw
                ):
                    raise TraceError(f"{where}: hash_ids must be a list of non-negative integers")
                if len(hids_raw) != math.ceil(inp / block_size):
                    raise TraceError(
                        f"{where}: {len(hids_raw)} hash_ids for input_length {inp} "
                        f"(expected ceil({inp}/{block_size}) = {math.ceil(inp / block_size)})"
                    )
                hids = tuple(hids_raw)
            yield ts, inp, out, hids


def _length(v: object, where: str, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise TraceError(f"{where}: {name} must be an integer")
    n = int(v)
    if n < 0 or (name == "input_length" and n == 0):
        raise TraceError(f"{where}: {name} must be positive, got {n}")
    return n


def _azure_time(s: str, where: str) -> float:
    """Seconds from ``2023-11-16 18:17:03.9799600`` (any fraction length) or a plain number of seconds."""
    s = s.strip()
    try:
        return float(s)
    except ValueError:
        pass
    base, _, frac = s.partition(".")
    try:
        dt = datetime.fromisoformat(base)
    except ValueError:
        raise TraceError(f"{where}: bad TIMESTAMP {s!r}") from None
    f = float("0." + frac) if frac.isdigit() else 0.0
    return dt.timestamp() + f


def _azure_rows(path: Path) -> Iterator[tuple[float, int, int, tuple[int, ...] | None]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise TraceError(f"{path}: empty trace")
        cols = {name.strip().lower(): i for i, name in enumerate(header)}
        idx: dict[str, int] = {}
        for key, name in _AZURE_COLUMNS.items():
            if name.lower() not in cols:
                raise TraceError(f"{path}: missing column {name!r} (have {header})")
            idx[key] = cols[name.lower()]
        for lineno, row in enumerate(reader, 2):
            if not row or not any(c.strip() for c in row):
                continue
            where = f"{path}:{lineno}"
            try:
                ts = _azure_time(row[idx["timestamp"]], where)
                inp = _length(row[idx["input"]], where, "input_length")
                out = _length(row[idx["output"]], where, "output_length")
            except IndexError:
                raise TraceError(f"{where}: expected {len(header)} columns") from None
            except ValueError as e:
                if isinstance(e, TraceError):
                    raise
                raise TraceError(f"{where}: {e}") from None
            yield ts, inp, out, None
