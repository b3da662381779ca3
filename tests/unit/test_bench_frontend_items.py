"""`bench frontend-items`: every stand-in still applies to this tree's request path and keeps the number of
responses a request gets (else the 'cost' would include responses not built)."""

from __future__ import annotations

import importlib

from dynamo_grpc.bench.frontend_items import STAND_INS, TARGETS, measure


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
