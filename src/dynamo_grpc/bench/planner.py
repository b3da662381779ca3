"""`dynamo-grpc bench planner`: the SLA planner against fixed fleets on a load that ramps x4 up and back down.

Mocker workers at real speed (speedup 1), time-compressed load: request lengths from a public trace slice, arrivals
from a rate envelope (bench/planner_load.py), a 10 s adjustment interval instead of the 180 s default. Three runs on
the same requests, each on a fresh mesh (consul-dev, a frontend, workers started by the local connector):

* ``average``: a fixed fleet sized by the profile for the envelope's mean rate;
* ``peak``: the smallest fixed fleet that meets the attainment goal at the peak rate, found by probing the peak
  alone with growing fleets (so the cost comparison is not against a needlessly large fleet);
* ``planner``: the planner with the local connector, from ``--min-replicas``, with surge checks every
  ``--surge-check`` s (default a quarter of the interval).

Per run: SLA attainment (requests with TTFT <= target and mean ITL <= target, over all sent), worker-seconds over the
replay (a worker counts from spawn to exit: starting and draining cost too), failed requests, and a plot of load,
replicas and p99 TTFT over time.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dynamo_grpc.bench.output import checkout_root, default_results_dir, save_plot, write_json
from dynamo_grpc.bench.planner_load import Envelope, workload
from dynamo_grpc.bench.replay_metrics import RequestRecord, percentiles
from dynamo_grpc.bench.replay_trace import TraceRequest, load_trace
from dynamo_grpc.planner.profile import Profile
from dynamo_grpc.planner.scaling import AGG, Bounds, Load, Targets, needs, replicas_for

DEFAULT_WORKER_ARGS = ["--num-gpu-blocks=96"]
TRACE = "azure_llm_2023_conv.csv"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynamo-grpc bench planner", description=__doc__.split("\n\n")[0])
    p.add_argument("--trace", type=Path, default=None, help="default: ../shared/traces/azure_llm_2023_conv.csv")
    p.add_argument("--limit", type=int, default=3000, help="trace slice: first N requests")
    p.add_argument("--profile", type=Path, default=None, help="a profile JSON; default: profile the worker first")
    p.add_argument(
        "--worker-arg",
        action="append",
        default=None,
        metavar="ARG",
        help=f"worker argument (repeat); default {' '.join(DEFAULT_WORKER_ARGS)}",
    )
    p.add_argument("--base-rate", type=float, default=1.0, help="requests/s before and after the ramp")
    p.add_argument("--peak-factor", type=float, default=4.0)
    p.add_argument("--low", type=float, default=30.0, help="seconds at the base rate first")
    p.add_argument("--ramp", type=float, default=20.0, help="seconds of each ramp")
    p.add_argument("--hold", type=float, default=30.0, help="seconds at the peak")
    p.add_argument("--tail", type=float, default=40.0, help="seconds at the base rate after the ramp down")
    p.add_argument("--max-input", type=int, default=2048)
    p.add_argument("--max-output", type=int, default=64)
    p.add_argument("--interval", type=float, default=10.0, help="planner adjustment interval (time-compressed)")
    p.add_argument("--predictor", default="trend", help="the planner's forecast (a 20 s ramp is two 10 s intervals)")
    p.add_argument("--scale-down-after", type=int, default=2)
    p.add_argument(
        "--surge-check", type=float, default=None, help="planner emergency-check period (default interval/4; 0: off)"
    )
    p.add_argument("--scale-up-slack", type=float, default=0.05, help="the planner's --scale-up-slack")
    p.add_argument("--peak-fleet", type=int, default=None, help="skip the probes: the peak fleet a previous run found")

    p.add_argument("--ttft-target", type=float, default=0.5)
    p.add_argument("--itl-target", type=float, default=0.05)
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--max-replicas", type=int, default=8)
    p.add_argument("--goal", type=float, default=0.95, help="attainment the peak fleet must reach")
    p.add_argument("--probe-s", type=float, default=40.0, help="seconds of each peak-fleet probe")
    p.add_argument("--settle-s", type=float, default=60.0, help="after the replay: time the planner gets to reach min")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the three runs")
    p.add_argument("--json", type=Path, default=None)
    return p


# -- one run -----------------------------------------------------------------------------------------------
def attained(r: RequestRecord, t: Targets) -> tuple[bool, bool]:
    if not r.ok:
        return False, False
    itl = r.itl
    return r.ttft <= t.ttft_s, math.isnan(itl) or itl <= t.itl_s


def summarize(records: list[RequestRecord], targets: Targets) -> dict[str, Any]:
    marks = [attained(r, targets) for r in records]
    n = max(1, len(records))
    return {
        "requests": len(records),
        "failed": sum(1 for r in records if not r.ok),
        "errors": sorted({str(r.error)[:120] for r in records if not r.ok})[:5],
        "ttft_attainment": sum(a for a, _ in marks) / n,
        "itl_attainment": sum(b for _, b in marks) / n,
        "sla_attainment": sum(a and b for a, b in marks) / n,
        "ttft_s": percentiles(r.ttft for r in records if r.ok),
        "itl_s": percentiles(r.itl for r in records if r.ok),
    }


PHASES = ("low", "ramp-up", "peak", "ramp-down", "tail")


def misses_by_phase(per_request: list[list[Any]], env: Envelope, targets: Targets) -> dict[str, dict[str, int]]:
    """Which requests missed the SLA, by the envelope phase they were sent in: TTFT misses, ITL misses (a request
    can miss both) and failures, so a planner change can aim at the phase that loses attainment."""
    edges = env.knots()[0][1:5]
    out = {p: {"requests": 0, "ttft_miss": 0, "itl_miss": 0, "failed": 0} for p in PHASES}
    for sent, ttft, itl in per_request:
        row = out[PHASES[sum(sent >= e for e in edges)]]
        row["requests"] += 1
        if ttft is None:
            row["failed"] += 1
            continue
        row["ttft_miss"] += ttft > targets.ttft_s
        row["itl_miss"] += itl is not None and itl > targets.itl_s
    return out


def _frontend_metrics(consul: str) -> list[str]:
    from dynamo_grpc.launch.consul_http import passing_instances, service_meta
    from dynamo_grpc.transport.addresses import METRICS_META

    metas = [service_meta(e) for e in passing_instances(consul, "dynamo-frontend")]
    return [m[METRICS_META] for m in metas if m.get(METRICS_META)]


async def run_once(
    name: str,
    requests: list[TraceRequest],
    args: argparse.Namespace,
    profile: Profile,
    fixed: int | None,
    work: Path,
) -> dict[str, Any]:
    """One fresh mesh; ``fixed`` workers, or the planner from the minimum when None."""
    from dynamo_grpc.bench.replay_driver import Driver, DriverConfig
    from dynamo_grpc.bench.replay_tokens import prompt_tokens
    from dynamo_grpc.discovery.agent import start_consul_dev
    from dynamo_grpc.launch.consul_http import passing_instances
    from dynamo_grpc.launch.mesh import Mesh, MeshConfig
    from dynamo_grpc.planner.connectors.local import LocalConnector
    from dynamo_grpc.planner.loop import Planner, PlannerConfig
    from dynamo_grpc.planner.observe import ScrapeSource

    targets = Targets(args.ttft_target, args.itl_target)
    log_dir = work / name
    agent = start_consul_dev(acl=False)
    conn = LocalConnector({AGG: ["worker", "--engine", "mocker", *args.worker_args]}, agent.address, log_dir=log_dir)
    mesh: Mesh | None = None
    out: dict[str, Any] = {"name": name, "fixed_workers": fixed}
    try:
        start_n = fixed if fixed is not None else args.min_replicas
        await conn.scale(AGG, start_n)
        deadline = time.monotonic() + 120
        while len(passing_instances(agent.address, "dynamo-worker")) < start_n:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: {start_n} workers did not register (logs in {log_dir})")
            await asyncio.sleep(0.2)
        mc = MeshConfig(workers=0, consul=agent.address, acl=False, log_dir=log_dir / "mesh")
        mesh = await asyncio.to_thread(Mesh(mc).start)
        driver = Driver(DriverConfig(mesh.frontend_grpc, mesh.models[0], channels=8, request_timeout_s=300.0))
        await driver.wait_ready()
        planner: Planner | None = None
        stop = asyncio.Event()
        tasks: list[asyncio.Task[Any]] = []
        timeline: list[tuple[float, int, int]] = []
        t0, wall0 = time.monotonic(), time.time()

        async def sample() -> None:
            while not stop.is_set():
                now = time.monotonic()
                serving = len(conn.pool_workers(AGG))
                timeline.append((round(now - t0, 2), conn.alive_at(now), serving))
                await asyncio.sleep(1.0)

        tasks.append(asyncio.create_task(sample()))
        if fixed is None:
            fe = _frontend_metrics(agent.address)
            cfg = PlannerConfig(
                [AGG],
                targets=targets,
                bounds={AGG: Bounds(args.min_replicas, args.max_replicas)},
                interval_s=args.interval,
                predictor=args.predictor,
                down_after=args.scale_down_after,
                surge_check_s=args.surge_check,
                up_slack=args.scale_up_slack,
            )
            planner = Planner(cfg, profile, ScrapeSource(lambda: fe), conn, surge_source=ScrapeSource(lambda: fe))
            tasks.append(asyncio.create_task(planner.run(stop)))
        records = await driver.run(requests, lambda r: prompt_tokens(r, None, salt=11))
        t_end = time.monotonic()
        await driver.close()
        out["replay_s"] = round(t_end - t0, 1)
        out["worker_seconds"] = round(conn.worker_seconds(t0, t_end), 1)
        back_to_min_s: float | None = None
        if planner is not None:  # give it the time to come back down, and say when it got there
            settle_end = t_end + args.settle_s
            while time.monotonic() < settle_end:
                if len(conn.pool_workers(AGG)) == args.min_replicas and not any(w.draining for w in conn.workers):
                    back_to_min_s = round(time.monotonic() - t0, 1)
                    break
                await asyncio.sleep(0.5)
            out["decisions"] = [
                {
                    "t": round(d.at - wall0, 1),
                    "kind": d.kind,
                    "rising": d.rising,
                    "predicted_isl": round(d.predicted["isl"], 1),
                    "observed_rate": d.observed.get("rate"),
                    "predicted_rate": round(d.predicted["rate"], 3),
                    "need": round(d.needs[AGG], 2),
                    "corrections": {k: round(v, 3) for k, v in d.corrections.items()},
                    "current": d.current[AGG],
                    "target": d.target[AGG],
                }
                for d in planner.decisions
            ]
            out["back_to_min_at_s"] = back_to_min_s
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        out.update(summarize(records, targets))
        out["timeline"] = timeline
        out["per_request"] = [
            [
                round(r.scheduled_s - t0, 3),
                None if not r.ok else round(r.ttft, 4),
                None if not r.ok or math.isnan(r.itl) else round(r.itl, 5),
            ]
            for r in records
        ]
        out["max_workers"] = max((a for _, a, _ in timeline), default=0)
        out["drained_exit_codes"] = sorted({str(c) for _, _, c in conn.stopped})
    finally:
        if mesh is not None:
            await asyncio.to_thread(mesh.stop)
        await conn.close()
        agent.stop()
    line = (
        f"  {name}: attainment {out.get('sla_attainment', 0):.3f} (ttft {out.get('ttft_attainment', 0):.3f}), "
        f"{out.get('worker_seconds')} worker-s, failed {out.get('failed')}, max workers {out.get('max_workers')}"
    )
    print(line, file=sys.stderr, flush=True)
    return out


def default_trace() -> Path | None:
    """../shared/traces/azure_llm_2023_conv.csv next to the checkout (or next to its worktree folder)."""
    root = checkout_root() or Path.cwd()
    for base in (root.parent, root.parent.parent):
        path = base / "shared" / "traces" / TRACE
        if path.is_file():
            return path
    return None


# -- the benchmark ------------------------------------------------------------------------------------------
def _profile(args: argparse.Namespace, out_dir: Path) -> tuple[Profile, Path]:
    if args.profile is not None:
        return Profile.load(args.profile), args.profile
    from dynamo_grpc.planner import profiler

    path = out_dir / "planner_profile.json"
    argv = [
        "--engine",
        "mocker",
        "--isl",
        "256,512,1024,2048",
        "--concurrency",
        "1,2,4,6,8",
        "--contexts",
        "512,1024,2048",
        "--json",
        str(path),
        "--log-level",
        "warning",  # the benchmark's report is its output
    ]
    argv += [f"--worker-arg={a}" for a in args.worker_args]
    print("== profiling the worker", file=sys.stderr, flush=True)
    profiler.main(argv)
    return Profile.load(path), path


def agg_replicas(profile: Profile, rate: float, isl: float, osl: float, args: argparse.Namespace) -> int:
    need = needs(profile, Load(rate, isl, osl), Targets(args.ttft_target, args.itl_target), {}, [AGG])[AGG]
    return replicas_for(need, Bounds(1, 64))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.worker_args = args.worker_arg if args.worker_arg is not None else list(DEFAULT_WORKER_ARGS)
    out_json = args.json or default_results_dir() / "planner.json"
    trace_path = args.trace or default_trace()
    if trace_path is None or not trace_path.is_file():
        print(f"bench planner: no trace at {trace_path}; pass --trace FILE", file=sys.stderr)
        return 2
    trace = load_trace(trace_path, limit=args.limit)
    env = Envelope(args.base_rate, args.peak_factor, args.low, args.ramp, args.hold, args.tail)
    requests = workload(trace, env, args.max_input, args.max_output)
    isl = float(np.mean([r.input_length for r in requests]))
    osl = float(np.mean([r.output_length for r in requests]))
    profile, profile_path = _profile(args, out_json.parent)
    work = Path(tempfile.mkdtemp(prefix="dynamo-bench-planner-"))  # worker and mesh logs of every run
    print(f"logs: {work}", file=sys.stderr, flush=True)

    async def bench() -> dict[str, Any]:
        avg_n = agg_replicas(profile, env.mean_rate(), isl, osl, args)
        # the peak fleet: probe the peak rate alone, growing the fleet until it meets the goal
        probe_env = Envelope(env.peak_rate, 1.0, args.probe_s, 0.0, 0.0, 0.0)
        probe_reqs = workload(trace, probe_env, args.max_input, args.max_output)
        n = max(1, agg_replicas(profile, env.peak_rate, isl, osl, args) - 1)
        probes: list[dict[str, Any]] = []
        if args.peak_fleet is not None:
            n = args.peak_fleet
        while args.peak_fleet is None:
            print(f"== peak-fleet probe: {n} workers at {env.peak_rate:.2f} req/s", file=sys.stderr, flush=True)
            r = await run_once(f"probe-{n}", probe_reqs, args, profile, n, work)
            probes.append(
                {"workers": n, "sla_attainment": r["sla_attainment"], "ttft_s": r["ttft_s"], "failed": r["failed"]}
            )
            if r["sla_attainment"] >= args.goal or n >= args.max_replicas:
                break
            n += 1
        peak_n = n
        rounds: list[dict[str, Any]] = []
        for i in range(args.rounds):
            order = [("average", avg_n), ("peak", peak_n), ("planner", None)]
            if i % 2:
                order.reverse()
            rnd = {}
            for name, fixed in order:
                print(f"== round {i + 1}: {name}", file=sys.stderr, flush=True)
                rnd[name] = await run_once(name, requests, args, profile, fixed, work)
            rounds.append(rnd)
        return {"average_fleet": avg_n, "peak_fleet": peak_n, "peak_probes": probes, "rounds": rounds}

    t_start = time.monotonic()
    res = asyncio.run(bench())
    rounds = res["rounds"]
    targets = Targets(args.ttft_target, args.itl_target)
    for rnd in rounds:
        for run in rnd.values():
            run["misses_by_phase"] = misses_by_phase(run["per_request"], env, targets)

    def spread(run: str, key: str) -> dict[str, float]:
        vals = [float(r[run][key]) for r in rounds]
        return {"mean": float(np.mean(vals)), "min": min(vals), "max": max(vals)}

    cost_ratio = [r["planner"]["worker_seconds"] / r["peak"]["worker_seconds"] for r in rounds]
    verdict = {
        "attainment_goal": min(0.95, float(np.mean([r["peak"]["sla_attainment"] for r in rounds]))),
        "planner_attainment": spread("planner", "sla_attainment"),
        "planner_over_peak_worker_seconds": {
            "mean": float(np.mean(cost_ratio)),
            "min": min(cost_ratio),
            "max": max(cost_ratio),
        },
        "planner_failed_requests": sum(r["planner"]["failed"] for r in rounds),
        "planner_back_to_min": all(r["planner"].get("back_to_min_at_s") is not None for r in rounds),
    }
    verdict["meets_attainment"] = verdict["planner_attainment"]["min"] >= verdict["attainment_goal"]
    verdict["meets_cost"] = verdict["planner_over_peak_worker_seconds"]["max"] <= 0.70
    report = {
        "benchmark": "planner",
        "what": "SLA planner (local connector, mocker workers at real speed) vs fixed fleets sized for the average "
        "and the peak, on a trace slice with a x4 rate envelope; time-compressed: adjustment interval "
        f"{args.interval:g} s instead of 180 s",
        "trace": str(trace_path),
        "requests": len(requests),
        "mean_isl": isl,
        "mean_osl": osl,
        "envelope": {
            "base_rate": env.base_rate,
            "peak_rate": env.peak_rate,
            "mean_rate": env.mean_rate(),
            "duration_s": env.duration_s,
            "low_s": env.low_s,
            "ramp_s": env.ramp_s,
            "hold_s": env.hold_s,
            "tail_s": env.tail_s,
        },
        "targets": {"ttft_s": args.ttft_target, "itl_s": args.itl_target},
        "planner": {
            "interval_s": args.interval,
            "predictor": args.predictor,
            "min": args.min_replicas,
            "max": args.max_replicas,
            "scale_down_after": args.scale_down_after,
            "surge_check_s": args.interval / 4.0 if args.surge_check is None else args.surge_check,
            "scale_up_slack": args.scale_up_slack,
        },
        "worker_args": args.worker_args,
        "profile": str(profile_path),
        "average_fleet": res["average_fleet"],
        "peak_fleet": res["peak_fleet"],
        "peak_probes": res["peak_probes"] or f"skipped: --peak-fleet {args.peak_fleet}",
        "summary": {
            run: {k: spread(run, k) for k in ("sla_attainment", "ttft_attainment", "worker_seconds", "failed")}
            for run in ("average", "peak", "planner")
        },
        "verdict": verdict,
        "rounds": rounds,
        "wall_s": round(time.monotonic() - t_start, 1),
    }
    write_json(out_json, report)
    print(f"results: {out_json}", flush=True)
    for run in ("average", "peak", "planner"):
        s = report["summary"][run]
        print(
            f"  {run:8s} attainment {s['sla_attainment']['mean']:.3f}  worker-s {s['worker_seconds']['mean']:.0f}  "
            f"failed {s['failed']['mean']:.0f}"
        )
    print(f"  verdict: {verdict}")
    for i, rnd in enumerate(rounds):
        cells = ", ".join(
            f"{p} {m['ttft_miss']}/{m['itl_miss']}/{m['failed']} of {m['requests']}"
            for p, m in rnd["planner"]["misses_by_phase"].items()
        )
        print(f"  planner misses, round {i + 1} (TTFT/ITL/failed): {cells}")
    save_plot(lambda png: _plot(report, env, png), out_json.with_suffix(".png"))
    return 0


def _plot(report: dict[str, Any], env: Envelope, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rnd = report["rounds"][-1]
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    xs = np.linspace(0, env.duration_s, 200)
    axes[0].plot(xs, [env.rate(x) for x in xs], label="envelope (req/s)")
    sent = [p[0] for p in rnd["planner"]["per_request"]]
    hist, edges = np.histogram(sent, bins=np.arange(0, env.duration_s + 5, 5))
    axes[0].step(edges[:-1], hist / 5.0, where="post", label="sent (req/s, 5 s bins)")
    axes[0].set(ylabel="load (req/s)", title="bench planner: load, replicas, p99 TTFT and ITL")
    axes[0].legend()
    bins = np.arange(0, env.duration_s + 10, 10)

    def p99(pts: list[tuple[float, float]]) -> list[float]:
        return [
            float(np.percentile([v for s, v in pts if lo <= s < lo + 10], 99))
            if any(lo <= s < lo + 10 for s, _ in pts)
            else float("nan")
            for lo in bins
        ]

    for name, style in (("average", ":"), ("peak", "--"), ("planner", "-")):
        run = rnd[name]
        t = [p[0] for p in run["timeline"]]
        axes[1].step(
            t,
            [p[1] for p in run["timeline"]],
            style,
            where="post",
            label=f"{name}: {run['worker_seconds']:.0f} worker-s, {run['sla_attainment']:.1%} in SLA",
        )
        axes[2].step(
            bins, p99([(p[0], p[1]) for p in run["per_request"] if p[1] is not None]), style, where="post", label=name
        )
        axes[3].step(
            bins, p99([(p[0], p[2]) for p in run["per_request"] if p[2] is not None]), style, where="post", label=name
        )
    axes[1].set(ylabel="workers alive")
    axes[1].legend(fontsize=8)
    axes[2].axhline(report["targets"]["ttft_s"], color="grey", lw=0.8, label="TTFT target")
    axes[2].set(ylabel="p99 TTFT (s, 10 s bins)", yscale="log")
    axes[2].legend(fontsize=8)
    axes[3].axhline(report["targets"]["itl_s"], color="grey", lw=0.8, label="ITL target")
    axes[3].set(ylabel="p99 of requests' mean ITL (s)", xlabel="seconds (by send time)", yscale="log")
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
