"""The corrections are a request-weighted mean of observed/expected ratios, shrunk toward the profile (c = 1):
a short interval at the base rate moves them a little, many requests move them a lot (hand-computed cases)."""

from __future__ import annotations

import asyncio

import pytest

from dynamo_grpc.planner.connectors.virtual import VirtualConnector
from dynamo_grpc.planner.corrections import MEMORY_REQUESTS, PRIOR_REQUESTS, Correction
from dynamo_grpc.planner.loop import Planner, PlannerConfig
from dynamo_grpc.planner.scaling import AGG, DECODE, PREFILL, Bounds
from tests.unit.test_planner_loop import Latencies
from tests.unit.test_planner_scaling import profile


def test_a_few_requests_move_the_correction_by_their_share_of_the_evidence() -> None:
    c = Correction()
    assert (c.value, c.weight) == (1.0, PRIOR_REQUESTS)
    # 7 requests at 1.6 x the profile against the profile's 30: (30 * 1 + 7 * 1.6) / 37 = 1.11351
    assert c.learn(1.6, 7) == pytest.approx(41.2 / 37)
    assert c.weight == 37
    # 37 more at 1.0: (37 * 1.11351 + 37 * 1.0) / 74 = 1.05676
    assert c.learn(1.0, 37) == pytest.approx((41.2 + 37) / 74)


def test_ratios_are_clamped_and_an_empty_interval_changes_nothing() -> None:
    c = Correction()
    assert c.learn(10.0, 30) == pytest.approx(1.5)  # clamped to 2.0: (30 + 60) / 60
    assert c.learn(0.01, 0) == pytest.approx(1.5)


def test_the_evidence_is_capped_so_a_drifting_profile_is_followed() -> None:
    c = Correction()
    for _ in range(20):
        c.learn(1.0, 100)
    assert c.weight == MEMORY_REQUESTS
    # 100 requests at 1.5 still move it by 100 / 400 of the difference: 1 + 0.5 / 4
    assert c.learn(1.5, 100) == pytest.approx(1.125)


def test_the_planner_learns_an_interval_by_its_requests() -> None:
    # 1 req/s for 60 s on 4 workers with twice the profile's latencies (test_planner_loop): 60 requests at ratio
    # 2.0 (clamped) against the prior's 30 -> (30 + 120) / 90 = 1.667; the same at 0.1 req/s (6 requests):
    # (30 + 12) / 36 = 1.167
    cfg = PlannerConfig([AGG], bounds={AGG: Bounds(1, 10)}, interval_s=60, down_after=1)
    many = Planner(cfg, profile(), Latencies([(1.0, 0.4, 0.08)]), VirtualConnector(cfg.pools, 4))
    asyncio.run(many.step())
    few = Planner(cfg, profile(), Latencies([(0.1, 0.4, 0.08)]), VirtualConnector(cfg.pools, 4))
    asyncio.run(few.step())
    assert many.corrections[PREFILL] == pytest.approx(150 / 90)
    assert many.corrections[DECODE] == pytest.approx(150 / 90)
    assert few.corrections[PREFILL] == pytest.approx(42 / 36)
    assert few.corrections[DECODE] == pytest.approx(42 / 36)
    assert many.decisions[0].corrections == many.corrections
