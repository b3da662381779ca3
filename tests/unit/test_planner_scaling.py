"""The planner's arithmetic against hand-computed cases (docs/planner.md, "Formulas")."""

from __future__ import annotations

import math

import pytest

from dynamo_grpc.planner.profile import DecodePoint, PrefillPoint, Profile, ProfileError
from dynamo_grpc.planner.scaling import (
    AGG,
    DECODE,
    PREFILL,
    Bounds,
    Hysteresis,
    Load,
    Targets,
    decode_need,
    expected_ttft_s,
    fit_budget,
    needs,
    prefill_need,
    prefill_utilisation_limit,
    replicas_for,
)


def profile() -> Profile:
    return Profile(
        "mocker",
        [PrefillPoint(1000, 0.1), PrefillPoint(2000, 0.2)],
        [
            DecodePoint(1, 1000, 0.02, 50.0),
            DecodePoint(8, 1000, 0.04, 200.0),
            DecodePoint(32, 1000, 0.08, 400.0),
            DecodePoint(1, 3000, 0.03, 33.0),
            DecodePoint(8, 3000, 0.06, 130.0),
        ],
    )


def test_utilisation_limit_keeps_mdl_ttft_on_target() -> None:
    rho = prefill_utilisation_limit(0.1, 0.5)
    assert rho == pytest.approx(0.8 / 0.9)
    assert expected_ttft_s(0.1, rho) == pytest.approx(0.5)  # exactly the target at the limit
    assert prefill_utilisation_limit(0.5, 0.5) == 0.0


def test_prefill_replicas_hand_computed() -> None:
    # S = 0.1 s at isl 1000; rho_max = 8/9; one replica carries 8/9 * 1000 / 0.1 = 8888.9 tokens/s;
    # 20 req/s * 1000 tokens = 20000 tokens/s -> 2.25 -> 3 replicas
    need = prefill_need(profile(), Load(20.0, 1000, 100), Targets(0.5, 0.05))
    assert need == pytest.approx(2.25)
    assert replicas_for(need, Bounds(1, 8)) == 3


def test_prefill_interpolates_between_profiled_lengths() -> None:
    assert profile().ttft_s(1500) == pytest.approx(0.15)
    assert profile().ttft_s(100) == pytest.approx(0.1)  # clamped, never extrapolated


def test_decode_replicas_hand_computed_and_exact_ceil() -> None:
    # context 1000 + 0/2 -> the 1000 curve; best point within 50 ms is c=8 at 200 tokens/s;
    # 2 req/s * 100 tokens = 200 tokens/s -> exactly 1.0 replica, which must stay 1 (no float ceil to 2)
    load = Load(2.0, 950, 100)
    need = decode_need(profile(), load, Targets(0.5, 0.05))
    assert need == pytest.approx(1.0)
    assert replicas_for(need, Bounds(1, 8)) == 1


def test_decode_interpolates_between_contexts() -> None:
    # context 2000 is halfway between the 1000 curve (200 tok/s within 50 ms) and the 3000 one (33 tok/s)
    tokens_per_s, _ = profile().decode_capacity(2000, 0.05)
    assert tokens_per_s == pytest.approx((200 + 33) / 2)


def test_correction_tightens_the_itl_limit() -> None:
    # observed ITL twice the profile's: the limit becomes 25 ms, only c=1 (50 tokens/s) fits -> 4 replicas
    need = decode_need(profile(), Load(2.0, 950, 100), Targets(0.5, 0.05), correction=2.0)
    assert need == pytest.approx(4.0)


def test_aggregated_need_is_the_sum_of_both_phases() -> None:
    got = needs(profile(), Load(2.0, 950, 100), Targets(0.5, 0.05), {}, [AGG])  # 0.225 prefill + 1.0 decode
    assert got[AGG] == pytest.approx(0.225 + 1.0)
    assert replicas_for(got[AGG], Bounds(1, 8)) == 2


def test_unreachable_targets_ask_for_the_maximum() -> None:
    need = prefill_need(profile(), Load(1.0, 2000, 10), Targets(0.15, 0.05))  # one prompt alone takes 0.2 s
    assert math.isinf(need)
    assert replicas_for(need, Bounds(1, 5)) == 5


def test_no_load_means_the_minimum() -> None:
    got = needs(profile(), Load(0.0, 0.0, 0.0), Targets(), {}, [PREFILL, DECODE])
    assert got == {PREFILL: 0.0, DECODE: 0.0}
    assert replicas_for(got[PREFILL], Bounds(2, 8)) == 2


def test_budget_takes_from_the_pool_furthest_above_its_minimum() -> None:
    bounds = {PREFILL: Bounds(1, 8), DECODE: Bounds(1, 8)}
    assert fit_budget({PREFILL: 5, DECODE: 3}, bounds, 6) == {PREFILL: 3, DECODE: 3}
    assert fit_budget({PREFILL: 5, DECODE: 3}, bounds, None) == {PREFILL: 5, DECODE: 3}


def test_hysteresis_scales_up_at_once_and_down_only_when_asked_twice() -> None:
    h = Hysteresis(down_after=2)
    assert h.apply({AGG: 2}, {AGG: 5}) == {AGG: 5}
    assert h.apply({AGG: 5}, {AGG: 2}) == {AGG: 5}  # one low ask: hold
    assert h.apply({AGG: 5}, {AGG: 3}) == {AGG: 3}  # the second: down, to the larger of the two asks
    assert h.apply({AGG: 3}, {AGG: 1}) == {AGG: 3}
    assert h.apply({AGG: 3}, {AGG: 4}) == {AGG: 4}  # an up in between resets the count
    assert h.apply({AGG: 4}, {AGG: 1}) == {AGG: 4}


def test_profile_round_trips_and_refuses_bad_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = profile().save(tmp_path / "p.json")
    again = Profile.load(path)
    assert again.prefill == profile().prefill and again.decode == profile().decode
    path.write_text('{"format": "other"}')
    with pytest.raises(ProfileError, match="format"):
        Profile.load(path)
    with pytest.raises(ProfileError, match="positive"):
        Profile("m", [PrefillPoint(0, 0.1)], [DecodePoint(1, 1, 0.1, 1.0)])
