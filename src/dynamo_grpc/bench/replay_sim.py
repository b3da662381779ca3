"""Trace replay in simulated time: the real router against engines stepped by the mocker's timing model.

`bench replay` runs a real mesh, so on a shared 2-core box its TTFTs move 2–10× between rounds with the
machine's load, far more than a routing rule changes them (docs/router.md, "Tail latency on traces
without reuse"). This replays the same trace slice with no processes and no clock: the same
:class:`~dynamo_grpc.router.router.Router` (cost, busy threshold, predicted prefixes, its own active
accounting fed by PREFILL_DONE at the first token and FREE at the last) routes each request at its arrival,
and each worker is a continuous-batching engine stepped as the mocker steps (vLLM v1 order: running
requests first, then FCFS admissions, 8192 tokens a step; step time from
``engines/mocker/timing.py``; prefix cache of ``--num-gpu-blocks`` blocks, LRU, whose stores and evictions
reach the router's index at once, as KV events would without lag). What it leaves out — gRPC hops, event
lag, the frontend's CPU — is what the real replay measures; what it keeps is what routing decides.
Results are deterministic: one run per router, no rounds needed.
"""

from __future__ import annotations

import argparse
import heapq
import math
import statistics
import sys
from collections import OrderedDict, deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from dynamo_grpc.bench.output import default_results_dir, save_plot
from dynamo_grpc.bench.replay import capped, compact_json
from dynamo_grpc.bench.replay_bound import infinite_cache_bound
from dynamo_grpc.bench.replay_tokens import DEFAULT_LOW_ID, DEFAULT_VOCAB_SIZE, prompt_tokens
from dynamo_grpc.bench.replay_trace import Trace, load_trace
from dynamo_grpc.engines.mocker.timing import TimingModel
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.flags import add_router_flags, router_config_from_args
from dynamo_grpc.router.router import RouteInput, Router, WorkerInfo
from dynamo_grpc.tokens.block_hash import block_hash_list

MAX_BATCHED_TOKENS = 8192


@dataclass
class SimRequest:
    index: int
    arrival: float
    hashes: list[int]
    prompt: int
    output: int
    rid: str
    to_prefill: int = 0
    cached: int = 0
    generated: int = 0
    first_token: float = math.nan
    end: float = math.nan
    worker: int = -1
    #: routed onto a worker with prefill still to do while another had none
    avoidable: bool = False


@dataclass
class SimEngine:
    """One worker: waiting queue, running batch, an LRU prefix cache of block hashes."""

    index: int
    num_blocks: int
    cache: OrderedDict[int, None] = field(default_factory=OrderedDict)
    waiting: deque[SimRequest] = field(default_factory=deque)
    running: list[SimRequest] = field(default_factory=list)
    busy_until: float = -1.0
    held_blocks: int = 0
    #: the step in flight: each request and the tokens it gets in it
    plan: list[tuple[SimRequest, int]] = field(default_factory=list)

    def pending_prefill(self) -> int:
        """Prompt tokens queued or mid-prefill here (what a new request would wait behind)."""
        return sum(r.prompt for r in self.waiting) + sum(r.to_prefill for r in self.running)

    def cached_prefix(self, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self.cache:
                break
            self.cache.move_to_end(h)
            n += 1
        return n

    def store(self, hashes: list[int]) -> list[int]:
        """Cache ``hashes``; returns the evicted ones (LRU past the capacity)."""
        for h in hashes:
            self.cache[h] = None
            self.cache.move_to_end(h)
        evicted = []
        while len(self.cache) > self.num_blocks:
            evicted.append(self.cache.popitem(last=False)[0])
        return evicted


def _blocks(tokens: int, bs: int) -> int:
    return -(-tokens // bs)


class SimRouting(Protocol):
    """Where :func:`run_engines` sends a request and what it tells the routing side as engines progress."""

    def route(self, req: SimRequest, now: float) -> int | None:
        """The worker to queue ``req`` on, or None to hold it (:meth:`release` hands it out later)."""

    def stored(self, worker: int, hashes: list[int], evicted: list[int]) -> None:
        """A worker cached ``hashes`` (at its first token) and evicted ``evicted``: the KV events."""

    def prefill_done(self, req: SimRequest) -> None: ...

    def free(self, req: SimRequest) -> None: ...

    def release(self, now: float) -> list[tuple[SimRequest, int]]:
        """Held requests that go now, and where (called after every event)."""


#: held requests are offered again after every event (each engine step ends one); this extra wake, this long
#: after a hold, covers a hold made while no engine has a step in flight
HOLD_WAKE_S = 0.05


def simulate(
    trace: Trace,
    config: RouterConfig,
    workers: int,
    block_size: int = 64,
    num_gpu_blocks: int = 16384,
    rate_scale: float = 1.0,
    salt: int = 0,
) -> list[SimRequest]:
    """Replay ``trace`` through a router built from ``config`` over ``workers`` simulated engines."""
    router = Router(config)
    router.set_workers([WorkerInfo(f"w{i}", f"sim:{i}", "m", block_size, 1, num_gpu_blocks) for i in range(workers)])
    router.ready = True
    clock = [0.0]  # the router's TTLs (predicted prefixes, approximate index, active sequences) run on sim time
    for part in (router.predicted, router.approx, router.active):
        if part is not None:
            part.clock = lambda: clock[0]
    return run_engines(
        sim_requests(trace, block_size, rate_scale, salt),
        _OneRouter(router),
        workers,
        block_size,
        num_gpu_blocks,
        clock,
    )


class _OneRouter:
    """SimRouting over one KV Router of every worker."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def route(self, req: SimRequest, now: float) -> int | None:
        inp = RouteInput(req.rid, token_ids=[], block_hashes=req.hashes, expected_output_tokens=req.output)
        return int(self.router.route(inp).instance_id[1:])

    def stored(self, worker: int, hashes: list[int], evicted: list[int]) -> None:
        self.router.indexer.store((f"w{worker}", 0), hashes)
        if evicted:
            self.router.indexer.remove((f"w{worker}", 0), evicted)

    def prefill_done(self, req: SimRequest) -> None:
        self.router.prefill_done(req.rid, output_tokens=1)

    def free(self, req: SimRequest) -> None:
        self.router.free(req.rid)

    def release(self, now: float) -> list[tuple[SimRequest, int]]:
        return []


def sim_requests(trace: Trace, block_size: int = 64, rate_scale: float = 1.0, salt: int = 0) -> list[SimRequest]:
    """The trace's requests with the replay's own prompt tokens (so hashes and lengths match `bench replay`)."""
    reqs = []
    for t in trace.requests:
        toks = prompt_tokens(t, trace.hash_block_size, DEFAULT_VOCAB_SIZE, DEFAULT_LOW_ID, salt)
        hashes = block_hash_list(toks, block_size)
        reqs.append(SimRequest(t.index, t.arrival_s / rate_scale, hashes, int(toks.size), max(t.output_length, 1), ""))
    return reqs


def run_engines(
    reqs: list[SimRequest],
    routing: SimRouting,
    workers: int,
    block_size: int,
    num_gpu_blocks: int,
    clock: list[float],
) -> list[SimRequest]:
    """Step ``workers`` engines through ``reqs`` in simulated time; ``clock[0]`` follows it."""
    timing = TimingModel(1.0)
    engines = [SimEngine(i, num_gpu_blocks) for i in range(workers)]
    events: list[tuple[float, int, int, int]] = []  # (time, kind 0=step end 1=arrival 2=wake, seq, id)
    seq = 0
    for q in reqs:
        heapq.heappush(events, (q.arrival, 1, seq, q.index))
        seq += 1
    by_index = {r.index: r for r in reqs}

    def start_step(e: SimEngine, now: float) -> None:
        nonlocal seq
        if e.busy_until > now or not (e.running or e.waiting):
            return
        budget = MAX_BATCHED_TOKENS
        prefill_tokens = decodes = 0
        plan: list[tuple[SimRequest, int]] = []
        for r in e.running:
            if budget <= 0:
                break
            if r.to_prefill > 0:
                n = min(r.to_prefill, budget)
                prefill_tokens += n
            else:
                n = 1
                decodes += 1
            budget -= n
            plan.append((r, n))
        while e.waiting and budget > 0:
            r = e.waiting.popleft()
            r.cached = min(e.cached_prefix(r.hashes), (r.prompt - 1) // block_size) * block_size
            r.to_prefill = r.prompt - r.cached
            e.held_blocks += _blocks(r.prompt + r.output, block_size)
            n = min(r.to_prefill, budget)
            prefill_tokens += n
            budget -= n
            e.running.append(r)
            plan.append((r, n))
        dt = timing.step_seconds(prefill_tokens, decodes, min(e.held_blocks / e.num_blocks, 1.0))
        e.busy_until = now + dt
        e.plan = plan
        heapq.heappush(events, (e.busy_until, 0, seq, e.index))
        seq += 1

    def end_step(e: SimEngine, now: float) -> None:
        for r, n in e.plan:
            if r.to_prefill > 0:
                r.to_prefill -= n
                if r.to_prefill > 0:
                    continue
                r.first_token, r.generated = now, 1
                full = r.hashes[: r.prompt // block_size]
                routing.stored(e.index, full, e.store(full))
                routing.prefill_done(r)
            else:
                r.generated += 1
            if r.generated >= r.output:
                r.end = now
                e.running.remove(r)
                e.held_blocks -= _blocks(r.prompt + r.output, block_size)
                routing.free(r)
        e.plan = []

    def enqueue(a: SimRequest, w: int, now: float) -> None:
        a.worker = w
        pending = [x.pending_prefill() for x in engines]
        a.avoidable = pending[w] > 0 and min(pending) == 0
        engines[w].waiting.append(a)
        start_step(engines[w], now)

    while events:
        now, kind, _, ident = heapq.heappop(events)
        clock[0] = now
        if kind == 1:
            a = by_index[ident]
            a.rid = f"sim-{a.index}"
            w = routing.route(a, now)
            if w is None:
                heapq.heappush(events, (now + HOLD_WAKE_S, 2, seq, a.index))
                seq += 1
            else:
                enqueue(a, w, now)
        elif kind == 0:
            e = engines[ident]
            end_step(e, now)
            start_step(e, now)
        for a, w in routing.release(now):
            enqueue(a, w, now)
    return reqs


def _pct(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(int(q * len(s)), len(s) - 1)]


def summarize_sim(reqs: list[SimRequest], workers: int) -> dict[str, Any]:
    ttft = [r.first_token - r.arrival for r in reqs]
    prompt = sum(r.prompt for r in reqs)
    per = [sum(1 for r in reqs if r.worker == w) for w in range(workers)]
    mean = statistics.mean(per)
    return {
        "requests": len(reqs),
        "ttft_s": {
            "p50": _pct(ttft, 0.5),
            "p90": _pct(ttft, 0.9),
            "p99": _pct(ttft, 0.99),
            "mean": statistics.mean(ttft),
        },
        "e2e_s": {"p50": _pct([r.end - r.arrival for r in reqs], 0.5)},
        "hit_rate": sum(r.cached for r in reqs) / prompt if prompt else 0.0,
        "share_avoidable_prefill_wait": sum(r.avoidable for r in reqs) / len(reqs),
        "requests_cv": statistics.pstdev(per) / mean if mean else 0.0,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynamo-grpc bench replay-sim",
        description="Replay a trace in simulated time: the real router over engines stepped by the mocker's "
        "timing model (no processes, no noise); compares round-robin, KV routing and --variant costs.",
    )
    p.add_argument("--trace", required=True, help="trace file (Mooncake JSONL or Azure CSV)")
    p.add_argument("--limit", type=int, default=None, help="the first N requests (after --offset)")
    p.add_argument(
        "--offset",
        type=int,
        default=0,
        help="skip this many requests first (another window of the trace, its arrivals re-based to 0)",
    )
    p.add_argument(
        "--windows",
        type=int,
        default=1,
        help="also replay the next windows of --limit requests (the spread of the RR/KV ratios over them)",
    )
    p.add_argument("--workers", type=int, default=4, help="simulated workers (default 4)")
    p.add_argument("--rate-scale", type=float, default=1.0, help="multiply the request rate (default 1)")
    p.add_argument("--max-output-tokens", type=int, default=None, help="cap each request's output length")
    p.add_argument("--num-gpu-blocks", type=int, default=16384, help="KV blocks per worker (the mocker's default)")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=FLAGS",
        help="also run KV routing under LABEL with these router flags (space-separated), e.g. "
        "'kv-prev=--router-prefill-load-scale=2'",
    )
    p.add_argument("--json", type=Path, default=default_results_dir() / "replay_sim.json", help="write the report here")
    return p


def window(trace: Trace, offset: int, limit: int | None) -> Trace:
    """Requests ``offset`` .. ``offset + limit`` of ``trace``, renumbered, arrivals re-based to the first."""
    reqs = trace.requests[offset : None if limit is None else offset + limit]
    if not reqs:
        raise SystemExit(f"--offset {offset}: the trace has only {len(trace.requests)} requests")
    t0 = reqs[0].arrival_s
    out = tuple(replace(r, index=i, arrival_s=r.arrival_s - t0) for i, r in enumerate(reqs))
    return Trace(trace.path, trace.fmt, out, trace.hash_block_size)


def _config(flags: list[str]) -> RouterConfig:
    rp = argparse.ArgumentParser()
    add_router_flags(rp)
    cfg = router_config_from_args(rp.parse_args(flags))
    cfg.block_size = 64
    cfg.seed = 0 if cfg.seed is None else cfg.seed
    return cfg


def _run_window(trace: Trace, setups: dict[str, list[str]], args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """Every router setup over one window: (summaries, TTFTs per setup)."""
    runs: dict[str, Any] = {}
    ttfts: dict[str, list[float]] = {}
    for name, flags in setups.items():
        reqs = simulate(trace, _config(flags), args.workers, 64, args.num_gpu_blocks, args.rate_scale)
        ttfts[name] = [r.first_token - r.arrival for r in reqs]
        runs[name] = {"flags": flags, **summarize_sim(reqs, args.workers)}
    rr = runs["round-robin"]["ttft_s"]
    for s in runs.values():
        s["round_robin_over_this"] = {q: rr[q] / s["ttft_s"][q] for q in ("p50", "p99")}
    return runs, ttfts


def _spread(windows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per setup: RR/this at p50 and p99 over the windows (median, min, max) and how many were within 5 %."""
    out: dict[str, Any] = {}
    for name in windows[0]["runs"]:
        figs: dict[str, Any] = {}
        for q in ("p50", "p99"):
            v = [w["runs"][name]["round_robin_over_this"][q] for w in windows]
            figs[f"round_robin_over_this_{q}"] = {
                "windows": v,
                "median": statistics.median(v),
                "min": min(v),
                "max": max(v),
                "within_5_percent": sum(1 for x in v if x >= 1 / 1.05),
            }
        out[name] = figs
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.offset < 0 or args.windows < 1:
        raise SystemExit("--offset must be >= 0 and --windows >= 1")
    if args.windows > 1 and args.limit is None:
        raise SystemExit("--windows needs --limit (the window length)")
    full = load_trace(args.trace)
    setups: dict[str, list[str]] = {"round-robin": ["--router-mode", "round-robin"], "kv": []}
    for v in args.variant:
        label, _, flags = v.partition("=")
        setups[label] = flags.split()
    windows: list[dict[str, Any]] = []
    first: tuple[Trace, float, Any] | None = None
    for w in range(args.windows):
        offset = args.offset + w * (args.limit or 0)
        trace = capped(window(full, offset, args.limit), None, args.max_output_tokens)
        bound = infinite_cache_bound(trace, 64).engine_token_weighted
        runs, ttfts = _run_window(trace, setups, args)
        windows.append({"offset": offset, "requests": len(trace.requests), "infinite_cache_bound": bound, "runs": runs})
        first = first or (trace, bound, ttfts)
        for name, s in runs.items():
            print(
                f"[{offset}] {name}: TTFT p50 {s['ttft_s']['p50']:.3f} p99 {s['ttft_s']['p99']:.3f} trace-s, "
                f"hit rate {s['hit_rate']:.3f}, avoidable prefill waits {s['share_avoidable_prefill_wait']:.3f}",
                file=sys.stderr,
            )
    assert first is not None
    trace, bound, ttfts = first
    report: dict[str, Any] = {
        "benchmark": "replay-sim",
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}},
        "trace": {"path": str(args.trace), "requests": len(trace.requests), "infinite_cache_bound": bound},
        "runs": windows[0]["runs"],
    }
    if args.windows > 1:
        report["windows"] = windows
        report["spread"] = _spread(windows)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(compact_json(report))
    print(f"wrote {args.json}", file=sys.stderr)
    shaped = {  # the real replay's summary shape, for its plot (the first window)
        n: {
            "ttft_s": s["ttft_s"],
            "prefix_cache": {"hit_rate": s["hit_rate"], "infinite_cache_bound": bound},
            "load_balance": {"requests_cv": s["requests_cv"]},
        }
        for n, s in report["runs"].items()
    }
    title = (
        f"simulated time: {Path(args.trace).name}, {len(trace.requests)} requests from #{args.offset}, "
        f"{args.workers} workers, rate x{args.rate_scale:g}"
    )

    def draw(png: Path) -> None:
        from dynamo_grpc.bench.replay_plot import plot_replay  # matplotlib: the optional `plot` extra

        plot_replay(ttfts, shaped, png, title)

    png = save_plot(draw, args.json.with_suffix(".png"))
    if png is not None:
        print(f"wrote {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
