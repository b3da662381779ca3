"""`dynamo-grpc bench pools`: one pool of N mocker workers vs the same workers split in two pools by input length.

Both layouts run behind `dynamo-grpc global-router` (one pool, or `short` + `long` split at ``--split`` input
tokens), so the split is the only difference. Each round replays the same trace slice through both
layouts (the order alternates between rounds) and reports TTFT p50/p99 for short and long requests
separately, in trace seconds. The question (issue 15): does the split lower the short requests' TTFT p99
(target: 1.5x), and what does it cost the long ones' TTFT p50 (target: no more than 20 % worse)?
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from dynamo_grpc.bench.output import default_results_dir, save_plot
from dynamo_grpc.bench.replay import ReplayConfig, _drive, capped, compact_json, model_dir, needed_context
from dynamo_grpc.bench.replay_metrics import RequestRecord
from dynamo_grpc.bench.replay_trace import Trace, load_trace

LAYOUTS = ("one-pool", "split")


def _parser() -> argparse.ArgumentParser:
    from dynamo_grpc.bench.main import default_trace

    trace = default_trace()
    p = argparse.ArgumentParser(
        prog="dynamo-grpc bench pools",
        description="Replay a trace through the global router: one pool of N workers vs N/2 + N/2 split by "
        "input length; TTFT p50/p99 of short and long requests, interleaved rounds.",
    )
    p.add_argument("--trace", default=str(trace) if trace else None, help="trace file (default: ../shared/traces)")
    p.add_argument("--workers", type=int, default=4, help="mocker workers (split: half per pool; default 4)")
    p.add_argument("--split", type=int, default=8192, help="input tokens: below is short, at or above long (8192)")
    p.add_argument("--limit", type=int, default=400, help="replay the first N requests (default 400)")
    p.add_argument("--speedup", type=float, default=5.0, help="divide trace time and mocker step times (default 5)")
    p.add_argument("--rate-scale", type=float, default=0.5, help="multiply the request rate (default 0.5)")
    p.add_argument("--max-output-tokens", type=int, default=64, help="cap each request's output (default 64)")
    p.add_argument(
        "--busy-prefill-tokens",
        type=int,
        default=None,
        help="split layout: busy_prefill_tokens of both pools (spill-over on prefill backlog); default off",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs both layouts (default 3)")
    p.add_argument(
        "--worker-arg",
        action="append",
        default=["--num-gpu-blocks=65536"],
        metavar="ARG",
        help="extra worker argument (repeat); default --num-gpu-blocks=65536 so the trace's longest prompts fit",
    )
    p.add_argument("--log-dir", default=None, help="keep the meshes' process logs here")
    p.add_argument("--json", type=Path, default=default_results_dir() / "pools.json", help="write the report here")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: the --json path with .png)")
    return p


def pools_yaml(layout: str, split: int, busy_prefill_tokens: int | None = None) -> str:
    if layout == "one-pool":
        return "default_pool: all\npools:\n  - name: all\n    input_tokens: [0, null]\n"
    busy = f"    busy_prefill_tokens: {busy_prefill_tokens}\n" if busy_prefill_tokens else ""
    return (
        "default_pool: short\npools:\n"
        f"  - name: short\n    input_tokens: [0, {split}]\n{busy}"
        f"  - name: long\n    input_tokens: [{split}, null]\n{busy}"
    )


def ttft_by_class(records: list[RequestRecord], split: int, speedup: float) -> dict[str, dict[str, float | None]]:
    """TTFT p50/p99 (trace seconds) and counts of short (< split input tokens) and long requests."""
    out: dict[str, dict[str, float | None]] = {}
    for cls, pick in (("short", lambda n: n < split), ("long", lambda n: n >= split)):
        vals = [r.ttft * speedup for r in records if r.ok and pick(r.prompt_tokens)]
        failed = sum(1 for r in records if not r.ok and pick(r.prompt_tokens))
        out[cls] = {
            "n": len(vals),
            "failed": failed,
            "p50": float(np.percentile(vals, 50)) if vals else None,
            "p99": float(np.percentile(vals, 99)) if vals else None,
        }
    return out


def run_layout(
    layout: str, trace: Trace, cfg: ReplayConfig, split: int, busy: int | None, mpath: Path | None, work: Path
) -> dict[str, Any]:
    from dynamo_grpc.launch.mesh import Mesh, MeshConfig

    config = work / f"{layout}.yaml"
    config.write_text(pools_yaml(layout, split, busy))
    half = cfg.workers // 2
    pools = ["all"] * cfg.workers if layout == "one-pool" else ["short"] * half + ["long"] * (cfg.workers - half)
    mc = MeshConfig(
        workers=cfg.workers,
        worker_pools=pools,
        pools_config=config,
        engine="mocker",
        model=str(mpath) if mpath else None,
        router_mode="kv-service",
        speedup_ratio=cfg.speedup,
        worker_args=list(cfg.worker_args),
        log_dir=Path(cfg.log_dir) / layout if cfg.log_dir else None,
        acl=False,
    )
    t0 = time.monotonic()
    with Mesh(mc) as mesh:
        _, records = asyncio.run(_drive(mesh.frontend_grpc, None, trace, cfg))
    by_class = ttft_by_class(records, split, cfg.speedup)
    return {"layout": layout, "wall_s": round(time.monotonic() - t0, 1), **by_class}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summarize_rounds(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per round: short p99 one-pool/split (higher is better for the split), long p50 split/one-pool (the cost)."""
    short_gain = [_ratio(r["one-pool"]["short"]["p99"], r["split"]["short"]["p99"]) for r in rounds]
    long_cost = [_ratio(r["split"]["long"]["p50"], r["one-pool"]["long"]["p50"]) for r in rounds]

    def spread(xs: list[float | None]) -> dict[str, float | None]:
        vals = [x for x in xs if x is not None]
        if not vals:
            return {"median": None, "min": None, "max": None}
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}

    g, c = spread(short_gain), spread(long_cost)
    return {
        "short_p99_one_over_split": {"per_round": short_gain, **g},
        "long_p50_split_over_one": {"per_round": long_cost, **c},
        "target_short_p99_gain_1_5x": g["median"] is not None and g["median"] >= 1.5,
        "target_long_p50_cost_le_20pct": c["median"] is not None and c["median"] <= 1.2,
    }


def _plot(rounds: list[dict[str, dict[str, Any]]], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (cls, stat) in zip(axes, (("short", "p99"), ("long", "p50")), strict=True):
        x = np.arange(len(rounds))
        for k, layout in enumerate(LAYOUTS):
            vals = [r[layout][cls][stat] or 0.0 for r in rounds]
            ax.bar(x + (k - 0.5) * 0.4, vals, 0.4, label=layout)
        ax.set_xticks(x, [f"round {i + 1}" for i in range(len(rounds))])
        ax.set_title(f"{cls} requests: TTFT {stat} (trace s)")
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.trace is None:
        parser.error("--trace: no trace found in ../shared/traces; pass one")
    for name in ("workers", "limit", "rounds", "split", "max_output_tokens", "busy_prefill_tokens"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.workers < 2:
        parser.error("--workers must be at least 2 (the split needs a worker per pool)")
    if args.speedup <= 0 or args.rate_scale <= 0:
        parser.error("--speedup and --rate-scale must be positive")
    cfg = ReplayConfig(
        trace=args.trace,
        routers=["global-router"],
        workers=args.workers,
        speedup=args.speedup,
        rate_scale=args.rate_scale,
        limit=args.limit,
        max_output_tokens=args.max_output_tokens,
        worker_args=list(args.worker_arg),
        log_dir=args.log_dir,
    )
    trace = capped(load_trace(args.trace, "auto", args.limit), None, cfg.max_output_tokens)
    n_short = sum(1 for r in trace.requests if r.input_length < args.split)
    print(
        f"bench pools: {len(trace.requests)} requests ({n_short} short < {args.split} tokens), "
        f"{trace.duration_s:.0f} trace s, ~{trace.duration_s / (cfg.speedup * cfg.rate_scale):.0f} wall s per run, "
        f"{args.rounds} rounds x {len(LAYOUTS)} layouts",
        file=sys.stderr,
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="dynamo-bench-pools-"))
    rounds: list[dict[str, dict[str, Any]]] = []
    report: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        mpath = model_dir(replace(cfg), trace, work)
        for i in range(args.rounds):
            order = LAYOUTS if i % 2 == 0 else tuple(reversed(LAYOUTS))
            rnd: dict[str, dict[str, Any]] = {}
            for layout in order:
                res = run_layout(layout, trace, cfg, args.split, args.busy_prefill_tokens, mpath, work)
                rnd[layout] = res
                s, lg = res["short"], res["long"]
                print(
                    f"  round {i + 1} {layout}: short TTFT p99 {s['p99']}, long TTFT p50 {lg['p50']} trace-s "
                    f"(failed {s['failed']}+{lg['failed']}, {res['wall_s']} s)",
                    file=sys.stderr,
                    flush=True,
                )
            rounds.append(rnd)
            report = {
                "benchmark": "pools",
                "config": {**vars(args), "json": str(args.json), "plot": str(args.plot) if args.plot else None},
                "trace": {
                    "requests": len(trace.requests),
                    "short_requests": n_short,
                    "duration_s": trace.duration_s,
                    "context_length": needed_context(trace),
                },
                "rounds": rounds,
                "summary": summarize_rounds(rounds),
                "wall_total_s": round(time.monotonic() - t0, 1),
            }
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(compact_json(report))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report.get("summary", {}), indent=1), file=sys.stderr)
    print(f"wrote {args.json}", file=sys.stderr)
    title = (
        f"{Path(trace.path).name}: {len(trace.requests)} requests, {args.workers} mocker workers, one pool vs "
        f"split at {args.split} input tokens, speedup {args.speedup:g}, rate x{args.rate_scale:g}"
        + (f", busy_prefill_tokens {args.busy_prefill_tokens}" if args.busy_prefill_tokens else "")
    )
    png = save_plot(lambda p: _plot(rounds, p, title), args.plot or args.json.with_suffix(".png"))
    if png is not None:
        print(f"wrote {png}", file=sys.stderr)
    failed = sum(r[la][c]["failed"] for r in rounds for la in LAYOUTS for c in ("short", "long"))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
