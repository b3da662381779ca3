"""The replay's tail analysis: what each worker held when the slowest requests were routed."""

from __future__ import annotations

import pytest

from dynamo_grpc.bench.replay_metrics import RequestRecord
from dynamo_grpc.bench.replay_tail import router_view, tail_analysis


def _rec(i: int, sent: float, first: float, end: float, worker: str, prompt: int = 1000) -> RequestRecord:
    r = RequestRecord(i, sent, sent_s=sent)
    r.first_token_s, r.end_s, r.worker_id = first, end, worker
    r.prompt_tokens, r.cached_tokens, r.output_tokens = prompt, 0, 10
    return r


def test_a_decision_onto_pending_prefill_while_a_worker_had_none_is_avoidable() -> None:
    recs = [
        _rec(0, 0.0, 0.2, 5.0, "a", prompt=500),  # a: decoding from 0.2 to 5.0
        _rec(1, 1.0, 2.0, 3.0, "b", prompt=4000),  # b: prefilling 4000 tokens from 1.0 to 2.0
        _rec(2, 1.5, 3.5, 4.0, "b", prompt=1000),  # routed behind it although a had no prefill pending
    ]
    t = tail_analysis(recs, ["a", "b"], speedup=2.0, tail=0.34)
    assert t["decisions"] == 3
    assert t["share_avoidable_prefill_wait"] == pytest.approx(1 / 3)
    assert t["tail_requests"] == 1
    slow = t["slowest"][0]
    assert slow["index"] == 2 and slow["ttft_s"] == pytest.approx(4.0) and slow["worker"] == "b"
    assert slow["avoidable_prefill_wait"] is True and t["tail_share_avoidable_prefill_wait"] == 1.0
    assert slow["loads"]["b"] == {"prefill_tokens": 4000, "prefilling": 1, "decoding": 0, "decoding_tokens": 0}
    assert slow["loads"]["a"] == {"prefill_tokens": 0, "prefilling": 0, "decoding": 1, "decoding_tokens": 510}


def test_waiting_is_not_avoidable_when_every_worker_had_prefill_pending() -> None:
    recs = [
        _rec(0, 0.0, 2.0, 3.0, "a"),
        _rec(1, 0.0, 2.0, 3.0, "b"),
        _rec(2, 1.0, 4.0, 5.0, "a"),  # both busy prefilling: no better choice
    ]
    t = tail_analysis(recs, ["a", "b"])
    assert t["share_avoidable_prefill_wait"] == 0
    assert t["slowest"][0]["index"] == 2 and t["slowest"][0]["avoidable_prefill_wait"] is False


def test_failed_requests_and_a_single_worker_give_no_figures() -> None:
    bad = _rec(0, 0.0, 1.0, 2.0, "a")
    bad.error = "UNAVAILABLE"
    assert tail_analysis([bad, _rec(1, 0.0, 1.0, 2.0, "a")], ["a"])["share_avoidable_prefill_wait"] is None


def test_router_view_reads_the_routers_decision_log() -> None:
    log = [
        "2026-12-01 12:00:00,000 INFO dynamo_grpc.frontend: serving",
        '2026-12-01 12:00:01,000 DEBUG dynamo_grpc.router.decisions: {"rid": "a", "t": 1.0, "chosen": "w0/0", '
        '"prompt_blocks": 16, "ranks": {"w0/0": [16.0, 20.0, 1.0], "w1/0": [0.0, 90.0, 3.0]}}',
        '2026-12-01 12:00:01,500 DEBUG dynamo_grpc.router.decisions: {"rid": "b", "t": 1.5, "chosen": "w1/0", '
        '"prompt_blocks": 16, "ranks": {"w0/0": [16.0, 20.0, 1.0], "w1/0": [0.0, 90.0, 3.0]}}',
        '2026-12-01 12:00:02,000 DEBUG dynamo_grpc.router.decisions: {"rid": "a", "t": 2.0, "prefill_done": true}',
    ]
    v = router_view(log)
    assert v == {"decisions": 2, "share_avoidable_prefill_wait": 0.5, "mean_decode_gap_blocks": 70.0}
    assert router_view(log[:1]) is None
