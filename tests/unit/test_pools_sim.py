"""`bench pools-sim`: bench pools' layouts in simulated time through the real GlobalRouter."""

from __future__ import annotations

import json
from pathlib import Path

from dynamo_grpc.bench.pools import parse_split
from dynamo_grpc.bench.pools_sim import by_class, main, simulate_layout
from dynamo_grpc.bench.replay_trace import Trace, TraceRequest


def _trace(rows: list[tuple[float, int]]) -> Trace:
    return Trace("t", "azure", tuple(TraceRequest(i, t, n, 2, None) for i, (t, n) in enumerate(rows)), None)


# two 40k prompts fill the long pool, two 5k ones keep the short pool above its accept level, then a 20k prompt
ROWS = [(0.0, 40000), (0.0001, 40000), (0.0002, 5000), (0.0003, 5000), (0.001, 20000)]


def test_each_pool_serves_its_range_and_one_pool_uses_every_worker() -> None:
    reqs, counts = simulate_layout(_trace(ROWS), parse_split("8192"), 4, 65536, 1.0)
    assert [r.worker for r in reqs[:4]] in ([2, 3, 0, 1], [3, 2, 1, 0], [2, 3, 1, 0], [3, 2, 0, 1])
    assert reqs[4].worker in (2, 3) and counts["spilled_in_short"] == 0
    one, _ = simulate_layout(_trace(ROWS), None, 4, 65536, 1.0)
    assert {r.worker for r in one[:4]} == {0, 1, 2, 3}
    assert by_class(one, 8192)["short"]["n"] == 2 and by_class(one, 8192)["long"]["n"] == 3


def test_a_held_long_prompt_takes_the_short_worker_that_frees_first() -> None:
    queued, _ = simulate_layout(_trace(ROWS), parse_split("8192,spill=8192,accept=4096"), 4, 65536, 1.0)
    held, counts = simulate_layout(_trace(ROWS), parse_split("8192,spill=8192,accept=4096,hold=10"), 4, 65536, 1.0)
    # without hold the 20k prompt is committed behind a 40k prefill; held, it spills once the 5k prompts are done
    assert queued[4].worker in (2, 3) and held[4].worker in (0, 1)
    assert counts["held_long"] == 1 and counts["spilled_in_short"] == 1
    assert held[4].first_token - held[4].arrival < 0.7 * (queued[4].first_token - queued[4].arrival)
    assert held[4].first_token > held[2].first_token  # it went only after a short worker finished its prefill


def test_main_writes_the_ratios_per_window(tmp_path: Path) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        + "".join(
            f"2023-11-16 18:15:{i // 10:02d}.{i % 10}000000,{40000 if i % 3 == 0 else 3000},4\n" for i in range(40)
        )
    )
    out = tmp_path / "ps.json"
    assert (
        main(
            [
                "--trace",
                str(trace),
                "--split",
                "8192,spill=8192,hold=2",
                "--limit",
                "20",
                "--windows",
                "2",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    rep = json.loads(out.read_text())
    s = rep["summary"]["8192,spill=8192,hold=2"]
    assert rep["windows"][1]["layouts"]["8192,spill=8192,hold=2"]["layout"] == "split@8192,spill=8192,hold=2"
    assert len(s["short_p99_one_over_split"]["windows"]) == 2 and s["long_p50_split_over_one"]["median"] > 0
