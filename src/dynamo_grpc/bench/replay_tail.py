"""Why the slowest requests were slow: what every worker held when each of them was routed.

From the replay's records (send, first-token and end times, prompt and cached tokens, serving worker)
this rebuilds, at each decision, the load the router's own accounting held per worker — prefill
pending (uncached prompt tokens of requests sent there and not yet answered by a first token: the
router adds them at Route and drops them at PREFILL_DONE, which the frontend sends on that first
token) and decoding (requests past their first token and not yet ended: the router's decode blocks,
freed at FREE) — and compares the chosen worker with the others. A decision *waited on avoidable
prefill* when its worker had prefill pending while another had none: on a trace without reuse that is
a whole extra prefill step (≈ 0.1 trace-s per 1,000 tokens on the mocker) added to its TTFT, where a
worker with more sequences decoding adds next to nothing to it. docs/router.md ("Tail latency on
traces without reuse") is what these figures showed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

from dynamo_grpc.bench.replay_metrics import RequestRecord


def _uncached(r: RequestRecord) -> int:
    return max(r.prompt_tokens - (r.cached_tokens or 0), 0)


def loads_at(ok: Sequence[RequestRecord], names: Sequence[str], t: float, skip: int) -> dict[str, dict[str, int]]:
    """Per worker at instant ``t`` (``skip``: the request being decided, not yet counted)."""
    out = {w: {"prefill_tokens": 0, "prefilling": 0, "decoding": 0, "decoding_tokens": 0} for w in names}
    for r in ok:
        if r.index == skip or not r.sent_s < t:
            continue
        w = out[str(r.worker_id)]
        if r.first_token_s > t:
            w["prefill_tokens"] += _uncached(r)
            w["prefilling"] += 1
        elif r.end_s > t:
            w["decoding"] += 1
            w["decoding_tokens"] += r.prompt_tokens + r.output_tokens
    return out


def tail_analysis(
    records: Sequence[RequestRecord], workers: Sequence[str], speedup: float = 1.0, tail: float = 0.01
) -> dict[str, Any]:
    """The share of decisions that waited on avoidable prefill, overall and among the slowest ``tail``
    of requests by TTFT, and for those slowest ones what each worker held (TTFT in trace seconds)."""
    ok = [r for r in records if r.ok and r.worker_id and not math.isnan(r.sent_s)]
    names = sorted(set(workers) | {str(r.worker_id) for r in ok})
    if not ok or len(names) < 2:
        return {"decisions": len(ok), "share_avoidable_prefill_wait": None, "slowest": []}

    def avoidable(loads: dict[str, dict[str, int]], chosen: str) -> bool:
        return loads[chosen]["prefill_tokens"] > 0 and any(v["prefill_tokens"] == 0 for v in loads.values())

    per_decision = [(r, loads_at(ok, names, r.sent_s, r.index)) for r in ok]
    waited = [avoidable(loads, str(r.worker_id)) for r, loads in per_decision]
    n_tail = max(1, round(len(ok) * tail))
    order = sorted(range(len(ok)), key=lambda i: ok[i].ttft, reverse=True)[:n_tail]
    slowest = []
    for i in order:
        r, loads = per_decision[i]
        slowest.append(
            {
                "index": r.index,
                "ttft_s": r.ttft * speedup,
                "prompt_tokens": r.prompt_tokens,
                "worker": r.worker_id,
                "avoidable_prefill_wait": waited[i],
                "loads": loads,
            }
        )
    return {
        "decisions": len(ok),
        "share_avoidable_prefill_wait": sum(waited) / len(ok),
        "tail_requests": n_tail,
        "tail_share_avoidable_prefill_wait": sum(waited[i] for i in order) / n_tail,
        "tail_mean_prompt_tokens": sum(ok[i].prompt_tokens for i in order) / n_tail,
        "slowest": slowest,
    }


def router_view(log_lines: Iterable[str]) -> dict[str, Any] | None:
    """The same question from the router's side: its decision log (``dynamo_grpc.router.decisions`` at
    DEBUG, `bench replay --log-dir DIR --frontend-arg=--log-level=info,dynamo_grpc.router.decisions=debug`)
    gives, per decision, the prefill and decode blocks it believed each rank held. None when the log has none.

    ``share_avoidable_prefill_wait``: decisions onto a rank with prefill pending while another had none, in
    the router's own accounting (the client-side figure adds the timing skew of a loaded box);
    ``mean_decode_gap_blocks`` on those: how many more decode blocks the avoided ranks held (what the
    cost traded the wait for)."""
    n = avoid = 0
    gaps: list[float] = []
    for line in log_lines:
        if _DECISIONS not in line or '"ranks"' not in line:
            continue
        d = json.loads(line[line.index("{") :])
        ranks: dict[str, list[float]] = d["ranks"]
        chosen = ranks[d["chosen"]]
        n += 1
        idle = [v for v in ranks.values() if v[0] == 0]
        if chosen[0] > 0 and idle:
            avoid += 1
            gaps.append(min(v[1] for v in idle) - chosen[1])
    if not n:
        return None
    return {
        "decisions": n,
        "share_avoidable_prefill_wait": avoid / n,
        "mean_decode_gap_blocks": sum(gaps) / len(gaps) if gaps else None,
    }


_DECISIONS = "dynamo_grpc.router.decisions"
