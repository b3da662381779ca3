"""`dynamo-grpc bench replay`: replay a public trace against a real mesh and measure routing quality.

For each router (``kv``, ``round-robin``, ``random``; ``--compare`` runs all three back to back on the
same slice) it starts a mesh (consul-dev, router, N mocker workers, frontend) as processes, sends the
trace's requests at their arrival times divided by ``speedup × rate_scale`` as KServe gRPC streams, and
writes one JSON report (and a PNG with ``--plot``). The mocker's step times are divided by the same
speedup, so the workers see the trace's load (times ``rate_scale``) compressed in time; latencies are
reported back in trace seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dynamo_grpc.bench.cpu import process_cpu_seconds
from dynamo_grpc.bench.output import default_results_dir, save_plot
from dynamo_grpc.bench.replay_bound import infinite_cache_bound
from dynamo_grpc.bench.replay_dispatch import dispatch_quality
from dynamo_grpc.bench.replay_driver import Driver, DriverConfig
from dynamo_grpc.bench.replay_metrics import RequestRecord, markdown_table, summarize
from dynamo_grpc.bench.replay_tail import router_view, tail_analysis
from dynamo_grpc.bench.replay_tokens import DEFAULT_LOW_ID, DEFAULT_VOCAB_SIZE, prompt_tokens
from dynamo_grpc.bench.replay_trace import Trace, TraceRequest, load_trace

ROUTERS = ("kv", "round-robin", "random")
#: also accepted by --routers: KV routing in its own `dynamo-grpc router` process (Route + Update over gRPC)
EXTRA_ROUTERS = ("kv-service",)


@dataclass
class ReplayConfig:
    trace: str
    routers: list[str]
    workers: int = 4
    speedup: float = 10.0
    rate_scale: float = 1.0
    limit: int | None = None
    engine_block_size: int = 64
    vocab_size: int = DEFAULT_VOCAB_SIZE
    salt: int = 0
    max_output_tokens: int | None = None
    max_input_tokens: int | None = None
    context_length: int | None = None  # None: the default model's unless the trace needs more
    model: str | None = None
    frontend: str | None = None  # an existing frontend: no mesh is started
    worker_args: list[str] = field(default_factory=list)
    router_args: list[str] = field(default_factory=list)
    frontend_args: list[str] = field(default_factory=list)
    request_timeout_s: float = 600.0
    log_dir: str | None = None
    #: client connections (a `frontend --replicas N` spreads connections, not requests, over its replicas)
    channels: int = 4
    #: interleaved rounds: round 1 runs every router, then round 2, ...; the report gives each round and the spread
    rounds: int = 1
    #: extra KV runs: label -> router flags (e.g. the previous defaults), run in every round next to ``kv``
    variants: dict[str, list[str]] = field(default_factory=dict)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynamo-grpc bench replay",
        description="Replay a Mooncake JSONL or Azure CSV trace against a mesh of mocker workers and compare "
        "KV-aware routing with round-robin and random (TTFT, ITL, E2E, prefix hit rate, load balance).",
    )
    p.add_argument("--trace", required=True, help="trace file (Mooncake JSONL or Azure CSV)")
    p.add_argument("--format", default="auto", choices=["auto", "mooncake", "azure"], help="trace schema")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--router", choices=ROUTERS, default="kv", help="routing policy to measure (default kv)")
    g.add_argument("--compare", action="store_true", help="run kv, round-robin and random back to back")
    g.add_argument(
        "--routers",
        default=None,
        help="comma-separated routers to run back to back: kv, round-robin, random, kv-service (KV routing in "
        "its own router process) and the --variant labels",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the routers this many times, interleaved (kv, rr, ..., kv, rr, ...); the report keeps "
        "every round and the median and spread of its figures (default 1)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=FLAGS",
        help="also run KV routing under LABEL with these extra router flags, e.g. "
        "'kv-scale1=--router-prefill-load-scale=1' (repeat; add LABEL to --routers)",
    )
    p.add_argument("--workers", type=int, default=4, help="mocker workers (default 4)")
    p.add_argument(
        "--speedup", type=float, default=10.0, help="divide trace time and the mocker's step times by this (default 10)"
    )
    p.add_argument(
        "--rate-scale",
        type=float,
        default=1.0,
        help="multiply the request rate (arrival gaps divided by this); default 1",
    )
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument(
        "--max-output-tokens", type=int, default=None, help="cap each request's output length (default: the trace's)"
    )
    p.add_argument(
        "--max-input-tokens",
        type=int,
        default=None,
        help="truncate prompts to this many tokens (the workers' context length), keeping prefixes",
    )
    p.add_argument(
        "--context-length",
        type=int,
        default=None,
        help="the mocker's context length (default: the default model's 8192, raised to fit the "
        "longest request of the trace through a long-context copy of its card)",
    )
    p.add_argument("--block-size", type=int, default=64, help="engine KV block size, for the hit-rate bound")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="synthetic token ids < this")
    p.add_argument("--seed", type=int, default=0, help="salt of the synthetic token ids")
    p.add_argument("--model", default=None, help="model name at the frontend (default: the one it serves)")
    p.add_argument("--frontend", default=None, help="use this running frontend host:port instead of a new mesh")
    p.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for every worker (repeat; e.g. --worker-arg=--num-gpu-blocks=8192)",
    )
    p.add_argument("--router-arg", action="append", default=[], metavar="ARG", help="extra router argument")
    p.add_argument("--frontend-arg", action="append", default=[], metavar="ARG", help="extra frontend argument")
    p.add_argument("--request-timeout", type=float, default=600.0, help="per-request deadline, wall seconds")
    p.add_argument(
        "--channels", type=int, default=4, help="client connections to the frontend (replicas share by connection)"
    )
    p.add_argument("--log-dir", default=None, help="keep the mesh's process logs here")
    p.add_argument("--json", type=Path, default=default_results_dir() / "replay.json", help="write the report here")
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        help="write the PNG (TTFT CDF, p50/p99 bars, hit rate) here (default: the --json path with .png; "
        "skipped without matplotlib)",
    )
    return p


def _tokens_fn(trace: Trace, cfg: ReplayConfig) -> Callable[[TraceRequest], np.ndarray]:
    def tokens_for(r: TraceRequest) -> np.ndarray:
        return prompt_tokens(r, trace.hash_block_size, cfg.vocab_size, DEFAULT_LOW_ID, cfg.salt)

    return tokens_for


def capped(trace: Trace, max_input: int | None, max_output: int | None) -> Trace:
    """Truncate prompts (keeping their prefix, so sharing survives) and outputs to the given lengths."""
    if max_input is None and max_output is None:
        return trace
    bs = trace.hash_block_size
    reqs = []
    for r in trace.requests:
        inp = r.input_length if max_input is None else min(r.input_length, max_input)
        out = r.output_length if max_output is None else min(r.output_length, max_output)
        hids = r.hash_ids
        if hids is not None and bs is not None:
            hids = hids[: -(-inp // bs)]
        reqs.append(TraceRequest(r.index, r.arrival_s, inp, out, hids))
    return Trace(trace.path, trace.fmt, tuple(reqs), bs)


async def _drive(address: str, model: str | None, trace: Trace, cfg: ReplayConfig) -> tuple[str, list[RequestRecord]]:
    probe = Driver(DriverConfig(address, model or "", channels=1))
    try:
        name = model or await probe.served_model()
    finally:
        await probe.close()
    driver = Driver(
        DriverConfig(
            address,
            name,
            time_scale=cfg.speedup * cfg.rate_scale,
            request_timeout_s=cfg.request_timeout_s,
            channels=cfg.channels,
        )
    )
    try:
        await driver.wait_ready()
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] > 10 or done == total:
                last[0] = now
                print(f"  {done}/{total} requests done", file=sys.stderr, flush=True)

        records = await driver.run(trace.requests, _tokens_fn(trace, cfg), progress)
    finally:
        await driver.close()
    return name, records


def _worker_ids(consul: str) -> list[str]:
    from dynamo_grpc.launch.consul_http import passing_instances

    return sorted(str(e.get("Service", {}).get("ID", "")) for e in passing_instances(consul, "dynamo-worker"))


DEFAULT_CONTEXT = 8192


def needed_context(trace: Trace) -> int:
    """Context length that fits every request of ``trace`` (prompt + output + 1), in 1024-token steps."""
    longest = max((r.input_length + r.output_length + 1 for r in trace.requests), default=1)
    return -(-longest // 1024) * 1024


def model_dir(cfg: ReplayConfig, trace: Trace, work: Path) -> Path | None:
    """A long-context model directory for the workers when the trace needs one (None: the default model)."""
    ctx = cfg.context_length or needed_context(trace)
    if ctx <= DEFAULT_CONTEXT and cfg.context_length is None:
        return None
    from dynamo_grpc.bench.replay_model import write_long_context_model

    return write_long_context_model(work / f"SmolLM2-135M-Instruct-ctx{ctx}", ctx)


def _process_cpu(mesh: Any) -> dict[str, float]:
    """CPU seconds (user + system) each mesh process has used so far, from /proc (Linux; {} elsewhere)."""
    out: dict[str, float] = {}
    for p in getattr(mesh, "procs", []):
        try:
            out[p.name] = process_cpu_seconds(p.popen.pid)
        except (OSError, IndexError, AttributeError):  # gone, or no /proc / sysconf here
            continue
    with contextlib.suppress(OSError):
        self_cpu = os.times()
        out["replay-driver"] = self_cpu.user + self_cpu.system
    return out


def run_one(
    router: str, trace: Trace, cfg: ReplayConfig, bound: float, model_path: Path | None = None
) -> tuple[list[RequestRecord], dict[str, Any]]:
    """Start a mesh with ``router``, replay, stop the mesh; return the records and the summary.

    KV routing runs inside the frontend (the default deployment, as Dynamo's), so it pays no more
    gRPC hops than round-robin and random do; the router flags go to the frontend then.
    """
    t_start = time.monotonic()
    cpu: dict[str, float] = {}
    view: dict[str, Any] | None = None  # the router's own view of its decisions, from its debug log
    if cfg.frontend:
        model, records = asyncio.run(_drive(cfg.frontend, cfg.model, trace, cfg))
        workers = sorted({r.worker_id for r in records if r.worker_id})
    else:
        from dynamo_grpc.launch.mesh import Mesh, MeshConfig

        log_dir = Path(cfg.log_dir) / router if cfg.log_dir else None
        kv = router == "kv" or router in cfg.variants
        router_flags = [*cfg.router_args, *cfg.variants.get(router, [])] if kv else []
        mc = MeshConfig(
            workers=cfg.workers,
            engine="mocker",
            model=str(model_path) if model_path else None,
            router_mode="kv" if kv else router,
            speedup_ratio=cfg.speedup,
            worker_args=list(cfg.worker_args),
            router_args=list(cfg.router_args) if router == "kv-service" else [],
            frontend_args=[*cfg.frontend_args, *router_flags],
            log_dir=log_dir,
            acl=False,  # the replay reads Consul and starts nothing else: no per-role tokens needed
        )
        with Mesh(mc) as mesh:
            workers = _worker_ids(mesh.consul)
            cpu0 = _process_cpu(mesh)
            model, records = asyncio.run(_drive(mesh.frontend_grpc, cfg.model, trace, cfg))
            cpu = {k: round(v - cpu0.get(k, 0.0), 2) for k, v in _process_cpu(mesh).items()}
        if log_dir is not None and (log_dir / "frontend.log").exists():
            with open(log_dir / "frontend.log", encoding="utf-8", errors="replace") as f:
                view = router_view(f)
    summary = summarize(records, cfg.speedup, workers, bound)
    summary["process_cpu_s"] = cpu
    summary["dispatch"] = dispatch_quality(records, workers)
    summary["tail"] = tail_analysis(records, workers, cfg.speedup)
    if view is not None:
        summary["router_view"] = view
    summary["router"] = router
    summary["model"] = model
    summary["workers"] = workers
    summary["wall_total_s"] = time.monotonic() - t_start
    return records, summary


def _per_request(records: list[RequestRecord], speedup: float) -> dict[str, list[Any]]:
    def num(x: float) -> float | None:
        return round(x * speedup, 4) if math.isfinite(x) else None

    return {
        "sent_s": [num(r.sent_s - records[0].scheduled_s) if records else None for r in records],
        "ttft_s": [num(r.ttft) if r.ok else None for r in records],
        "itl_s": [num(r.itl) if r.ok else None for r in records],
        "e2e_s": [num(r.e2e) if r.ok else None for r in records],
        "prompt_tokens": [r.prompt_tokens for r in records],
        "cached_tokens": [r.cached_tokens for r in records],
        "output_tokens": [r.output_tokens for r in records],
        "worker": [r.worker_id for r in records],
        "error": [r.error for r in records],
        "error_after_s": [num(r.end_s - r.sent_s) if r.error else None for r in records],
    }


#: the figures whose median and spread over rounds the report gives, as paths into a run's summary
SPREAD_FIGURES = {
    "ttft_p50_s": ("ttft_s", "p50"),
    "ttft_p99_s": ("ttft_s", "p99"),
    "e2e_p50_s": ("e2e_s", "p50"),
    "hit_rate": ("prefix_cache", "hit_rate"),
    "avoidable_prefill_wait": ("tail", "share_avoidable_prefill_wait"),
}


def spread(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per router and figure: the value in each round, their median, min and max; and per KV run its
    ratio to round-robin in each round (round-robin / kv for latencies, so > 1 means KV is better)."""
    out: dict[str, Any] = {}
    routers = [r for r in rounds[0]] if rounds else []
    for name in routers:
        figs: dict[str, Any] = {}
        for fig, (a, b) in SPREAD_FIGURES.items():
            got = [(rd[name].get(a) or {}).get(b) for rd in rounds if name in rd]  # older reports lack "tail"
            vals = [v for v in got if v is not None]
            figs[fig] = {
                "rounds": vals,
                "median": statistics.median(vals) if vals else None,
                "min": min(vals, default=None),
                "max": max(vals, default=None),
            }
        if name != "round-robin" and "round-robin" in routers:
            for fig in ("ttft_p50_s", "ttft_p99_s"):
                a, b = SPREAD_FIGURES[fig]
                ratios = [
                    rd["round-robin"][a][b] / rd[name][a][b]
                    for rd in rounds
                    if name in rd and "round-robin" in rd and rd[name][a][b] and rd["round-robin"][a][b]
                ]
                figs[f"round_robin_over_this_{fig}"] = {
                    "rounds": ratios,
                    "median": statistics.median(ratios) if ratios else None,
                    "min": min(ratios, default=None),
                    "max": max(ratios, default=None),
                }
        out[name] = figs
    return out


def _write_report(
    out: Path,
    cfg: ReplayConfig,
    trace_info: dict[str, Any],
    runs: dict[str, Any],
    rounds: list[dict[str, dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "benchmark": "replay",
        "config": {**asdict(cfg), "engine": "mocker", "host": platform.node(), "python": platform.python_version()},
        "trace": trace_info,
        "runs": runs,
    }
    if "kv" in runs and "round-robin" in runs:
        kv, rr = runs["kv"]["ttft_s"]["p50"], runs["round-robin"]["ttft_s"]["p50"]
        report["kv_vs_round_robin_p50_ttft"] = (rr / kv) if kv and rr else None
    if rounds:
        report["rounds"] = rounds
        report["spread"] = spread(rounds)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(compact_json(report))
    return report


def compact_json(obj: Any) -> str:
    """Indented JSON with every list of scalars on one line (per-request arrays stay small and readable)."""
    text = json.dumps(obj, indent=1)
    # JSON strings never hold raw newlines, so a newline inside a bracket pair is layout only.
    return re.sub(r"\[[^\[\]{}]*\]", lambda m: re.sub(r"\n\s*", " ", m.group(0)), text) + "\n"


def spread_table(sp: dict[str, Any]) -> str:
    """Markdown: per router, the median [min–max] over rounds of TTFT p50/p99 and the ratios to round-robin."""

    def cell(d: dict[str, Any] | None, fmt: str = "{:.2f}") -> str:
        if not d or d["median"] is None:
            return "–"
        return f"{fmt.format(d['median'])} [{fmt.format(d['min'])}–{fmt.format(d['max'])}]"

    rows = [
        "| router | TTFT p50 (s) | TTFT p99 (s) | hit rate | RR/this p50 | RR/this p99 |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in sp.items():
        rows.append(
            f"| {name} | {cell(f['ttft_p50_s'])} | {cell(f['ttft_p99_s'])} | {cell(f['hit_rate'])} "
            f"| {cell(f.get('round_robin_over_this_ttft_p50_s'))} | {cell(f.get('round_robin_over_this_ttft_p99_s'))} |"
        )
    return "\n".join(rows)


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in (
        "workers",
        "limit",
        "max_output_tokens",
        "max_input_tokens",
        "context_length",
        "block_size",
        "vocab_size",
    ):
        v = getattr(args, name)
        if v is not None and v <= 0:
            _parser().error(f"--{name.replace('_', '-')} must be positive")
    if args.speedup <= 0 or args.rate_scale <= 0:
        _parser().error("--speedup and --rate-scale must be positive")
    if args.rounds <= 0:
        _parser().error("--rounds must be positive")
    variants: dict[str, list[str]] = {}
    for v in args.variant:
        label, sep, flags = v.partition("=")
        if not sep or not label or label in (*ROUTERS, *EXTRA_ROUTERS):
            _parser().error(f"--variant {v!r}: expected LABEL=FLAGS with a new label")
        variants[label] = shlex.split(flags)
    if args.routers:
        routers = [r.strip() for r in args.routers.split(",") if r.strip()]
        bad = [r for r in routers if r not in (*ROUTERS, *EXTRA_ROUTERS) and r not in variants]
        if bad or not routers:
            _parser().error(
                f"--routers: unknown {', '.join(bad) or '(none)'}; expected {', '.join(ROUTERS)} or a --variant label"
            )
    else:
        routers = list(ROUTERS) if args.compare else [args.router]
    routers += [v for v in variants if v not in routers]  # a variant runs in every round, named or not
    cfg = ReplayConfig(
        trace=args.trace,
        routers=routers,
        workers=args.workers,
        speedup=args.speedup,
        rate_scale=args.rate_scale,
        limit=args.limit,
        engine_block_size=args.block_size,
        vocab_size=args.vocab_size,
        salt=args.seed,
        max_output_tokens=args.max_output_tokens,
        max_input_tokens=args.max_input_tokens,
        context_length=args.context_length,
        model=args.model,
        frontend=args.frontend,
        worker_args=args.worker_arg,
        router_args=args.router_arg,
        frontend_args=args.frontend_arg,
        request_timeout_s=args.request_timeout,
        log_dir=args.log_dir,
        channels=args.channels,
        rounds=args.rounds,
        variants=variants,
    )
    trace = capped(load_trace(args.trace, args.format, args.limit), cfg.max_input_tokens, cfg.max_output_tokens)
    bound = infinite_cache_bound(trace, cfg.engine_block_size)
    reqs = trace.requests
    trace_info = {
        "path": trace.path,
        "format": trace.fmt,
        "requests": len(reqs),
        "duration_s": trace.duration_s,
        "replay_wall_s": trace.duration_s / (cfg.speedup * cfg.rate_scale),
        "mean_rate_req_s": (len(reqs) - 1) / trace.duration_s if trace.duration_s > 0 else None,
        "input_tokens_mean": float(np.mean([r.input_length for r in reqs])),
        "output_tokens_mean": float(np.mean([r.output_length for r in reqs])),
        "infinite_cache_bound": bound.to_dict(),
    }
    print(
        f"replay {trace.path}: {len(reqs)} requests over {trace.duration_s:.0f} trace s "
        f"(~{trace_info['replay_wall_s']:.0f} wall s per router); infinite-cache hit bound "
        f"{100 * bound.engine_token_weighted:.1f}% (block-weighted {100 * bound.block_weighted:.2f}%)",
        file=sys.stderr,
        flush=True,
    )
    runs: dict[str, Any] = {}
    rounds: list[dict[str, dict[str, Any]]] = []
    ttfts: dict[str, list[float]] = {}
    work = Path(tempfile.mkdtemp(prefix="dynamo-replay-"))
    mpath = None if cfg.frontend else model_dir(cfg, trace, work)
    trace_info["context_length"] = needed_context(trace)
    try:
        for rnd in range(cfg.rounds):
            rounds.append({})
            for router in routers:
                print(f"== round {rnd + 1}/{cfg.rounds}: router {router}", file=sys.stderr, flush=True)
                records, summary = run_one(router, trace, cfg, bound.engine_token_weighted, mpath)
                rounds[-1][router] = summary
                runs[router] = {**summary, "per_request": _per_request(records, cfg.speedup)}  # the last round's
                ttfts[router] = [r.ttft * cfg.speedup for r in records if r.ok]
                # partial results survive an interrupted run
                _write_report(Path(args.json), cfg, trace_info, runs, rounds if cfg.rounds > 1 else None)
                t = summary["ttft_s"]
                hit = summary["prefix_cache"]["hit_rate"]
                print(
                    f"   {router}: completed {summary['completed']}/{summary['requests']}, "
                    f"TTFT p50 {_f(t['p50'])} p99 {_f(t['p99'])} trace-s, hit rate {_f(hit)}, "
                    f"requests CV {summary['load_balance']['requests_cv']}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = _write_report(Path(args.json), cfg, trace_info, runs, rounds if cfg.rounds > 1 else None)
    print(markdown_table(runs), file=sys.stderr)
    if "spread" in report:
        print(spread_table(report["spread"]), file=sys.stderr)
    print(f"wrote {args.json}", file=sys.stderr)
    title = (
        f"{Path(trace.path).name}: {len(reqs)} requests, {cfg.workers} mocker workers, "
        f"speedup {cfg.speedup:g}, rate x{cfg.rate_scale:g}"
    )

    def draw(png: Path) -> None:
        from dynamo_grpc.bench.replay_plot import plot_replay  # matplotlib: the optional `plot` extra

        plot_replay(ttfts, runs, png, title)

    png = save_plot(draw, args.plot or args.json.with_suffix(".png"))
    if png is not None:
        print(f"wrote {png}", file=sys.stderr)
    failed = sum(r["failed"] for r in runs.values())
    return 1 if failed == sum(r["requests"] for r in runs.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
