"""Routing quality with frontend replicas: the same trace slice through 1 frontend, 2 replicas with router
replica sync, and 2 replicas without it, in interleaved rounds (each run its own mocker mesh).

Replica sync is what keeps two embedded KV routers from herding: without it each replica sees only its own
in-flight load, so both send their requests to the worker that looks idle to each. What a user notices is
TTFT and the prefix-cache hit rate; the claim is that 2 synced replicas are within noise (medians of the
rounds within 5 %) of 1 frontend.

    dynamo-grpc bench replay-replicas [--trace FILE] [--limit 400] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dynamo_grpc.bench.output import checkout_root, default_results_dir, save_plot, write_json

CONFIGS: dict[str, list[str]] = {
    "1 frontend": [],
    "2 replicas, sync": ["--frontend-arg=--replicas", "--frontend-arg=2"],
    "2 replicas, no sync": ["--frontend-arg=--replicas", "--frontend-arg=2", "--frontend-arg=--no-router-replica-sync"],
}


def _default_trace() -> str:
    root = checkout_root()
    traces = sorted((root.parent / "shared" / "traces").glob("*.jsonl")) if root is not None else []
    if not traces:
        raise SystemExit("no trace found: pass --trace FILE")
    return str(traces[0])


def _run(args: argparse.Namespace, extra: list[str], out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "dynamo_grpc.bench.replay", "--trace", args.trace, "--limit", str(args.limit),
           "--speedup", str(args.speedup), "--rate-scale", str(args.rate_scale), "--workers", str(args.workers),
           "--channels", str(args.channels), "--json", str(out), "--plot", str(out.with_suffix(".png")), *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    data = json.loads(out.read_text())
    run = data["runs"][0] if isinstance(data["runs"], list) else next(iter(data["runs"].values()))
    return {
        "ttft_p50_s": run["ttft_s"]["p50"],
        "ttft_p99_s": run["ttft_s"]["p99"],
        "hit_rate": run["prefix_cache"]["hit_rate"],
        "failed": run["failed"],
        "load_balance": run.get("load_balance"),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, (name, extra) in enumerate(CONFIGS.items()):
                t = time.monotonic()
                rounds[name].append(_run(args, extra, Path(tmp) / f"r{r}-{i}.json"))
                print(f"[replay-replicas] round {r + 1}: {name}: {rounds[name][-1]} ({time.monotonic() - t:.0f}s)",
                      file=sys.stderr, flush=True)
    medians = {
        name: {k: statistics.median(x[k] for x in runs) for k in ("ttft_p50_s", "ttft_p99_s", "hit_rate")}
        for name, runs in rounds.items()
    }
    one = medians["1 frontend"]
    vs_one = {
        name: {k: round(100 * (m[k] / one[k] - 1), 1) for k in m if one[k]} for name, m in medians.items()
    }
    return {"trace": args.trace, "limit": args.limit, "rounds": args.rounds, "speedup": args.speedup,
            "rate_scale": args.rate_scale, "workers": args.workers, "channels": args.channels,
            "medians": medians, "vs_1_frontend_pct": vs_one, "runs": rounds}


#: one panel of `plot_rounds`: its y label, and per series the round's key, a scale and a colour
Panel = tuple[str, list[tuple[str, float, str]]]


def plot_rounds(runs: dict[str, list[dict[str, Any]]], panels: list[Panel], title: str, png: Path,
                hline: tuple[float, str] | None = None) -> None:  # fmt: skip
    """Each configuration's rounds as dots, one panel per group of series (``hline``: a reference line on the
    first panel, with its label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    names = list(runs)
    for ax, (label, series) in zip(axes, panels, strict=True):
        for k, name in enumerate(names):
            for key, scale, color in series:
                ax.scatter([k] * len(runs[name]), [scale * r[key] for r in runs[name]], color=color)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if hline is not None:
        axes[0].axhline(hline[0], color="k", ls=":", label=hline[1])
        axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot(result: dict[str, Any], png: Path) -> None:
    panels: list[Panel] = [
        ("TTFT, trace s (blue p50, orange p99)", [("ttft_p50_s", 1.0, "#48c"), ("ttft_p99_s", 1.0, "#c84")]),
        ("prefix-cache hit rate, %", [("hit_rate", 100.0, "#2a7")]),
    ]
    title = f"{result['limit']} requests x {result['rounds']} interleaved rounds, {result['workers']} workers"
    plot_rounds(result["runs"], panels, title, png)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dynamo-grpc bench replay-replicas", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", default=None, help="trace file (default: the first JSONL in ../shared/traces)")
    p.add_argument("--limit", type=int, default=400, help="requests per run (the trace's first N)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--speedup", type=float, default=10.0)
    p.add_argument("--rate-scale", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--channels", type=int, default=16, help="client connections (spread over the replicas)")
    p.add_argument("--json", type=Path, default=default_results_dir() / "replay_replicas.json")
    args = p.parse_args(argv)
    args.trace = args.trace or _default_trace()
    result = run(args)
    out = write_json(args.json, result)
    save_plot(lambda png: plot(result, png), out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
