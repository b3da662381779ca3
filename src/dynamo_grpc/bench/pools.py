"""`dynamo-grpc bench pools`: one pool of N mocker workers vs the same workers split in two pools by input length.

Every layout runs behind `dynamo-grpc global-router` (one pool, or `short` + `long` split at a ``--split``
spec's input length, with its spill-over options), so the pools are the only difference. Each round replays
the same trace slice through every layout (the order alternates between rounds) and reports TTFT p50/p99 for
short and long requests separately, in trace seconds; a split layout's classes are cut at its own split, and
the one-pool run is classified at the same cut for the ratio. The question (issue 15): does the split lower
the short requests' TTFT p99 (target: 1.5x), and what does it cost the long ones' TTFT p50 (target: no more
than 20 % worse)?
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from dynamo_grpc.bench.output import default_results_dir, save_plot
from dynamo_grpc.bench.pools_split import cross_pool_prefix_tokens, uncached_tokens, work_balanced_split
from dynamo_grpc.bench.replay import ReplayConfig, _drive, capped, compact_json, model_dir, needed_context
from dynamo_grpc.bench.replay_metrics import RequestRecord
from dynamo_grpc.bench.replay_trace import Trace, load_trace

ONE_POOL = "one-pool"
#: the layouts of bench/results/pools_hold.json: the previous best (a cut at 30 % of the work with one-directional
#: spill-over: long -> short only while the short pool is nearly idle), the 8,192 cut with that spill-over, and the
#: same holding a long prompt the long pool is too backed up for up to 4 s for the first worker that frees
DEFAULT_SPLITS = (
    "auto:0.3,spill=8192,accept=8192",
    "8192,spill=8192,accept=4096",
    "8192,spill=8192,accept=4096,hold=4",
)
#: --split spec keys -> what they set in the split layout's pools.yaml
SPEC_KEYS = {
    "spill": "long pool busy_prefill_tokens (long prompts spill to the short pool when the long one is backed up)",
    "accept": "short pool accept_spill_prefill_tokens (it takes spill-over only onto workers this idle)",
    "busy": "busy_prefill_tokens of both pools (spill-over both ways)",
    "hold": "long pool hold_spill_s (seconds: a long prompt the long pool is too backed up for waits in the global "
    "router for the first worker that frees instead of queueing at once; needs spill)",
}


@dataclass(frozen=True)
class SplitSpec:
    """One split layout: ``short`` [0, split) + ``long`` [split, inf), and its spill-over options."""

    split: int
    spill: int | None = None
    accept: int | None = None
    busy: int | None = None
    #: seconds (long pool hold_spill_s)
    hold: float | None = None
    #: the split came from ``auto`` (half the trace's prefill work each side)
    auto: bool = False

    @property
    def name(self) -> str:
        opts = "".join(f",{k}={getattr(self, k):g}" for k in SPEC_KEYS if getattr(self, k) is not None)
        return f"split@{self.split}{'(auto)' if self.auto else ''}{opts}"


def parse_split(text: str, trace: Trace | None = None) -> SplitSpec:
    """``N|auto[:SHARE][,spill=N][,accept=N][,busy=N][,hold=S]``; ValueError naming the bad part."""
    head, *opts = [p.strip() for p in text.split(",")]
    if head == "auto" or head.startswith("auto:"):
        if trace is None:
            raise ValueError("split auto needs the trace")
        try:
            share = float(head[5:]) if head != "auto" else 0.5
            split, auto = work_balanced_split(trace, share), True
        except ValueError as e:
            raise ValueError(f"--split {text!r}: auto[:SHARE] with SHARE in (0, 1): {e}") from None
    elif head.isdigit() and int(head) > 0:
        split, auto = int(head), False
    else:
        raise ValueError(f"--split {text!r}: expected a positive token count or 'auto' first, got {head!r}")
    vals: dict[str, Any] = {}
    for opt in opts:
        key, _, val = opt.partition("=")
        if key not in SPEC_KEYS:
            raise ValueError(f"--split {text!r}: unknown option {key!r} (expected {', '.join(SPEC_KEYS)})")
        if key == "hold":
            try:
                vals[key] = float(val)
            except ValueError:
                vals[key] = -1.0
            if not 0 < vals[key] <= 3600:
                raise ValueError(f"--split {text!r}: hold must be seconds in (0, 3600], got {val!r}")
            continue
        if not val.isdigit() or int(val) <= 0:
            raise ValueError(f"--split {text!r}: {key} must be a positive token count, got {val!r}")
        vals[key] = int(val)
    if "hold" in vals and "spill" not in vals and "busy" not in vals:
        raise ValueError(f"--split {text!r}: hold needs spill (or busy): the long pool's backlog that makes it hold")
    return SplitSpec(split, auto=auto, **vals)


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
    p.add_argument(
        "--split",
        action="append",
        default=None,
        metavar="SPEC",
        help="a split layout (repeat for several, all in the same rounds): N|auto[:SHARE][,spill=N][,accept=N]"
        "[,busy=N][,hold=S] — prompts below N input tokens go to the short pool ('auto': the length that gives "
        "the short pool SHARE, default 0.5, of the trace's prefill work); spill=N: the long pool spills to the "
        "short one when every long worker has over N pending prefill tokens; accept=N: the short pool takes spill-over "
        "only while at most N are pending on it; busy=N: both pools spill at N; hold=S: a long prompt that can "
        "neither go to a long worker nor spill waits up to S seconds in the global router "
        f"(default: {' '.join(DEFAULT_SPLITS)})",
    )
    p.add_argument("--limit", type=int, default=400, help="replay the first N requests (default 400)")
    p.add_argument(
        "--speedup",
        type=float,
        default=2.5,
        help="divide trace time and mocker step times (default 2.5: a host CPU stall counts less in trace "
        "seconds than at 5, which matters for a p99 on a shared machine)",
    )
    p.add_argument("--rate-scale", type=float, default=0.5, help="multiply the request rate (default 0.5)")
    p.add_argument("--max-output-tokens", type=int, default=64, help="cap each request's output (default 64)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every layout (default 3)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="add --rounds rounds to the report at --json (same layouts and settings) instead of starting anew: "
        "a long bench runs as several short commands, the layout order still alternating round by round",
    )
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


def pools_yaml(spec: SplitSpec | None) -> str:
    """The global router's config of a layout (None: one pool of every worker)."""
    if spec is None:
        return "default_pool: all\npools:\n  - name: all\n    input_tokens: [0, null]\n"
    short_busy = f"    busy_prefill_tokens: {spec.busy}\n" if spec.busy else ""
    long_cap = spec.spill or spec.busy
    long_busy = f"    busy_prefill_tokens: {long_cap}\n" if long_cap else ""
    if spec.hold is not None:
        long_busy += f"    hold_spill_s: {spec.hold:g}\n"
    accept = f"    accept_spill_prefill_tokens: {spec.accept}\n" if spec.accept else ""
    return (
        "default_pool: short\npools:\n"
        f"  - name: short\n    input_tokens: [0, {spec.split}]\n{short_busy}{accept}"
        f"  - name: long\n    input_tokens: [{spec.split}, null]\n{long_busy}"
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
    spec: SplitSpec | None, splits: list[int], trace: Trace, cfg: ReplayConfig, mpath: Path | None, work: Path
) -> dict[str, Any]:
    """One replay through one layout; TTFT by class at its own split (one pool: at every split of the run)."""
    from dynamo_grpc.launch.mesh import Mesh, MeshConfig

    name = ONE_POOL if spec is None else spec.name
    config = work / f"layout{len(list(work.glob('layout*.yaml')))}.yaml"
    config.write_text(pools_yaml(spec))
    half = cfg.workers // 2
    pools = ["all"] * cfg.workers if spec is None else ["short"] * half + ["long"] * (cfg.workers - half)
    mc = MeshConfig(
        workers=cfg.workers,
        worker_pools=pools,
        pools_config=config,
        engine="mocker",
        model=str(mpath) if mpath else None,
        router_mode="kv-service",
        speedup_ratio=cfg.speedup,
        worker_args=list(cfg.worker_args),
        log_dir=Path(cfg.log_dir) / config.stem if cfg.log_dir else None,
        acl=False,
    )
    t0 = time.monotonic()
    with Mesh(mc) as mesh:
        _, records = asyncio.run(_drive(mesh.frontend_grpc, None, trace, cfg))
        spills, held = spill_counts(mesh), spill_counts(mesh, "held")
    cuts = splits if spec is None else [spec.split]
    by_split = {str(c): ttft_by_class(records, c, cfg.speedup) for c in sorted(set(cuts))}
    return {
        "layout": name,
        "wall_s": round(time.monotonic() - t0, 1),
        "by_split": by_split,
        "spilled_in": spills,
        "held": held,
    }


def spill_counts(mesh: Any, counter: str = "spill_overs_in") -> dict[str, int]:
    """Requests each pool took from another (the global router's dynamo_global_router_spill_overs_in_total),
    or another of its per-pool counters (``held``: requests held for hold_spill_s)."""
    import urllib.request

    from dynamo_grpc.launch.consul_http import passing_instances
    from dynamo_grpc.transport.addresses import METRICS_META

    router = passing_instances(mesh.consul, "dynamo-router", token=mesh.consul_token)[0]["Service"]
    with urllib.request.urlopen(f"http://{router['Meta'][METRICS_META]}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith(f"dynamo_global_router_{counter}_total{{"):
            pool = line.split('pool="', 1)[1].split('"', 1)[0]
            out[pool] = int(float(line.split()[-1]))
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _spread(xs: list[float | None]) -> dict[str, float | None]:
    vals = [x for x in xs if x is not None]
    if not vals:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}


def summarize_rounds(rounds: list[dict[str, dict[str, Any]]], specs: list[SplitSpec]) -> dict[str, Any]:
    """Per split layout and round: short p99 one-pool/split (higher is better for the split) and long p50
    split/one-pool (the cost), both at the layout's own split; median and min-max over the rounds."""
    out: dict[str, Any] = {}
    for spec in specs:
        cut = str(spec.split)
        one = [r[ONE_POOL]["by_split"][cut] for r in rounds]
        sp = [r[spec.name]["by_split"][cut] for r in rounds]
        gain = [_ratio(o["short"]["p99"], s["short"]["p99"]) for o, s in zip(one, sp, strict=True)]
        cost = [_ratio(s["long"]["p50"], o["long"]["p50"]) for o, s in zip(one, sp, strict=True)]
        g, c = _spread(gain), _spread(cost)
        out[spec.name] = {
            "short_p99_one_over_split": {"per_round": gain, **g},
            "long_p50_split_over_one": {"per_round": cost, **c},
            "target_short_p99_gain_1_5x": g["median"] is not None and g["median"] >= 1.5,
            "target_long_p50_cost_le_20pct": c["median"] is not None and c["median"] <= 1.2,
        }
    return out


def _plot(summary: dict[str, Any], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        g, c = summary[name]["short_p99_one_over_split"], summary[name]["long_p50_split_over_one"]
        if g["median"] is None or c["median"] is None:
            continue
        ax.errorbar(
            c["median"],
            g["median"],
            xerr=[[c["median"] - c["min"]], [c["max"] - c["median"]]],
            yerr=[[g["median"] - g["min"]], [g["max"] - g["median"]]],
            fmt="o",
            capsize=3,
            label=name,
        )
    ax.axhline(1.5, color="grey", ls="--", lw=0.8)
    ax.axvline(1.2, color="grey", ls="--", lw=0.8)
    ax.fill_between([0, 1.2], 1.5, 10, color="green", alpha=0.06, label="target (gain ≥ 1.5×, cost ≤ 1.2×)")
    ax.set_xlabel("long requests' TTFT p50, split / one pool (cost; lower is better)")
    ax.set_ylabel("short requests' TTFT p99, one pool / split (gain; higher is better)")
    ax.set_xlim(left=0.5)
    ax.set_ylim(bottom=0.5, top=max(3.0, *(summary[n]["short_p99_one_over_split"]["max"] or 0 for n in names)) + 0.2)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=7, wrap=True)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


#: settings a resumed report must share with the command that adds rounds to it
RESUME_SAME = ("trace", "workers", "limit", "speedup", "rate_scale", "max_output_tokens", "worker_arg")


def resumed_rounds(args: argparse.Namespace, names: list[str]) -> tuple[list[dict[str, dict[str, Any]]], float]:
    """The rounds and wall time of the report at ``args.json``; ValueError when it ran other layouts or settings."""
    try:
        old = json.loads(Path(args.json).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"--resume: cannot read the report {args.json}: {e}") from None
    if list(old.get("layouts", {})) != names:
        raise ValueError(f"--resume: {args.json} ran layouts {list(old.get('layouts', {}))}, not {names}")
    for key in RESUME_SAME:
        if old["config"].get(key) != getattr(args, key):
            raise ValueError(f"--resume: {args.json} ran --{key.replace('_', '-')} {old['config'].get(key)!r}")
    return list(old["rounds"]), float(old.get("wall_total_s", 0.0))


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.trace is None:
        parser.error("--trace: no trace found in ../shared/traces; pass one")
    for name in ("workers", "limit", "rounds", "max_output_tokens"):
        if getattr(args, name) <= 0:
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
    try:
        specs = [parse_split(t, trace) for t in (args.split or DEFAULT_SPLITS)]
    except ValueError as e:
        parser.error(str(e))
    if len({s.name for s in specs}) != len(specs):
        parser.error("--split: the same layout is given twice")
    splits = sorted({s.split for s in specs})
    layouts: list[SplitSpec | None] = [None, *specs]
    for s in specs:
        n_short = sum(1 for r in trace.requests if r.input_length < s.split)
        print(f"bench pools: {s.name}: {n_short} of {len(trace.requests)} requests short", file=sys.stderr)
    print(
        f"bench pools: {len(trace.requests)} requests, {trace.duration_s:.0f} trace s, "
        f"~{trace.duration_s / (cfg.speedup * cfg.rate_scale):.0f} wall s per run, "
        f"{args.rounds} rounds x {len(layouts)} layouts",
        file=sys.stderr,
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="dynamo-bench-pools-"))
    rounds: list[dict[str, dict[str, Any]]] = []
    report: dict[str, Any] = {}
    wall0 = 0.0
    if args.resume:
        try:
            rounds, wall0 = resumed_rounds(args, [s.name for s in specs])
        except ValueError as e:
            parser.error(str(e))
    t0 = time.monotonic()
    try:
        mpath = model_dir(replace(cfg), trace, work)
        for i in range(len(rounds), len(rounds) + args.rounds):
            order = layouts if i % 2 == 0 else list(reversed(layouts))
            rnd: dict[str, dict[str, Any]] = {}
            for spec in order:
                res = run_layout(spec, splits, trace, cfg, mpath, work)
                rnd[res["layout"]] = res
                for cut, cls in res["by_split"].items():
                    s, lg = cls["short"], cls["long"]
                    print(
                        f"  round {i + 1} {res['layout']} (cut {cut}): short TTFT p99 {s['p99']}, long TTFT p50 "
                        f"{lg['p50']} trace-s (failed {s['failed']}+{lg['failed']}, spilled in {res['spilled_in']}, "
                        f"held {res['held']}, "
                        f"{res['wall_s']} s)",
                        file=sys.stderr,
                        flush=True,
                    )
            rounds.append(rnd)
            report = {
                "benchmark": "pools",
                "config": {
                    **vars(args),
                    "rounds": len(rounds),
                    "json": str(args.json),
                    "plot": str(args.plot) if args.plot else None,
                },
                "layouts": {s.name: {"split": s.split, "auto": s.auto, "pools_yaml": pools_yaml(s)} for s in specs},
                "trace": {
                    "requests": len(trace.requests),
                    "short_requests": {str(c): sum(1 for r in trace.requests if r.input_length < c) for c in splits},
                    "uncached_prompt_tokens": sum(uncached_tokens(trace)),
                    # prefill a split adds by moving a conversation away from its cached prefix
                    "cross_pool_prefix_tokens": {str(c): cross_pool_prefix_tokens(trace, c) for c in splits},
                    "duration_s": trace.duration_s,
                    "context_length": needed_context(trace),
                },
                "rounds": rounds,
                "summary": summarize_rounds(rounds, specs),
                "wall_total_s": round(wall0 + time.monotonic() - t0, 1),
            }
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(compact_json(report))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report.get("summary", {}), indent=1), file=sys.stderr)
    print(f"wrote {args.json}", file=sys.stderr)
    title = (
        f"{Path(trace.path).name}: {len(trace.requests)} requests, {args.workers} mocker workers,\none pool vs "
        f"split layouts, {len(rounds)} rounds (median, min-max), speedup {args.speedup:g}, rate x{args.rate_scale:g}"
    )
    if report:
        png = save_plot(lambda p: _plot(report["summary"], p, title), args.plot or args.json.with_suffix(".png"))
        if png is not None:
            print(f"wrote {png}", file=sys.stderr)
    failed = sum(
        c[k]["failed"]
        for r in rounds
        for res in r.values()
        for c in res["by_split"].values()
        for k in ("short", "long")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
