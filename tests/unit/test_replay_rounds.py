"""The replay's interleaved rounds (median and spread, ratios to round-robin) and its dispatch analysis."""

from __future__ import annotations

import pytest

from dynamo_grpc.bench.replay import spread, spread_table
from dynamo_grpc.bench.replay_dispatch import dispatch_quality
from dynamo_grpc.bench.replay_metrics import RequestRecord


def _summary(p50: float, p99: float, hit: float = 0.0) -> dict[str, object]:
    return {
        "ttft_s": {"p50": p50, "p99": p99},
        "e2e_s": {"p50": 2 * p50},
        "prefix_cache": {"hit_rate": hit},
    }


def test_spread_gives_each_round_the_median_and_ratios_to_round_robin() -> None:
    rounds = [
        {"kv": _summary(1.0, 4.0), "round-robin": _summary(2.0, 4.0)},
        {"kv": _summary(2.0, 5.0), "round-robin": _summary(3.0, 4.0)},
        {"kv": _summary(1.5, 8.0), "round-robin": _summary(6.0, 4.0)},
    ]
    sp = spread(rounds)
    kv = sp["kv"]
    assert kv["ttft_p50_s"] == {"rounds": [1.0, 2.0, 1.5], "median": 1.5, "min": 1.0, "max": 2.0}
    ratio = kv["round_robin_over_this_ttft_p50_s"]
    assert ratio["rounds"] == pytest.approx([2.0, 1.5, 4.0]) and ratio["median"] == pytest.approx(2.0)
    assert kv["round_robin_over_this_ttft_p99_s"]["median"] == pytest.approx(0.8)  # worse than RR at p99
    assert "round_robin_over_this_ttft_p50_s" not in sp["round-robin"]
    table = spread_table(sp)
    assert "| kv | 1.50 [1.00–2.00] |" in table and "| 2.00 [1.50–4.00] |" in table


def _rec(i: int, sent: float, first: float, worker: str, prompt: int = 1000, cached: int = 0) -> RequestRecord:
    r = RequestRecord(i, sent, sent_s=sent)
    r.first_token_s, r.end_s, r.worker_id = first, first + 0.1, worker
    r.prompt_tokens, r.cached_tokens = prompt, cached
    return r


def test_dispatch_quality_counts_decisions_onto_a_longer_prefill_backlog() -> None:
    # a is still prefilling 1000 tokens when c is sent to it; b was idle: one decision with excess 1000
    recs = [_rec(0, 0.0, 5.0, "a"), _rec(1, 0.0, 0.5, "b"), _rec(2, 1.0, 6.0, "a")]
    q = dispatch_quality(recs, ["a", "b"])
    assert q["decisions"] == 3 and q["mean_excess_tokens"] == pytest.approx(1000 / 3)
    assert q["share_with_excess"] == pytest.approx(1 / 3) and q["share_over_8192"] == 0
    # sending it to the idle worker instead: no excess; cached tokens are not backlog
    recs[2] = _rec(2, 1.0, 1.5, "b")
    assert dispatch_quality(recs, ["a", "b"])["share_with_excess"] == 0
    recs = [_rec(0, 0.0, 5.0, "a", cached=1000), _rec(1, 1.0, 6.0, "a")]
    assert dispatch_quality(recs, ["a", "b"])["mean_excess_tokens"] == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rounds", "0"], "--rounds must be positive"),
        (["--routers", "kv,fastest"], "--routers: unknown fastest"),
        (["--variant", "kv=--router-temperature=1"], "expected LABEL=FLAGS with a new label"),
        (["--variant", "nolabel"], "expected LABEL=FLAGS"),
    ],
)
def test_replay_refuses_bad_rounds_routers_and_variants(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from dynamo_grpc.bench.replay import main

    with pytest.raises(SystemExit) as e:
        main(["--trace", "unused.csv", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_variant_runs_even_when_routers_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """`--routers kv,round-robin --variant kv-prev=...` runs kv-prev too (it was dropped without a word)."""
    from dynamo_grpc.bench import replay

    def stop(*_: object, **__: object) -> None:
        raise RuntimeError("stop before the mesh")

    monkeypatch.setattr(replay, "load_trace", stop)
    seen: list[list[str]] = []
    real = replay.ReplayConfig

    def capture(**kw: object) -> object:
        seen.append(list(kw["routers"]))  # type: ignore[call-overload]
        return real(**kw)  # type: ignore[arg-type]

    monkeypatch.setattr(replay, "ReplayConfig", capture)
    with pytest.raises(RuntimeError):
        replay.main(["--trace", "t.csv", "--routers", "kv,round-robin", "--variant", "kv-prev=--router-temperature=1"])
    assert seen == [["kv", "round-robin", "kv-prev"]]
