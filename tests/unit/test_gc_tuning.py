"""A serving process freezes its start-up heap and collects the young generation less often (gc_tuning.py)."""

from __future__ import annotations

import gc

from dynamo_grpc.gc_tuning import SERVING_THRESHOLD, tune_for_serving


def test_tune_for_serving_freezes_the_heap_and_raises_the_threshold() -> None:
    before = gc.get_threshold()
    try:
        tune_for_serving()
        assert gc.get_threshold() == SERVING_THRESHOLD
        assert gc.get_freeze_count() > 0  # this process's objects so far are out of the collector's view
        assert SERVING_THRESHOLD[0] > 700  # fewer young collections than CPython's default
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
