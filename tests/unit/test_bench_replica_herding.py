"""`bench replica-herding`'s summary of one burst: the prefix holder's share, the spread and the latencies."""

from __future__ import annotations

import pytest

from dynamo_grpc.bench.replica_herding import summarize, token_ids


def test_the_holders_share_and_the_spread_of_a_burst() -> None:
    herded = summarize("w1", [("w1", 0.1, 1.0)] * 6)
    assert herded["holder_share"] == 1.0 and herded["requests_per_worker"] == [6] and herded["requests_cv"] == 0.0
    spread = summarize("w1", [("w1", 0.1, 0.5), ("w2", 0.2, 0.6), ("w3", 0.3, 0.7), ("w1", 0.4, 0.8)])
    assert spread["holder_share"] == 0.5 and spread["requests_per_worker"] == [2, 1, 1]
    assert spread["requests_cv"] == pytest.approx(0.3536, abs=1e-3)
    latencies = (spread["ttft_p50_s"], spread["ttft_max_s"], spread["e2e_p50_s"], spread["e2e_max_s"])
    assert latencies == (0.3, 0.4, 0.7, 0.8)


def test_prompts_of_two_seeds_share_no_leading_block() -> None:
    a, b = token_ids(1, 128), token_ids(2, 128)
    assert len(a) == 128 and (a != b).all() and (token_ids(1, 128) == a).all()
