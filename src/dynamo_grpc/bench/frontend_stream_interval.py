"""Tokens per message vs CPU per request: `bench frontend` once per worker `--stream-interval`, side by side.

Fewer messages per request is the lever the frontend's floor ratio was expected to need. This runs the floor
(the do-nothing forwarder) and the frontend (`frontend_kv`) on a fresh mocker mesh for each interval (3
interleaved rounds per mesh, concurrency 64 and 1), then puts the runs in one table: messages per request
each side moved, tokens per message, CPU per request of each side (median and range over rounds), their ratio,
and a least-squares fit of CPU = fixed + per-message x messages for each side, which says what a message costs
and what a request costs regardless of its messages.

    dynamo-grpc bench frontend-stream-interval [--intervals 1,4,16] [--rounds 3] [--requests 1000]
    dynamo-grpc bench frontend-stream-interval --summarize-only     (re-read the per-interval JSON files)
                                                        (bench/results/frontend-stream-interval.json)
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from dynamo_grpc.bench import frontend
from dynamo_grpc.bench.output import default_results_dir, save_plot, write_json

PHASES = {"throughput": "concurrency 64", "latency": "concurrency 1"}


def run_file(out: Path, k: int) -> Path:
    return out.with_name(f"{out.stem}-{k}.json")


def fit(points: list[tuple[float, float]]) -> dict[str, float]:
    """CPU ms = fixed + per_message x messages (least squares over the intervals' medians)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if len(points) < 2 or len(set(xs)) < 2:
        return {}
    slope, intercept = statistics.linear_regression(xs, ys)
    return {"fixed_ms": round(intercept, 3), "per_message_ms": round(slope, 4)}


def summarize(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One row per interval and phase: what each side moved and spent, and the ratio (ranges over rounds)."""
    res: dict[str, Any] = {"intervals": sorted(runs), "phases": {}}
    for phase in PHASES:
        rows: list[dict[str, Any]] = []
        for k in sorted(runs):
            d = runs[k]
            fr = d["floor_ratio"][phase]
            fe = fr["frontend_kv"]
            floors = fr["passthrough_cpu_ms_rounds"]
            rows.append({
                "stream_interval": k,
                "floor_messages_per_request": fr["passthrough_messages_per_request"],
                "frontend_messages_per_request": fe["messages_per_request"],
                "tokens_per_message": d[phase]["passthrough"]["tokens_per_message"],
                "floor_cpu_ms_median": statistics.median(floors),
                "floor_cpu_ms_range": [min(floors), max(floors)],
                "frontend_cpu_ms_median": round(fe["cpu_ms_median"], 3),
                "frontend_cpu_ms_range": [round(min(fe["cpu_ms_rounds"]), 3), round(max(fe["cpu_ms_rounds"]), 3)],
                "ratio_median": fe["ratio_median"],
                "ratio_range": [min(fe["ratio_rounds"]), max(fe["ratio_rounds"])],
                "requests_per_s": {n: round(d[phase][n]["requests_per_s"]) for n in ("passthrough", "frontend_kv")},
                "loadavg_1m_before_after": [round(x, 1) for x in d["loadavg_1m_before_after"]],
            })  # fmt: skip
        res["phases"][phase] = {
            "rows": rows,
            "fit_floor": fit([(r["floor_messages_per_request"], r["floor_cpu_ms_median"]) for r in rows]),
            "fit_frontend": fit([(r["frontend_messages_per_request"], r["frontend_cpu_ms_median"]) for r in rows]),
        }
    return res


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (phase, title) in zip(axes, PHASES.items(), strict=True):
        rows = res["phases"][phase]["rows"]
        for side, color, label in (("floor", "#c84", "do-nothing forwarder"), ("frontend", "#2a7", "frontend")):
            xs = [r[f"{side}_messages_per_request"] for r in rows]
            ys = [r[f"{side}_cpu_ms_median"] for r in rows]
            lo = [y - r[f"{side}_cpu_ms_range"][0] for y, r in zip(ys, rows, strict=True)]
            hi = [r[f"{side}_cpu_ms_range"][1] - y for y, r in zip(ys, rows, strict=True)]
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", color=color, label=label, capsize=3)
        for r in rows:
            ax.annotate(
                f"K={r['stream_interval']}: {r['ratio_median']:.2f}x",
                (r["frontend_messages_per_request"], r["frontend_cpu_ms_median"]),
                textcoords="offset points", xytext=(4, 6), fontsize=8,
            )  # fmt: skip
        ax.set_xlabel("messages per request (16 tokens)")
        ax.set_ylabel("CPU ms per request (median, range over rounds)")
        ax.set_title(f"{title}: CPU vs messages (labels: frontend / floor CPU ratio)", fontsize=9)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=default_results_dir() / "frontend-stream-interval.json")
    p.add_argument("--intervals", default="1,4,16", help="worker --stream-interval values, one mesh each")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=1000, help="per path and round at concurrency 64")
    p.add_argument("--latency-requests", type=int, default=200, help="per path and round at concurrency 1")
    p.add_argument("--summarize-only", action="store_true", help="only re-read the per-interval JSON files")
    args = p.parse_args(argv)
    intervals = [int(k) for k in args.intervals.split(",") if k]
    if any(k < 1 for k in intervals):
        p.error("--intervals must all be >= 1")
    for k in intervals:
        path = run_file(args.json, k)
        if args.summarize_only:
            if not path.exists():
                p.error(f"--summarize-only: {path} is missing (run without it first)")
            continue
        frontend.main([
            "--only", "passthrough,frontend_kv", "--no-tracing-rows", "--stream-interval", str(k),
            "--rounds", str(args.rounds), "--requests", str(args.requests),
            "--latency-rounds", str(args.rounds), "--latency-requests", str(args.latency_requests),
            "--json", str(path),
        ])  # fmt: skip
    runs = {k: json.loads(run_file(args.json, k).read_text()) for k in intervals}
    res = summarize(runs)
    res["settings"] = {"rounds": args.rounds, "requests": args.requests, "latency_requests": args.latency_requests}
    write_json(args.json, res)
    save_plot(lambda png: plot(res, png), args.json.with_suffix(".png"))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
