"""Per-request records of a replay and the report built from them.

Latencies are measured on the wall clock and reported in *trace seconds* (wall × speedup): the mocker's
timing model is divided by the same speedup as the arrivals, so wall × speedup is the latency the trace's
users would have seen. Raw wall figures are kept alongside. Fixed per-request overheads (gRPC hops,
Python) are multiplied too, so high speedups overstate small latencies; the report says which speedup ran.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass(slots=True)
class RequestRecord:
    """What one replayed request did. Times are ``time.perf_counter()`` seconds."""

    index: int
    scheduled_s: float  # when the trace said to send it (relative to the replay's start)
    sent_s: float = math.nan
    first_token_s: float = math.nan
    end_s: float = math.nan
    prompt_tokens: int = 0
    expected_output_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int | None = None  # None: the frontend did not say
    worker_id: str | None = None
    error: str | None = None
    #: arrival time of each streamed response and how many tokens it carried (for ITL)
    chunks: list[tuple[float, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None and not math.isnan(self.end_s)

    @property
    def ttft(self) -> float:
        return self.first_token_s - self.sent_s

    @property
    def e2e(self) -> float:
        return self.end_s - self.sent_s

    @property
    def itl(self) -> float:
        """Mean inter-token latency: decode time over generated tokens after the first (nan for one token)."""
        if self.output_tokens < 2:
            return math.nan
        return (self.end_s - self.first_token_s) / (self.output_tokens - 1)


def percentiles(values: Iterable[float], scale: float = 1.0) -> dict[str, float | None]:
    """p50/p90/p99 and mean of the finite values (None when there are none)."""
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64) * scale
    out: dict[str, float | None] = {}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(arr, p)) if arr.size else None
    out["mean"] = float(arr.mean()) if arr.size else None
    out["n"] = int(arr.size)
    return out


def coefficient_of_variation(values: Sequence[float]) -> float | None:
    """std/mean (population) of per-worker counts; None for fewer than one worker or a zero mean."""
    if not values:
        return None
    arr = np.asarray(values, dtype=np.float64)
    mean = float(arr.mean())
    return float(arr.std() / mean) if mean > 0 else None


def load_balance(records: Sequence[RequestRecord], workers: Sequence[str]) -> dict[str, object]:
    """Requests and prefill tokens (prompt − cached) per worker, with their coefficient of variation.

    ``workers`` lists every worker in the mesh, so an idle one counts as zero rather than vanishing.
    """
    done = [r for r in records if r.ok and r.worker_id]
    reqs: Counter[str] = Counter({w: 0 for w in workers})
    prefill: Counter[str] = Counter({w: 0 for w in workers})
    for r in done:
        assert r.worker_id is not None
        reqs[r.worker_id] += 1
        prefill[r.worker_id] += r.prompt_tokens - (r.cached_tokens or 0)
    names = sorted(reqs)
    return {
        "known": len(done),
        "requests_per_worker": {w: reqs[w] for w in names},
        "prefill_tokens_per_worker": {w: prefill[w] for w in names},
        "requests_cv": coefficient_of_variation([reqs[w] for w in names]),
        "prefill_tokens_cv": coefficient_of_variation([prefill[w] for w in names]),
    }


def summarize(
    records: Sequence[RequestRecord],
    speedup: float,
    workers: Sequence[str],
    bound: float | None,
) -> dict[str, object]:
    """The report of one run: latency percentiles, throughput, hit rate versus the bound, balance."""
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    errors = Counter((r.error or "unfinished").split(":", 1)[0] for r in failed)
    out_tok = sum(r.output_tokens for r in ok)
    prompt_tok = sum(r.prompt_tokens for r in ok)
    with_cache = [r for r in ok if r.cached_tokens is not None]
    cached = sum(r.cached_tokens or 0 for r in with_cache)
    cached_prompt = sum(r.prompt_tokens for r in with_cache)
    if ok:
        start = min(r.sent_s for r in ok)
        span_wall = max(r.end_s for r in ok) - start
    else:
        span_wall = 0.0
    span_trace = span_wall * speedup
    hit = cached / cached_prompt if cached_prompt else None
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(failed),
        "errors": dict(errors),
        # one message per kind, so a failed run says why without its logs
        "error_examples": {k: next(r.error for r in failed if (r.error or "unfinished").startswith(k)) for k in errors},
        "latency_unit": "trace seconds (wall seconds x speedup)",
        "ttft_s": percentiles((r.ttft for r in ok), speedup),
        "itl_s": percentiles((r.itl for r in ok), speedup),
        "e2e_s": percentiles((r.e2e for r in ok), speedup),
        "wall": {
            "ttft_s": percentiles(r.ttft for r in ok),
            "itl_s": percentiles(r.itl for r in ok),
            "e2e_s": percentiles(r.e2e for r in ok),
            "duration_s": span_wall,
            "send_lag_s": percentiles(r.sent_s - r.scheduled_s for r in records if math.isfinite(r.sent_s)),
            "max_send_lag_s": max((r.sent_s - r.scheduled_s for r in records if math.isfinite(r.sent_s)), default=0.0),
        },
        "throughput": {
            "duration_trace_s": span_trace,
            "requests_per_s": len(ok) / span_trace if span_trace > 0 else None,
            "output_tokens_per_s": out_tok / span_trace if span_trace > 0 else None,
            "prompt_tokens_per_s": prompt_tok / span_trace if span_trace > 0 else None,
        },
        "output_tokens": {"total": out_tok, "short": sum(1 for r in ok if r.output_tokens < r.expected_output_tokens)},
        "prefix_cache": {
            "prompt_tokens": cached_prompt,
            "cached_tokens": cached,
            "hit_rate": hit,
            "infinite_cache_bound": bound,
            "gap_points": 100.0 * (bound - hit) if (hit is not None and bound is not None) else None,
            "requests_reporting": len(with_cache),
        },
        "load_balance": load_balance(ok, workers),
    }


def markdown_table(runs: dict[str, dict[str, Any]]) -> str:
    """The side-by-side table docs/benchmarks.md shows, from a report's ``runs``."""

    def f(x: float | None, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
        return "–" if x is None else fmt.format(x * scale)

    head = (
        "| router | TTFT p50 / p90 / p99 (s) | ITL p50 (ms) | E2E p50 / p99 (s) | prefix hit | bound "
        "| CV requests / prefill tokens | done |\n|---|---|---|---|---|---|---|---|"
    )
    rows = [head]
    for name, r in runs.items():
        t, i, e, pc, lb = r["ttft_s"], r["itl_s"], r["e2e_s"], r["prefix_cache"], r["load_balance"]
        rows.append(
            f"| {name} | {f(t['p50'])} / {f(t['p90'])} / {f(t['p99'])} | {f(i['p50'], 1000, '{:.0f}')} "
            f"| {f(e['p50'])} / {f(e['p99'])} | {f(pc['hit_rate'], 100, '{:.1f} %')} "
            f"| {f(pc['infinite_cache_bound'], 100, '{:.1f} %')} "
            f"| {f(lb['requests_cv'])} / {f(lb['prefill_tokens_cv'])} | {r['completed']}/{r['requests']} |"
        )
    return "\n".join(rows)
