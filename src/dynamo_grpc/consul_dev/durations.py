"""Go ``time.Duration`` parsing: Consul's HTTP API takes durations as Go strings ("10s", "1m30s")."""

from __future__ import annotations

import re

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


class DurationError(ValueError):
    """A duration string Go's time.ParseDuration would reject."""


def parse_go_duration(text: str) -> float:
    """Parse a Go duration string into seconds, rejecting what Go rejects (e.g. "10" without unit)."""
    s = text.strip()
    if not s:
        raise DurationError(f'time: invalid duration "{text}"')
    sign = 1.0
    if s[0] in "+-":
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    pos = 0
    total = 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            raise DurationError(f'time: invalid duration "{text}"')
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos == 0:
        raise DurationError(f'time: invalid duration "{text}"')
    return sign * total


def parse_duration_field(value: object) -> float:
    """A JSON duration field: a Go string, or a number of nanoseconds (how Go encodes time.Duration)."""
    if isinstance(value, bool):
        raise DurationError(f"invalid duration {value!r}")
    if isinstance(value, (int, float)):
        return float(value) * 1e-9
    if isinstance(value, str):
        return parse_go_duration(value)
    raise DurationError(f"invalid duration {value!r}")


def format_go_duration(seconds: float) -> str:
    """Format seconds the way Go prints a time.Duration (roughly: "10s", "1m0s", "1.5s")."""
    if seconds == 0:
        return "0s"
    if seconds < 1:
        ms = seconds * 1e3
        return f"{ms:g}ms"
    whole_min, sec = divmod(seconds, 60.0)
    hours, minutes = divmod(int(whole_min), 60)
    out = ""
    if hours:
        out += f"{hours}h"
    if hours or minutes:
        out += f"{minutes}m"
    out += f"{round(sec, 9):g}s"
    return out
