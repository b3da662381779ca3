"""The pools config: the grid a user writes, and the errors a wrong one gets (each naming the fix)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_grpc.router.pool_config import (
    DEFAULT_BUSY_THRESHOLD,
    PoolConfigError,
    load_pool_config,
    parse_pool_config,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pools.yaml"


def grid(**top: object) -> dict[str, object]:
    return {
        "default_pool": "short",
        "pools": [
            {"name": "short", "input_tokens": [0, 1024]},
            {"name": "long", "input_tokens": [1024, None]},
        ],
        **top,
    }


def errors_of(data: object) -> str:
    with pytest.raises(PoolConfigError) as e:
        parse_pool_config(data, "pools.yaml")
    return str(e.value)


def test_example_file_is_valid_and_selects_by_input_length() -> None:
    g = load_pool_config(EXAMPLE)
    assert set(g.pools) == {"short", "long"}
    assert g.select("aggregated", 100, 400).pool == "short"
    assert g.select("prefill", 5000, 5100).pool == "long"
    assert g.pools["long"].busy_threshold == 0.95
    assert g.pools["short"].busy_threshold == 0.9


def test_range_edges_are_half_open() -> None:
    g = parse_pool_config(grid())
    assert g.select("aggregated", 1023, 1023).pool == "short"
    sel = g.select("aggregated", 1024, 1024)
    assert sel.pool == "long"
    assert sel.reason == "input 1024 tokens in [1024,∞) -> pool long"


def test_spill_order_is_nearest_range_then_default() -> None:
    g = parse_pool_config(
        {
            "default_pool": "misc",
            "pools": [
                {"name": "a", "input_tokens": [0, 100]},
                {"name": "b", "input_tokens": [100, 200]},
                {"name": "c", "input_tokens": [200, None]},
                {"name": "misc"},
            ],
        }
    )
    assert g.select("aggregated", 150, 150).spill_order == ("c", "a", "misc")
    assert g.select("aggregated", 10, 10).spill_order == ("b", "c", "misc")
    assert parse_pool_config({**grid(), "spill_over": False}).select("aggregated", 1, 1).spill_order == ()


def test_decode_phase_uses_the_context_grid_and_default_when_none() -> None:
    g = parse_pool_config(
        {
            "default_pool": "short",
            "pools": [
                {"name": "short", "input_tokens": [0, 1024], "context_tokens": [0, 4096], "itl_target_s": 0.05},
                {"name": "long", "input_tokens": [1024, None], "context_tokens": [4096, None]},
            ],
        }
    )
    assert g.select("decode", 100, 5000).pool == "long"  # context, not input, decides
    assert g.select("prefill", 100, 5000).pool == "short"
    only_input = parse_pool_config(grid())
    sel = only_input.select("decode", 5000, 6000)
    assert sel.pool == "short" and "no context_tokens pools configured" in sel.reason


def test_default_busy_threshold_is_on_for_pools() -> None:
    assert DEFAULT_BUSY_THRESHOLD < 1.0
    g = parse_pool_config({**grid(), "busy_threshold": 0.7})
    assert {p.busy_threshold for p in g.pools.values()} == {0.7}


def test_overlap_is_an_error_naming_both_pools() -> None:
    msg = errors_of(
        {
            "default_pool": "a",
            "pools": [{"name": "a", "input_tokens": [0, 1024]}, {"name": "b", "input_tokens": [512, None]}],
        }
    )
    assert "input_tokens: pools a and b overlap on [512,1024)" in msg


def test_gap_and_missing_tail_are_errors() -> None:
    msg = errors_of(
        {
            "default_pool": "a",
            "pools": [{"name": "a", "input_tokens": [0, 100]}, {"name": "b", "input_tokens": [200, 300]}],
        }
    )
    assert "no pool covers [100,200)" in msg
    assert "no pool covers [300,∞)" in msg
    assert "no pool covers [0,50)" in errors_of(
        {"default_pool": "a", "pools": [{"name": "a", "input_tokens": [50, None]}]}
    )


def test_unknown_default_pool_and_keys_are_named() -> None:
    assert "default_pool: 'nope' is not one of the pools (short, long)" in errors_of(grid(default_pool="nope"))
    assert "unknown key(s) spillover" in errors_of(grid(spillover=True))
    msg = errors_of({"pools": [{"name": "default", "input_token": [0, None]}]})
    assert "pool default: unknown key(s) input_token" in msg


@pytest.mark.parametrize(
    ("pool", "expected"),
    [
        ({"name": "x", "input_tokens": [10, 5]}, "hi must be an integer > lo (10) or null, got 5"),
        ({"name": "x", "input_tokens": [-1, None]}, "lo must be an integer >= 0"),
        ({"name": "x", "input_tokens": "0-100"}, "expected [lo, hi]"),
        ({"name": "x", "busy_threshold": 1.5}, "busy_threshold: must be in (0, 1]"),
        ({"name": "x", "ttft_target_s": 0.5}, "ttft_target_s needs input_tokens"),
        ({"name": "x", "input_tokens": [0, None], "itl_target_s": 0.05}, "itl_target_s needs context_tokens"),
        ({"name": "bad name"}, "pool name 'bad name' must be"),
    ],
)
def test_bad_pool_fields(pool: dict[str, object], expected: str) -> None:
    assert expected in errors_of({"default_pool": "x", "pools": [pool]})


def test_duplicate_and_empty() -> None:
    assert "pool a: defined twice" in errors_of({"default_pool": "a", "pools": [{"name": "a"}, {"name": "a"}]})
    assert "expected a non-empty list" in errors_of({"pools": []})
    assert "expected a mapping" in errors_of(["short"])


def test_every_problem_is_reported_at_once() -> None:
    msg = errors_of({"default_pool": "zz", "busy_threshold": 0, "pools": [{"name": "a", "input_tokens": [5, None]}]})
    assert "busy_threshold" in msg and "default_pool" in msg and "no pool covers [0,5)" in msg


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "pools.yaml"
    bad.write_text("pools: [\n")
    with pytest.raises(PoolConfigError, match=r"pools\.yaml: not valid YAML"):
        load_pool_config(bad)
    with pytest.raises(PoolConfigError, match="cannot read pools config"):
        load_pool_config(tmp_path / "missing.yaml")


def test_busy_prefill_tokens_is_a_positive_integer() -> None:
    ok = parse_pool_config(
        {**grid(), "pools": [{"name": "short", "input_tokens": [0, None], "busy_prefill_tokens": 8192}]}
    )
    assert ok.pools["short"].busy_prefill_tokens == 8192
    msg = errors_of({"default_pool": "x", "pools": [{"name": "x", "busy_prefill_tokens": 0}]})
    assert "busy_prefill_tokens: expected a positive integer or null, got 0" in msg


def test_accept_spill_prefill_tokens_is_a_positive_integer_and_off_by_default() -> None:
    ok = parse_pool_config(
        {
            **grid(),
            "pools": [{"name": "short", "input_tokens": [0, None], "accept_spill_prefill_tokens": 4096}],
        }
    )
    assert ok.pools["short"].accept_spill_prefill_tokens == 4096
    assert "takes spill-over while at most 4096 prefill tokens are pending" in ok.describe()[0]
    assert parse_pool_config(grid()).pools["short"].accept_spill_prefill_tokens is None
    msg = errors_of({"default_pool": "x", "pools": [{"name": "x", "accept_spill_prefill_tokens": True}]})
    assert "pool x: accept_spill_prefill_tokens: expected a positive integer or null, got True" in msg
