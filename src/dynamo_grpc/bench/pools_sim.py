"""`dynamo-grpc bench pools-sim`: `bench pools`' layouts in simulated time, through the real GlobalRouter.

`bench pools` runs real meshes; on the shared 2-core box its short-request TTFT p99 moves by more between
rounds than the pool options under study change it. This replays the same trace slice with the layouts'
own pools.yaml (parsed by the global router's loader) through :class:`~dynamo_grpc.router.global_router.GlobalRouter`
— its grid, spill-over, prefill-backlog and hold rules, one real KV Router per pool — over engines stepped by
the mocker's timing model (``bench/replay_sim.py``). A held request is offered again after every engine
step, as the service retries on every PREFILL_DONE / FREE. Deterministic: one run per layout; ``--windows``
replays further slices of the trace for a spread. Use it to choose options, then confirm with `bench pools`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from dynamo_grpc.bench.output import default_results_dir, save_plot
from dynamo_grpc.bench.pools import DEFAULT_SPLITS, ONE_POOL, SplitSpec, _plot, parse_split, pools_yaml
from dynamo_grpc.bench.replay import capped, compact_json
from dynamo_grpc.bench.replay_sim import SimRequest, _pct, run_engines, sim_requests, window
from dynamo_grpc.bench.replay_trace import Trace, load_trace
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.global_router import GlobalRouter, Held
from dynamo_grpc.router.pool_config import PoolSpec, parse_pool_config
from dynamo_grpc.router.router import RouteInput, Router, WorkerInfo

BLOCK_SIZE = 64


class PoolsRouting:
    """SimRouting through a GlobalRouter; workers ``w0..`` in pool order (the bench's: short ones first)."""

    def __init__(self, spec: SplitSpec | None, pools: list[str], num_gpu_blocks: int, clock: list[float]) -> None:
        self.pool_of = {f"w{i}": p for i, p in enumerate(pools)}

        def make(ps: PoolSpec) -> Router:
            r = Router(RouterConfig(block_size=BLOCK_SIZE, seed=0, busy_threshold=ps.busy_threshold))
            ids = [w for w, p in self.pool_of.items() if p == ps.name]
            r.set_workers([WorkerInfo(w, f"sim:{w}", "m", BLOCK_SIZE, 1, num_gpu_blocks) for w in ids])
            r.ready = True
            for part in (r.predicted, r.approx, r.active):
                if part is not None:
                    part.clock = lambda: clock[0]
            return r

        self.g = GlobalRouter(parse_pool_config(yaml.safe_load(pools_yaml(spec))), make, clock=lambda: clock[0])
        #: held requests, oldest first
        self.waiting: list[SimRequest] = []

    def _try(self, req: SimRequest) -> int | None:
        inp = RouteInput(req.rid, token_ids=[], block_hashes=req.hashes, expected_output_tokens=req.output)
        try:
            d = self.g.route(inp, hold=True)
        except Held:
            return None
        return int(d.result.instance_id[1:])

    def route(self, req: SimRequest, now: float) -> int | None:
        w = self._try(req)
        if w is None:
            self.waiting.append(req)
        return w

    def release(self, now: float) -> list[tuple[SimRequest, int]]:
        out = []
        for req in list(self.waiting):
            w = self._try(req)
            if w is not None:
                self.waiting.remove(req)
                out.append((req, w))
        return out

    def stored(self, worker: int, hashes: list[int], evicted: list[int]) -> None:
        w = f"w{worker}"
        r = self.g.pools[self.pool_of[w]].router
        r.indexer.store((w, 0), hashes)
        if evicted:
            r.indexer.remove((w, 0), evicted)

    def prefill_done(self, req: SimRequest) -> None:
        self.g.prefill_done(req.rid, output_tokens=1)

    def free(self, req: SimRequest) -> None:
        self.g.free(req.rid)


def simulate_layout(
    trace: Trace, spec: SplitSpec | None, workers: int, num_gpu_blocks: int, rate_scale: float
) -> tuple[list[SimRequest], dict[str, int]]:
    """One layout over ``trace``: the requests (TTFTs in trace seconds) and the requests each pool took by spill."""
    half = workers // 2
    pools = ["all"] * workers if spec is None else ["short"] * half + ["long"] * (workers - half)
    clock = [0.0]
    routing = PoolsRouting(spec, pools, num_gpu_blocks, clock)
    reqs = run_engines(sim_requests(trace, BLOCK_SIZE, rate_scale), routing, workers, BLOCK_SIZE, num_gpu_blocks, clock)
    spilled = {n: ps.counters.spilled_in for n, ps in routing.g.pools.items()}
    held = {n: ps.counters.held for n, ps in routing.g.pools.items()}
    return reqs, {**{f"spilled_in_{n}": v for n, v in spilled.items()}, **{f"held_{n}": v for n, v in held.items()}}


def by_class(reqs: Iterable[SimRequest], split: int) -> dict[str, dict[str, float]]:
    out = {}
    for cls, pick in (("short", lambda n: n < split), ("long", lambda n: n >= split)):
        v = [r.first_token - r.arrival for r in reqs if pick(r.prompt)]
        out[cls] = {
            "n": len(v),
            "p50": _pct(v, 0.5) if v else float("nan"),
            "p99": _pct(v, 0.99) if v else float("nan"),
        }
    return out


def _parser() -> argparse.ArgumentParser:
    from dynamo_grpc.bench.main import default_trace

    trace = default_trace()
    p = argparse.ArgumentParser(
        prog="dynamo-grpc bench pools-sim",
        description="bench pools' layouts in simulated time through the real global router (no processes, no "
        "noise): short requests' TTFT p99 and long ones' TTFT p50, one pool vs each split layout.",
    )
    p.add_argument("--trace", default=str(trace) if trace else None, help="trace file (default: ../shared/traces)")
    p.add_argument("--workers", type=int, default=4, help="simulated workers (split: half per pool; default 4)")
    p.add_argument(
        "--split",
        action="append",
        default=None,
        metavar="SPEC",
        help=f"a layout, as in bench pools; hold=S is in trace seconds here (default: {' '.join(DEFAULT_SPLITS)})",
    )
    p.add_argument("--limit", type=int, default=400, help="requests per window (default 400, as bench pools)")
    p.add_argument("--windows", type=int, default=1, help="consecutive windows of --limit requests (default 1)")
    p.add_argument("--rate-scale", type=float, default=0.5, help="multiply the request rate (default 0.5)")
    p.add_argument("--max-output-tokens", type=int, default=64, help="cap each request's output (default 64)")
    p.add_argument("--num-gpu-blocks", type=int, default=65536, help="KV blocks per worker (default 65536)")
    p.add_argument("--json", type=Path, default=default_results_dir() / "pools_sim.json", help="write the report here")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.trace is None:
        parser.error("--trace: no trace found in ../shared/traces; pass one")
    for name in ("workers", "limit", "windows", "max_output_tokens", "num_gpu_blocks"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.workers < 2:
        parser.error("--workers must be at least 2 (the split needs a worker per pool)")
    if args.rate_scale <= 0:
        parser.error("--rate-scale must be positive")
    full = load_trace(args.trace)
    wins: list[dict[str, Any]] = []
    for w in range(args.windows):
        trace = capped(window(full, w * args.limit, args.limit), None, args.max_output_tokens)
        try:
            # keyed by the spec as given: an auto cut is the window's own
            specs = {t: parse_split(t, trace) for t in (args.split or DEFAULT_SPLITS)}
        except ValueError as e:
            parser.error(str(e))
        one, _ = simulate_layout(trace, None, args.workers, args.num_gpu_blocks, args.rate_scale)
        res: dict[str, Any] = {}
        for text, spec in specs.items():
            reqs, counts = simulate_layout(trace, spec, args.workers, args.num_gpu_blocks, args.rate_scale)
            o, s = by_class(one, spec.split), by_class(reqs, spec.split)
            res[text] = {
                "layout": spec.name,
                ONE_POOL: o,
                "split": s,
                **counts,
                "short_p99_one_over_split": o["short"]["p99"] / s["short"]["p99"],
                "long_p50_split_over_one": s["long"]["p50"] / o["long"]["p50"],
            }
            print(
                f"[window {w}] {spec.name}: short p99 gain {res[text]['short_p99_one_over_split']:.2f}x "
                f"({o['short']['p99']:.2f} -> {s['short']['p99']:.2f} s), long p50 cost "
                f"{res[text]['long_p50_split_over_one']:.2f}x ({o['long']['p50']:.2f} -> {s['long']['p50']:.2f} s)"
                f" {counts}",
                file=sys.stderr,
                flush=True,
            )
        wins.append({"offset": w * args.limit, "layouts": res})
    summary: dict[str, Any] = {}
    for name in wins[0]["layouts"]:
        summary[name] = {}
        for key in ("short_p99_one_over_split", "long_p50_split_over_one"):
            v = [w["layouts"][name][key] for w in wins if name in w["layouts"]]
            summary[name][key] = {"windows": v, "median": statistics.median(v), "min": min(v), "max": max(v)}
    report = {
        "benchmark": "pools-sim",
        "config": {k: str(v) for k, v in vars(args).items()},
        "windows": wins,
        "summary": summary,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(compact_json(report))
    print(f"wrote {args.json}", file=sys.stderr)
    title = (
        f"simulated time: {Path(args.trace).name}, {args.windows} windows of {args.limit} requests, {args.workers} "
        f"workers,\none pool vs split layouts (median, min-max over the windows), rate x{args.rate_scale:g}"
    )
    png = save_plot(lambda p: _plot(summary, p, title), args.json.with_suffix(".png"))
    if png is not None:
        print(f"wrote {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
