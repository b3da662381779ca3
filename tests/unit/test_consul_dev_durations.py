"""Go duration strings, as Consul's API takes them."""

from __future__ import annotations

import pytest

from dynamo_grpc.consul_dev.durations import (
    DurationError,
    format_go_duration,
    parse_duration_field,
    parse_go_duration,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10.0), ("1m", 60.0), ("1m30s", 90.0), ("1.5h", 5400.0), ("250ms", 0.25), ("0", 0.0),
     ("3.333s", 3.333), ("100us", 1e-4), ("-2s", -2.0)],
)
def test_parse(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "s", "1x", "1m 2s", "ten seconds"])
def test_rejects_what_go_rejects(text: str) -> None:
    with pytest.raises(DurationError):
        parse_go_duration(text)


def test_json_numbers_are_nanoseconds_and_formatting() -> None:
    assert parse_duration_field(10_000_000_000) == pytest.approx(10.0)
    with pytest.raises(DurationError):
        parse_duration_field(True)
    assert [format_go_duration(x) for x in (0, 0.5, 10, 60, 90, 3600)] == [
        "0s", "500ms", "10s", "1m0s", "1m30s", "1h0m0s"]
