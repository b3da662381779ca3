"""What each routing decision walked into: the chosen worker's prefill backlog against the best one's.

From the replay's own records (send time, first-token time, prompt and cached tokens, serving worker)
the backlog of a worker at an instant is the uncached prompt tokens of the requests sent to it that had
not yet produced their first token: the prefill work a new request queues behind. For every decision
this compares the chosen worker's backlog with the smallest among all workers. A router that balances
load well rarely picks a worker with a much larger backlog than the best; that is how docs/router.md
explains why the KV router once lost to round-robin on traces without reuse.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

from dynamo_grpc.bench.replay_metrics import RequestRecord


def dispatch_quality(records: Sequence[RequestRecord], workers: Sequence[str]) -> dict[str, Any]:
    """Per decision: chosen worker's prefill backlog (uncached tokens still waiting for a first token)
    minus the least-backlogged worker's. Returns the mean excess, the share of decisions with any excess,
    and the share with more than one 8192-token engine step of excess."""
    ok = [r for r in records if r.ok and r.worker_id and not math.isnan(r.sent_s)]
    names = sorted(set(workers) | {r.worker_id for r in ok if r.worker_id})
    if not ok or len(names) < 2:
        return {"decisions": len(ok), "mean_excess_tokens": None, "share_with_excess": None, "share_over_8192": None}
    per: dict[str, list[tuple[float, float, int]]] = {w: [] for w in names}
    for r in ok:
        uncached = max(r.prompt_tokens - (r.cached_tokens or 0), 0)
        per[str(r.worker_id)].append((r.sent_s, r.first_token_s, uncached))
    starts = {w: sorted(v) for w, v in per.items()}
    keys = {w: [s for s, _, _ in v] for w, v in starts.items()}

    def backlog(w: str, t: float) -> int:
        v = starts[w]
        i = bisect.bisect_left(keys[w], t)  # requests sent strictly before t
        return sum(u for s, f, u in v[:i] if f > t)

    excess: list[int] = []
    for r in ok:
        loads = {w: backlog(w, r.sent_s) for w in names}
        excess.append(loads[str(r.worker_id)] - min(loads.values()))
    n = len(excess)
    return {
        "decisions": n,
        "mean_excess_tokens": sum(excess) / n,
        "share_with_excess": sum(1 for e in excess if e > 0) / n,
        "share_over_8192": sum(1 for e in excess if e > 8192) / n,
    }
