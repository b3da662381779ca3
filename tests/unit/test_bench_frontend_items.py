"""`bench frontend-items`: every stand-in still applies to this tree's request path and keeps the number of
responses a request gets (else the 'cost' would include responses not built)."""

from __future__ import annotations

import importlib
import os
import statistics

import pytest

from dynamo_grpc.bench.frontend_items import STAND_INS, TARGETS, main, measure


def test_every_stand_in_applies_and_keeps_the_responses() -> None:
    res = measure(rounds=1, src=None, quick=True)
    items = res["items"]
    assert set(items) == set(STAND_INS)
    base = items["none"]["responses_per_request"]
    assert base >= 7  # the stand-in worker's 8 messages of 2 tokens: one response per message with text
    for item, r in items.items():
        assert r["responses_per_request"] == base, item
        assert r["ms_per_request_rounds"][0] > 0
    assert items["none"]["cost_us_median"] == 0


def test_every_stand_in_replaces_something_that_exists() -> None:
    assert set(TARGETS) == set(STAND_INS) - {"none"}
    for item, targets in TARGETS.items():
        for module, attr in targets:
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)  # AttributeError: the stand-in would replace nothing
            assert callable(obj), (item, attr)
            assert attr.rsplit(".", 1)[-1] in STAND_INS[item], (item, attr)


def test_against_another_tree_in_the_same_rounds() -> None:
    """--against: another tree's whole path per round (here this tree again: it saves ~nothing against itself)."""
    res = measure(rounds=2, src=None, quick=True, against={"same": os.environ.get("PYTHONPATH", "")}, path_only=True)
    assert set(res["items"]) == {"none"}
    same = res["against"]["same"]
    assert len(same["ms_per_request_rounds"]) == 2 and all(v > 0 for v in same["ms_per_request_rounds"])
    assert len(same["ratio_this_to_it_rounds"]) == 2
    assert same["this_saves_us_median"] == statistics.median(same["this_saves_us_rounds"])


def test_against_needs_name_and_tree() -> None:
    with pytest.raises(SystemExit):
        main(["--against", "nosrc", "--path-only", "--rounds", "1"])
