"""`dynamo-grpc bench <name>|all`: the benchmarks, all in this package, so they run from an installed wheel.

Each writes JSON (and a PNG when matplotlib is installed) under `bench/results/` of the source checkout by
default, or under `--out DIR`. `all` runs every benchmark, the trace replay included (on `--trace`, default
the first trace in the checkout's `../shared/traces`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from dynamo_grpc.bench.output import checkout_root, default_results_dir
from dynamo_grpc.cli import command_lines, load_main
from dynamo_grpc.logs import ENV as LOG_ENV
from dynamo_grpc.logs import setup_logging

#: name -> (module with main(argv), what it measures)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "router": ("dynamo_grpc.bench.router", "KV index and routing decisions: ours vs per-candidate and naive"),
    "frontend": ("dynamo_grpc.bench.frontend", "frontend overhead: KServe stream via frontend vs worker directly"),
    "frontend-profile": (
        "dynamo_grpc.bench.frontend_profile",
        "frontend CPU per streamed request split by stage (parse, route, detok, write...) under cProfile",
    ),
    "frontend-items": (
        "dynamo_grpc.bench.frontend_items",
        "the in-process KServe request path with each item (tokenise, parse, detok...) stubbed: its cost in the path",
    ),
    "frontend-stream-interval": (
        "dynamo_grpc.bench.frontend_stream_interval",
        "frontend vs do-nothing forwarder CPU per request at worker --stream-interval 1/4/16 (messages per request)",
    ),
    "engine": ("dynamo_grpc.bench.engine", "torch engine vs transformers generate (extras: torch, bench)"),
    "engine-step": (
        "dynamo_grpc.bench.engine_step",
        "one torch decode step with the C paths (paged attention, whole-stack call) switched on one by one",
    ),
    "discovery": ("dynamo_grpc.bench.discovery", "consul-dev + discovery: 1,000 instances, 50 watchers"),
    "replay": ("dynamo_grpc.bench.replay", "trace replay: KV routing vs round-robin vs random (mocker mesh)"),
    "pools": ("dynamo_grpc.bench.pools", "global router: one pool of 4 vs 2+2 split by input length (trace replay)"),
    "security": ("dynamo_grpc.bench.security", "mTLS + CURVE vs plaintext: request latency and start-up (mocker)"),
    "kvbm": ("dynamo_grpc.bench.kvbm", "KV tiers: multi-turn TTFT, G1 vs +G2 host vs +G3 disk; torch onboard"),
    "disagg": ("dynamo_grpc.bench.disagg", "disaggregation: KV transfer vs a socket bound; ITL p99 agg vs disagg"),
    "planner": ("dynamo_grpc.bench.planner", "SLA planner vs average/peak fixed fleets on a x4 ramp (mocker mesh)"),
    "soak": ("dynamo_grpc.bench.soak", "10,000 streams with cancels, deadlines, a kill -9: outcomes, back to idle"),
    "replay-sim": (
        "dynamo_grpc.bench.replay_sim",
        "trace replay in simulated time: the real router over mocker-timed engines (no box noise)",
    ),
    "pools-sim": (
        "dynamo_grpc.bench.pools_sim",
        "bench pools' layouts in simulated time through the real global router (no box noise)",
    ),
    "replay-replicas": (
        "dynamo_grpc.bench.replay_replicas",
        "trace replay through 1 frontend vs 2 replicas with and without router replica sync",
    ),
    "replica-herding": (
        "dynamo_grpc.bench.replica_herding",
        "a burst sharing a cached prefix through 2 frontend replicas with and without router replica sync",
    ),
}
#: what `all` passes the replay beyond --trace/--json: all three policies on a slice of the trace
REPLAY_ALL_ARGS = ["--compare", "--limit", "500", "--speedup", "10"]


def _usage() -> str:
    table = {**BENCHMARKS, "all": ("", "every benchmark above, replay included (all [--out DIR] [--trace FILE])")}
    return "\n".join(
        [
            "usage: dynamo-grpc bench {" + ",".join(BENCHMARKS) + ",all} [--out DIR] [options]",
            "",
            *command_lines(table),
            "",
            f"Results: JSON (+ PNG with matplotlib) under --out, default {default_results_dir()}.",
            "`dynamo-grpc bench <name> --help` for a benchmark's options.",
        ]
    )


def _entry(name: str) -> Callable[[list[str]], int]:
    return load_main(BENCHMARKS[name][0], f"bench {name}")


def _take(args: list[str], flag: str) -> str | None:
    """Remove `flag VALUE` or `flag=VALUE` from args; return VALUE (None if absent)."""
    for i, a in enumerate(args):
        if a == flag:
            if i + 1 == len(args):
                raise SystemExit(f"dynamo-grpc bench: {flag} needs a value")
            value = args[i + 1]
            del args[i : i + 2]
            return value
        if a.startswith(flag + "="):
            del args[i]
            return a.split("=", 1)[1]
    return None


def default_trace() -> Path | None:
    """The first trace (JSONL before CSV) in the checkout's ../shared/traces, as DESIGN.md describes."""
    root = checkout_root()
    traces = (root if root is not None else Path.cwd()).parent / "shared" / "traces"
    for pattern in ("*.jsonl", "*.csv"):
        found = sorted(traces.glob(pattern)) if traces.is_dir() else []
        if found:
            return found[0]
    return None


def _run_all(out: Path, trace: str | None, rest: list[str]) -> int:
    if rest:
        print(f"dynamo-grpc bench all: takes only --out and --trace, not {' '.join(rest)}", file=sys.stderr)
        return 2
    rc = 0
    for name in BENCHMARKS:
        print(f"== bench {name}", flush=True)
        argv = ["--json", str(out / f"{name}.json")]
        if name in ("replay", "replay-sim"):
            path = trace or default_trace()
            if path is None:
                print(f"bench {name}: no trace found in ../shared/traces; pass --trace FILE", file=sys.stderr)
                rc = 1
                continue
            argv += ["--trace", str(path), *(REPLAY_ALL_ARGS if name == "replay" else ["--limit", "500"])]
        try:
            rc |= int(_entry(name)(argv) or 0)
        except SystemExit as e:  # one benchmark that cannot run does not stop the others
            print(e, file=sys.stderr)
            rc = 1
    return rc


def main(argv: list[str] | None = None) -> int:
    setup_logging(os.environ.get(LOG_ENV, "warning"))  # the benchmarks' own output is their report
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = args[0], args[1:]
    if name != "all" and name not in BENCHMARKS:
        print(f"dynamo-grpc bench: unknown benchmark '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    out_arg = _take(rest, "--out")
    out = Path(out_arg) if out_arg else default_results_dir()
    if name == "all":
        return _run_all(out, _take(rest, "--trace"), rest)
    if out_arg and not any(a == "--json" or a.startswith("--json=") for a in rest):
        rest = ["--json", str(out / f"{name}.json"), *rest]
    return int(_entry(name)(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
