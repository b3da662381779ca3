"""Discovery plane at scale: 1,000 instances heartbeating into consul-dev, 50 watchers.

Measures (1) the time for a change (an instance joining or leaving) to reach every watcher, with
sharded blocking queries (ours, ``Discovery.watch``: one query per shard, see discovery/shards.py), one
blocking query for the whole service (the client before sharding) and 1 s polling (the baseline), and
(2) consul-dev's
CPU per heartbeat and per second in each phase. The agent, the heartbeating fleet (a few processes,
each one ``Discovery`` holding its share of the instances) and the watchers (spread over a few
processes, as they would be over routers and frontends) are separate processes; arrival times use the
system-wide monotonic clock.
Latencies include each watcher parsing a 1,000-entry health answer, so on a loaded machine they
measure the machine as much as the agent: compare the two phases of one run.

    dynamo-grpc bench discovery [--out DIR]     (bench/results/discovery.json by default)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dynamo_grpc.bench.cpu import process_cpu_seconds
from dynamo_grpc.bench.output import default_results_dir, save_plot, write_json
from dynamo_grpc.discovery import ConsulSettings, Discovery, Instance
from dynamo_grpc.discovery.agent import start_consul_dev
from dynamo_grpc.discovery.client import WatchAnswer

SERVICE = "dynamo-worker"
MODULE = "dynamo_grpc.bench.discovery"  # the fleet and watcher child processes run this module


def _log(msg: str) -> None:
    print(f"[bench_discovery {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


# -- child roles -------------------------------------------------------------------------------------------

async def _fleet(addr: str, first: int, n: int, ttl: float) -> None:
    """Register n instances through one Discovery and heartbeat them until stdin closes."""
    async with Discovery(ConsulSettings.from_addr(addr), control_connections=32) as d:  # n heartbeats a period
        gate = asyncio.Semaphore(32)

        async def one(i: int) -> None:
            async with gate:
                await d.register(Instance(SERVICE, f"w{i:04d}", "127.0.0.1", 10000 + i, ["m"],
                                          {"grpc": f"127.0.0.1:{10000 + i}"}), ttl=ttl)

        await asyncio.gather(*(one(i) for i in range(first, first + n)))
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def _watchers(addr: str, first: int, count: int, mode: str, poll_interval: float) -> None:
    """Watch the service with ``count`` independent clients; print a line whenever a view changes (with
    the stage times of the answer that changed it, for ``--trace``)."""
    import aiohttp

    def report(w: int, ids: set[str], stages: dict[str, float] | None = None) -> None:
        probes = sorted(i for i in ids if i.startswith("probe-"))
        rec: dict[str, Any] = {"w": w, "t": time.monotonic(), "n": len(ids), "probes": probes}
        if stages:
            rec["stages"] = stages
        print(json.dumps(rec), flush=True)

    async def blocking(w: int) -> None:
        sharded = mode == "sharded"
        last: list[WatchAnswer] = []

        def keep(answer: WatchAnswer) -> None:
            if answer.parsed is not None:
                last[:] = [answer]

        async with Discovery(ConsulSettings.from_addr(addr), watch_wait=60, sharded_watch=sharded,
                             answer_trace=keep) as d:
            async for snap in d.watch(SERVICE):
                yielded = time.monotonic()
                stages = None
                if last:
                    a = last[0]
                    stages = {"received": a.received, "parsed": a.parsed or a.received, "yielded": yielded,
                              "bytes": a.nbytes}
                    last.clear()
                report(w, {x.instance_id for x in snap}, stages)

    async def polling(w: int) -> None:
        await asyncio.sleep(poll_interval * (w % 50) / 50)  # independent processes poll out of phase
        async with aiohttp.ClientSession() as s:
            while True:
                async with s.get(f"{addr}/v1/health/service/{SERVICE}", params={"passing": "1"}) as resp:
                    body = await resp.json()
                report(w, {e["Service"]["ID"] for e in body})
                await asyncio.sleep(poll_interval)

    run = polling if mode == "polling" else blocking
    tasks = [asyncio.create_task(run(first + i)) for i in range(count)]
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


# -- the driver --------------------------------------------------------------------------------------------

class WatcherGroup:
    """Watcher processes; keeps, per watcher, the history of (time, instance count, probes present)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.history: list[list[tuple[float, int, frozenset[str], dict[str, float] | None]]] = [
            [] for _ in range(n)
        ]
        self.procs: list[asyncio.subprocess.Process] = []
        self.readers: list[asyncio.Task[None]] = []
        self.changed = asyncio.Event()

    async def start(self, addr: str, procs: int, mode: str, poll_interval: float,
                    env: dict[str, str] | None = None) -> None:
        per = -(-self.n // procs)
        for first in range(0, self.n, per):
            count = min(per, self.n - first)
            p = await asyncio.create_subprocess_exec(
                sys.executable, "-m", MODULE, "--role", "watchers", "--addr", addr, "--first", str(first),
                "--count", str(count), "--mode", mode, "--poll-interval", str(poll_interval),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env)
            self.procs.append(p)
            self.readers.append(asyncio.create_task(self._read(p)))

    async def _read(self, p: asyncio.subprocess.Process) -> None:
        assert p.stdout is not None
        async for line in p.stdout:
            rec = json.loads(line)
            self.history[rec["w"]].append((rec["t"], rec["n"], frozenset(rec["probes"]), rec.get("stages")))
            self.changed.set()

    async def until(self, pred: Any, since: float, timeout: float) -> list[tuple[float, dict[str, float] | None]]:
        """For every watcher, the first report at or after ``since`` whose (n, probes) satisfies pred:
        its time and the stage times of the answer behind it."""
        deadline = time.monotonic() + timeout
        while True:
            self.changed.clear()
            found = []
            for hist in self.history:
                hit = next(((t, st) for t, n, probes, st in hist if t >= since and pred(n, probes)), None)
                if hit is None:
                    break
                found.append(hit)
            if len(found) == self.n:
                return found
            if time.monotonic() > deadline:
                last = [(round(t - since, 2), n, sorted(ps)) for t, n, ps, _ in self.history[len(found)][-3:]]
                raise TimeoutError(f"only {len(found)} of {self.n} watchers converged; watcher {len(found)} "
                                   f"last reported {last}")
            try:
                await asyncio.wait_for(self.changed.wait(), 1.0)
            except TimeoutError:
                pass

    def cpu_seconds(self) -> float:
        return sum(process_cpu_seconds(p.pid) for p in self.procs)

    async def stop(self) -> None:
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.close()
        for p in self.procs:
            try:
                await asyncio.wait_for(p.wait(), 10)
            except TimeoutError:
                p.kill()
                await p.wait()
        for r in self.readers:
            r.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)


async def _agent_stat(addr: str, key: str) -> int:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(f"{addr}/v1/agent/self") as resp:
        return int((await resp.json())["Stats"]["consul-dev"][key])


async def _measure_changes(group: WatcherGroup, prober: Discovery, changes: int, gap: float,
                           instances: int) -> tuple[list[float], list[tuple[float, list[dict[str, float] | None]]]]:
    """Alternately add and remove a probe instance; for each change, every watcher's delay, and per change
    its start time with every watcher's stage times (``--trace``)."""
    lat: list[float] = []
    per_change: list[tuple[float, list[dict[str, float] | None]]] = []
    for k in range(changes):
        probe = f"probe-{k // 2}"
        t0 = time.monotonic()
        if k % 2 == 0:
            await prober.register(Instance(SERVICE, probe, "127.0.0.1", 9999), ttl=30.0)
            arrivals = await group.until(lambda n, ps, p=probe: p in ps, t0, 60)
        else:
            await prober.deregister(probe)
            arrivals = await group.until(lambda n, ps, p=probe: p not in ps and n >= instances, t0, 60)
        lat.extend(t - t0 for t, _ in arrivals)
        per_change.append((t0, [dict(st, reported=t) if st else None for t, st in arrivals]))
        await asyncio.sleep(gap)
    return lat, per_change


#: the stages of one change, in order: the agent commits the write, a blocked reader resumes, its answer is
#: built; the watcher reads it off the socket, parses it, its merged view is yielded and reported
STAGES = ("commit", "woke", "ready", "received", "parsed", "yielded", "reported")


def _read_trace(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def stage_breakdown(per_change: list[tuple[float, list[dict[str, float] | None]]],
                    agent_lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the time of a change goes: each stage's time after the change was sent (ms; p50/p99/max over
    the answers the agent built and the watchers' reports), the watcher's own steps, and per change the
    first and last arrival of each stage (how much is serialised behind other watchers) and the agent's
    garbage-collector pauses while it was in flight."""
    pauses = [x for x in agent_lines if "gc" in x]
    agent_lines = [x for x in agent_lines if "commit" in x]
    offsets: dict[str, list[float]] = {st: [] for st in STAGES}
    steps: dict[str, list[float]] = {"parse": [], "merge": [], "report": [], "agent_build": []}
    nbytes: list[float] = []
    spans = []
    for k, (t0, recs) in enumerate(per_change):
        t1 = per_change[k + 1][0] if k + 1 < len(per_change) else float("inf")
        lines = [x for x in agent_lines if t0 <= x["commit"] < t1]
        mine: dict[str, list[float]] = {st: [] for st in STAGES}
        for x in lines:
            for st in ("commit", "woke", "ready"):
                mine[st].append(1e3 * (x[st] - t0))
            steps["agent_build"].append(1e3 * (x["ready"] - x["woke"]))
        for r in recs:
            if r is None:
                continue
            for st in ("received", "parsed", "yielded", "reported"):
                mine[st].append(1e3 * (r[st] - t0))
            steps["parse"].append(1e3 * (r["parsed"] - r["received"]))
            steps["merge"].append(1e3 * (r["yielded"] - r["parsed"]))
            steps["report"].append(1e3 * (r["reported"] - r["yielded"]))
            nbytes.append(r["bytes"])
        span: dict[str, Any] = {st: [round(min(v), 1), round(max(v), 1)] for st, v in mine.items() if v}
        last = max(mine["reported"], default=0.0) / 1e3
        gcs = [[round(1e3 * (g["start"] - t0), 1), round(1e3 * (g["end"] - g["start"]), 1), g["gc"]]
               for g in pauses if t0 <= g["end"] and g["start"] <= t0 + last]
        if gcs:
            span["agent_gc"] = gcs  # [ms after the change, pause ms, generation] while the change was in flight
        spans.append(span)
        for st, v in mine.items():
            offsets[st].extend(v)

    def summary(v: list[float]) -> dict[str, float]:
        return {"p50": round(_pct(v, 50), 2), "p99": round(_pct(v, 99), 2), "max": round(max(v), 2)} if v else {}

    return {"after_change_ms": {st: summary(v) for st, v in offsets.items()},
            "step_ms": {st: summary(v) for st, v in steps.items()},
            "answer_bytes_p50": _pct(nbytes, 50) if nbytes else 0,
            "agent_answers_per_change": len(offsets["ready"]) / max(1, len(per_change)),
            "per_change_first_last_ms": spans}


def _src_env(src: Path | None) -> dict[str, str] | None:
    """The environment for the agent, fleet and watcher processes: this checkout's code, or ``src``'s
    (another checkout, e.g. main's, for a before/after in one run; the driver stays this one)."""
    if src is None:
        return None
    return {**os.environ, "PYTHONPATH": f"{src / 'src'}{os.pathsep}{src / 'gen'}"}


async def run(args: argparse.Namespace, src: Path | None = None) -> dict[str, Any]:
    env = _src_env(src)
    trace = args.trace and src is None  # another checkout's agent may not have --trace-file
    trace_path = Path(tempfile.mkdtemp(prefix="bench-discovery-")) / "agent-trace.jsonl" if trace else None
    agent = start_consul_dev(0, env=env, extra_args=["--trace-file", str(trace_path)] if trace_path else None)
    assert agent.process is not None
    pid, addr = agent.process.pid, agent.address
    # 50 watchers stand for 50 routers/frontends: give them several processes, not one event loop.
    procs = args.watcher_procs or max(1, min(10, args.watchers))
    result: dict[str, Any] = {"instances": args.instances, "watchers": args.watchers, "watcher_procs": procs,
                              "ttl_s": args.ttl, "changes": args.changes, "poll_interval_s": args.poll_interval,
                              "host": platform.node(), "cpus": os.cpu_count(),
                              "loadavg_start": os.getloadavg()[0]}
    fleet: list[asyncio.subprocess.Process] = []
    try:
        c0, t0 = process_cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(2.0)
        result["agent_idle_cpu_pct"] = 100 * (process_cpu_seconds(pid) - c0) / (time.monotonic() - t0)

        t = time.monotonic()
        # The instances stand for 1,000 worker processes: spread their heartbeats over a few processes
        # so one starved event loop does not let TTLs lapse on a loaded machine.
        per = -(-args.instances // args.fleet_procs)
        for first in range(0, args.instances, per):
            fleet.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", MODULE, "--role", "fleet", "--addr", addr, "--first", str(first),
                "--count", str(min(per, args.instances - first)), "--ttl", str(args.ttl),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env))
        for proc in fleet:
            assert proc.stdout is not None
            if (await proc.stdout.readline()).strip() != b"ready":
                raise RuntimeError("fleet failed to start")
        result["register_s"] = time.monotonic() - t
        _log(f"registered {args.instances} instances in {result['register_s']:.1f}s")

        # Heartbeats only: agent CPU per heartbeat, counted by the agent itself.
        await asyncio.sleep(args.ttl / 3)
        h0, c0, t0 = await _agent_stat(addr, "ttl_updates"), process_cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(args.heartbeat_window)
        beats, cpu = await _agent_stat(addr, "ttl_updates") - h0, process_cpu_seconds(pid) - c0
        dt = time.monotonic() - t0
        result["heartbeats_per_s"] = beats / dt
        result["agent_cpu_us_per_heartbeat"] = 1e6 * cpu / max(1, beats)
        result["agent_heartbeat_cpu_pct"] = 100 * cpu / dt
        _log(f"heartbeats: {beats / dt:.0f}/s, agent {100 * cpu / dt:.1f}% CPU")

        phases: dict[str, dict[str, Any]] = {}
        # A generous request timeout: on a loaded machine a timed-out deregistration would leave the
        # probe to its TTL and measure that instead of propagation.
        async with Discovery(ConsulSettings.from_addr(addr), request_timeout=60) as prober:
            for mode in args.modes.split(","):
                group = WatcherGroup(args.watchers)
                t0 = time.monotonic()
                await group.start(addr, procs, mode, args.poll_interval, env)
                await group.until(lambda n, ps: n >= args.instances, t0, 120)
                _log(f"{mode}: {args.watchers} watchers in {procs} processes see all instances")
                # Quiet period: what watching costs when nothing changes.
                c0, g0, t0 = process_cpu_seconds(pid), group.cpu_seconds(), time.monotonic()
                await asyncio.sleep(args.quiet_window)
                dt = time.monotonic() - t0
                quiet_agent, quiet_watchers = (process_cpu_seconds(pid) - c0) / dt, (group.cpu_seconds() - g0) / dt
                c0, g0, t0 = process_cpu_seconds(pid), group.cpu_seconds(), time.monotonic()
                lat, per_change = await _measure_changes(group, prober, args.changes, args.gap, args.instances)
                cpu, gcpu, dt = process_cpu_seconds(pid) - c0, group.cpu_seconds() - g0, time.monotonic() - t0
                await group.stop()
                phases[mode] = {"p50_ms": 1e3 * _pct(lat, 50), "p99_ms": 1e3 * _pct(lat, 99),
                                "max_ms": 1e3 * max(lat), "mean_ms": 1e3 * statistics.fmean(lat),
                                "samples": len(lat), "agent_cpu_pct": 100 * cpu / dt,
                                "watchers_cpu_pct": 100 * gcpu / dt, "quiet_agent_cpu_pct": 100 * quiet_agent,
                                "quiet_watchers_cpu_pct": 100 * quiet_watchers,
                                "latencies_ms": [round(1e3 * x, 2) for x in lat]}
                if trace_path is not None and mode != "polling":
                    phases[mode]["stages"] = stage_breakdown(per_change, _read_trace(trace_path))
                    _log(f"{mode} stages (ms after the change, p50/p99): " + ", ".join(
                        f"{st} {v['p50']:.0f}/{v['p99']:.0f}"
                        for st, v in phases[mode]["stages"]["after_change_ms"].items() if v))
                _log(f"{mode}: p50 {phases[mode]['p50_ms']:.0f} ms, p99 {phases[mode]['p99_ms']:.0f} ms, "
                     f"agent {phases[mode]['agent_cpu_pct']:.1f}% CPU; quiet: agent {100 * quiet_agent:.1f}%, "
                     f"watchers {100 * quiet_watchers:.1f}% CPU")
        result["phases"] = phases
        result["loadavg_end"] = os.getloadavg()[0]
    finally:
        for proc in fleet:
            if proc.stdin is not None:
                proc.stdin.close()
        for proc in fleet:
            try:
                await asyncio.wait_for(proc.wait(), 20)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        agent.stop()
        if trace_path is not None:
            shutil.rmtree(trace_path.parent, ignore_errors=True)
    return result


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = {"sharded": "sharded blocking queries (ours)", "blocking": "one blocking query (before)",
             "polling": f"polling every {result['poll_interval_s']:g} s"}
    for name, ph in result["phases"].items():
        xs = sorted(ph["latencies_ms"])
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        label = names.get(name, name)
        ax1.plot(xs, ys, label=f"{label}: p50 {ph['p50_ms']:.0f} ms, p99 {ph['p99_ms']:.0f} ms")
    ax1.set_xlabel("change -> watcher latency (ms)")
    ax1.set_ylabel("fraction of (change, watcher) pairs")
    ax1.set_title(f"{result['instances']} instances, {result['watchers']} watchers")
    ax1.legend(fontsize=8)
    ax1.grid(alpha=0.3)
    phases = result["phases"]
    labels = ["heartbeats\nonly"] + [f"{n}\nquiet" for n in phases] + [f"{n}\nchanges" for n in phases]
    agent = ([result["agent_heartbeat_cpu_pct"]] + [ph["quiet_agent_cpu_pct"] for ph in phases.values()]
             + [ph["agent_cpu_pct"] for ph in phases.values()])
    watchers = ([0.0] + [ph["quiet_watchers_cpu_pct"] for ph in phases.values()]
                + [ph["watchers_cpu_pct"] for ph in phases.values()])
    pos = range(len(labels))
    ax2.bar([x - 0.2 for x in pos], agent, width=0.4, label="consul-dev", color="#48c")
    ax2.bar([x + 0.2 for x in pos], watchers, width=0.4, label="50 watchers (all processes)", color="#c84")
    ax2.set_xticks(list(pos), labels, fontsize=8)
    ax2.legend(fontsize=8)
    ax2.set_ylabel("CPU (% of one core)")
    ax2.set_title(f"{result['heartbeats_per_s']:.0f} heartbeats/s, "
                  f"{result['agent_cpu_us_per_heartbeat']:.0f} us agent CPU each")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="dynamo-grpc bench discovery", description="consul-dev + discovery client at scale"
    )
    p.add_argument("--instances", type=int, default=1000)
    p.add_argument("--watchers", type=int, default=50)
    p.add_argument("--fleet-procs", type=int, default=4, help="processes the instances heartbeat from")
    p.add_argument("--watcher-procs", type=int, default=0, help="processes to spread watchers over (0: auto)")
    p.add_argument("--ttl", type=float, default=10.0, help="TTL of each instance's check (heartbeat at TTL/3)")
    p.add_argument("--changes", type=int, default=6, help="changes per phase (joins and leaves alternate)")
    p.add_argument("--gap", type=float, default=0.3, help="seconds between changes")
    p.add_argument("--poll-interval", type=float, default=1.0, help="baseline watchers' polling period")
    p.add_argument("--modes", default="sharded,blocking,polling",
                   help="phases, in order: sharded (ours), blocking (one query per watcher), polling")
    p.add_argument("--heartbeat-window", type=float, default=6.0)
    p.add_argument("--quiet-window", type=float, default=4.0, help="seconds watched with no changes")
    p.add_argument("--trace", action="store_true",
                   help="record per-stage times of each change (agent: write, wake-up, answer built; watcher: "
                        "received, parsed, merged, reported) and add a breakdown to each phase")
    p.add_argument("--baseline-src", type=Path, default=None,
                   help="before/after in one run: another checkout (e.g. `git archive main | tar -x -C DIR`) "
                        "whose agent, fleet and watchers run the 'before' side of each round")
    p.add_argument("--rounds", type=int, default=1, help="with --baseline-src: interleaved rounds")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="pool the rounds of these --baseline-src result files into --json (runs nothing)")
    p.add_argument("--json", type=Path, default=None,
                   help="default bench/results/discovery.json (discovery-before-after.json with "
                        "--baseline-src or --merge)")
    p.add_argument("--png", default=None, help="default: the --json path with .png")
    # internal: the child processes
    p.add_argument("--role", choices=["driver", "fleet", "watchers"], default="driver", help=argparse.SUPPRESS)
    p.add_argument("--addr", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="blocking", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "fleet":
        asyncio.run(_fleet(args.addr, args.first, args.count, args.ttl))
        return 0
    if args.role == "watchers":
        asyncio.run(_watchers(args.addr, args.first, args.count, args.mode, args.poll_interval))
        return 0
    if args.merge or args.baseline_src:
        return _compare_main(args)
    t = time.monotonic()
    result = asyncio.run(run(args))
    result["wall_s"] = time.monotonic() - t
    out = write_json(args.json or default_results_dir() / "discovery.json", result)
    png = save_plot(lambda png: plot(result, png), Path(args.png) if args.png else out.with_suffix(".png"))
    summary = {k: v for k, v in result.items() if k != "phases"}
    summary["phases"] = {k: {m: round(x, 2) for m, x in v.items() if m not in ("latencies_ms", "stages")}
                         for k, v in result["phases"].items()}
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    return 0


def _compare_main(args: argparse.Namespace) -> int:
    """--baseline-src (interleaved before/after rounds) or --merge (pool earlier such runs)."""
    from dynamo_grpc.bench import discovery_compare as cmp

    out_path = args.json or default_results_dir() / "discovery-before-after.json"
    if args.merge:
        doc = cmp.merge(args.merge, lambda path: json.loads(path.read_text()))
    else:
        src = args.baseline_src.resolve()
        if not (src / "src" / "dynamo_grpc").is_dir():
            raise SystemExit(f"--baseline-src {src}: no src/dynamo_grpc there (a checkout of this repository?)")
        if args.rounds < 1:
            raise SystemExit("--rounds must be >= 1")

        async def side(name: str) -> dict[str, Any]:
            _log(f"--- {name} ({src if name == 'before' else 'this checkout'})")
            t = time.monotonic()
            res = await run(args, src if name == "before" else None)
            res["wall_s"] = time.monotonic() - t
            return res

        t = time.monotonic()
        doc = asyncio.run(cmp.interleaved(args.rounds, side))
        meta = {"instances": args.instances, "watchers": args.watchers, "changes": args.changes,
                "baseline_src": str(src), "baseline_src_commit": _commit_of(src), "after_commit": _commit_of(None),
                "trace_after": args.trace, "wall_s": round(time.monotonic() - t, 1)}
        doc = cmp.finish(doc, meta)
    out = write_json(out_path, doc)
    png = save_plot(lambda png: cmp.plot(doc, png), Path(args.png) if args.png else out.with_suffix(".png"))
    print(json.dumps(doc["summary"], indent=2))
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    return 0


def _commit_of(src: Path | None) -> str | None:
    """The git commit of a checkout (``src``; None: this one), or a COMMIT file's, or None."""
    import subprocess

    root = src or Path(__file__).resolve().parents[3]
    marker = root / "COMMIT"
    if marker.is_file():
        return marker.read_text().strip()
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


if __name__ == "__main__":
    raise SystemExit(main())
