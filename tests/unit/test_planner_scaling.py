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
    aggregated_need,
    decode_need,
    expected_ttft_s,
    fit_budget,
    needs,
    prefill_busy,
    prefill_need,
    prefill_utilisation_limit,
    replicas_for,
    replicas_with_slack,
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


def test_aggregated_decode_meets_a_tighter_itl_while_it_shares_the_worker_with_prefill() -> None:
    # 2 req/s of isl 950: S = 0.1 s, prefill busy = 0.2 s/s; at n replicas rho = 0.2/n and the decode limit is
    # 50 ms * (1 - 0.2/n): c=8 (40 ms, 200 tok/s) fits for n >= 1; 2 * 100 / n <= (1 - 0.2/n) * 200 <=> n >= 1.2
    # (summing the phases, 0.225 + 1.0 = 1.225, counted the prefill's time but not its stretch of the ITL)
    got = needs(profile(), Load(2.0, 950, 100), Targets(0.5, 0.05), {}, [AGG])
    assert got[AGG] == pytest.approx(1.2)
    assert replicas_for(got[AGG], Bounds(1, 8)) == 2
    # 8 req/s: busy 0.8; c=8 fits for 1 - 0.8/n >= 0.8 <=> n >= 4, and 800 / n <= (1 - 0.8/n) * 200 <=> n >= 4.8
    assert aggregated_need(profile(), Load(8.0, 950, 100), Targets(0.5, 0.05)) == pytest.approx(4.8)
    # 20 req/s of isl 1000 and 1 output token: busy 2.0; even one stream (20 ms) needs 1 - 2/n >= 0.4, n >= 3.33
    assert aggregated_need(profile(), Load(20.0, 1000, 1), Targets(0.5, 0.05)) == pytest.approx(10 / 3)
    # with a loose ITL target the prefill need (2.25, test_prefill_replicas_hand_computed) is the floor
    assert aggregated_need(profile(), Load(20.0, 1000, 1), Targets(0.5, 1.0)) == pytest.approx(2.25)
    assert prefill_busy(profile(), Load(20.0, 1000, 1), correction=1.5) == pytest.approx(3.0)


def test_kv_cache_caps_the_decode_capacity() -> None:
    # the 1000 curve allows 200 tok/s at 40 ms within 50 ms; a cache of 4032 tokens in blocks of 64 holds
    # 4032 / (1000 + 32) = 3.907 streams of context 1000, which make 3.907 / 0.04 = 97.7 tok/s
    p = profile()
    kv = Profile(p.engine, p.prefill, p.decode, kv_tokens=4032, block_size=64)
    assert kv.kv_streams(1000) == pytest.approx(4032 / 1032)
    tokens_per_s, itl = kv.decode_capacity(1000, 0.05)
    assert itl == pytest.approx(0.04)
    assert tokens_per_s == pytest.approx(4032 / 1032 / 0.04)
    # 2 req/s * 100 tokens = 200 tok/s -> 2.05 decode replicas where the ITL curve alone said 1.0
    assert decode_need(kv, Load(2.0, 950, 100), Targets(0.5, 0.05)) == pytest.approx(200 / (4032 / 1032 / 0.04))
    # a cache that holds more than the curve's best point changes nothing; unknown (None) neither
    roomy = Profile(p.engine, p.prefill, p.decode, kv_tokens=10**6, block_size=64)
    assert roomy.decode_capacity(1000, 0.05)[0] == pytest.approx(200.0)
    assert math.isinf(p.kv_streams(1000))


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


def test_a_streak_of_low_asks_survives_a_scale_down() -> None:
    # after a ramp the load falls over several intervals: 5 -> (asks 4, 1) -> 4 -> (ask 1: the streak's last two
    # are 1, 1) -> 1, one interval after the first step down instead of two
    h = Hysteresis(down_after=2)
    assert h.apply({AGG: 5}, {AGG: 4}) == {AGG: 5}
    assert h.apply({AGG: 5}, {AGG: 1}) == {AGG: 4}
    assert h.apply({AGG: 4}, {AGG: 1}) == {AGG: 1}
    # an ask at the current count ends the streak: the next low ask starts a new one
    h = Hysteresis(down_after=2)
    assert h.apply({AGG: 5}, {AGG: 3}) == {AGG: 5}
    assert h.apply({AGG: 5}, {AGG: 5}) == {AGG: 5}
    assert h.apply({AGG: 5}, {AGG: 2}) == {AGG: 5}
    assert h.apply({AGG: 5}, {AGG: 2}) == {AGG: 2}
    # the streak never raises a pool: an old ask above the current count does not count as "down"
    h = Hysteresis(down_after=2)
    assert h.apply({AGG: 6}, {AGG: 5}) == {AGG: 6}
    assert h.apply({AGG: 6}, {AGG: 4}) == {AGG: 5}
    assert h.apply({AGG: 3}, {AGG: 2}) == {AGG: 3}  # connector says 3 (a surge raced): last two asks 4, 2 -> hold


def test_profile_round_trips_and_refuses_bad_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = profile().save(tmp_path / "p.json")
    again = Profile.load(path)
    assert again.prefill == profile().prefill and again.decode == profile().decode
    path.write_text('{"format": "other"}')
    with pytest.raises(ProfileError, match="format"):
        Profile.load(path)
    with pytest.raises(ProfileError, match="positive"):
        Profile("m", [PrefillPoint(0, 0.1)], [DecodePoint(1, 1, 0.1, 1.0)])


def test_profile_keeps_its_kv_cache_and_older_profiles_load_without_one(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = profile()
    kv = Profile(p.engine, p.prefill, p.decode, kv_tokens=6144, block_size=64)
    again = Profile.load(kv.save(tmp_path / "kv.json"))
    assert (again.kv_tokens, again.block_size) == (6144, 64)
    assert Profile.load(p.save(tmp_path / "old.json")).kv_tokens is None
    with pytest.raises(ProfileError, match="kv_tokens"):
        Profile(p.engine, p.prefill, p.decode, kv_tokens=0)


def test_scale_up_slack_absorbs_a_need_within_a_fraction_of_the_count_serving() -> None:
    b = Bounds(1, 8)
    # 4 workers at slack 0.05 absorb a need up to 4.2: 4.18 stays at 4, 4.21 buys the fifth
    assert replicas_with_slack(4.18, 4, b, 0.05) == 4
    assert replicas_with_slack(4.21, 4, b, 0.05) == 5
    # one worker absorbs only up to 1.05: 1.04 stays, 1.14 buys the second (a fixed 0.2 of a replica would not)
    assert replicas_with_slack(1.04, 1, b, 0.05) == 1
    assert replicas_with_slack(1.14, 1, b, 0.05) == 2
    # more than the slack short: ceil as ever (3 -> 5), not have + 1
    assert replicas_with_slack(4.1, 3, b, 0.05) == 5
    # going down is untouched (the hysteresis streak does that), and slack 0 is a plain ceil
    assert replicas_with_slack(2.1, 4, b, 0.05) == 3
    assert replicas_with_slack(4.05, 4, b, 0.0) == 5
    # an empty pool still gets its first worker, and the bounds still hold
    assert replicas_with_slack(0.1, 0, Bounds(0, 8), 0.05) == 1
    assert replicas_with_slack(9.5, 8, b, 0.05) == 8


def test_the_prefill_correction_does_not_stretch_an_aggregated_workers_streams() -> None:
    # 8 req/s (isl 950, osl 100): 4.8 replicas, decode-bound. c_prefill = 1.5 raises the prefill need (S 0.1 -> 0.15 s:
    # rho_max 0.824, 5216 tokens/s a replica, 7600 / 5216 = 1.457 instead of 0.9), still below,
    # but not the ITL stretch: that uses the profiled prefill time, so the need is unchanged
    t = Targets(0.5, 0.05)
    assert prefill_need(profile(), Load(8.0, 950, 100), t, 1.5) == pytest.approx(7600 / (0.7 / 0.85 * 950 / 0.15))
    assert aggregated_need(profile(), Load(8.0, 950, 100), t, c_prefill=1.5) == pytest.approx(4.8)
    # and it still floors the need where prefill binds (a TTFT target only just above one prompt's time)
    assert aggregated_need(profile(), Load(8.0, 950, 100), Targets(0.15, 0.05), c_prefill=1.5) == math.inf
