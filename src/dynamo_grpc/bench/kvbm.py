"""`dynamo-grpc bench kvbm`: what the KV tiers buy on multi-turn traffic, and what onboarding costs on torch.

Part 1, a mocker mesh (consul-dev, a router, N workers, a frontend; the replay's driver): synthetic
multi-turn conversations (each turn's prompt is the previous one plus a new user turn, Mooncake-style
512-token hash ids, so prefixes are real block hashes) at the load of docs/benchmarks.md (4 workers,
outputs <= 64 tokens, --router-prefill-load-scale 2, ~51k prompt tokens/s offered; speedup 1 by default,
see --speedup; the router's busy threshold off by default, see --router-busy-threshold). The
workers' device cache (G1) holds about a quarter of the slice's unique working set; three configs run
in interleaved rounds:

- ``g1``: device cache only (an evicted block is recomputed);
- ``g1+g2``: plus host memory sized for the rest of the working set;
- ``g1+g2+g3``: host memory for half the rest, local disk for all of it (so G3 has work).

Reported per config and round: TTFT p50/p99 (trace seconds), prefix hit rate per tier (from the
workers' /metrics), and the median over rounds with the spread (min..max).

Part 2, torch (the default SmolLM2-135M on this CPU, in process): TTFT of a 2k-token prompt whose
prefix was evicted from the device cache, served from G2, from G3, or recomputed (and a G1 hit for
reference); the greedy first token must be identical in all four.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from dynamo_grpc.bench.output import default_results_dir, save_plot, write_json
from dynamo_grpc.bench.replay import ReplayConfig, _drive
from dynamo_grpc.bench.replay_metrics import summarize
from dynamo_grpc.bench.replay_sim import _pct
from dynamo_grpc.bench.replay_trace import Trace, TraceRequest
from dynamo_grpc.router.config import QUEUE_POLICIES, RouterConfig

HASH_BLOCK = 512
ENGINE_BLOCK = 64
#: the mocker's modelled KV bytes per engine block (Llama-3-8B fp16: 128 KiB per token)
MOCKER_BLOCK_MIB = ENGINE_BLOCK * 128 // 1024
CONFIGS = ("g1", "g1+g2", "g1+g2+g3")


def conversations(
    n_conv: int, turns: int, first_blocks: int, add_blocks: int, rate: float, seed: int, think_s: float = 3.0
) -> Trace:
    """A multi-turn trace: conversation c's turn k shares turn k-1's whole prompt and adds ``add_blocks``.

    A conversation's next turn comes a think time (exponential, mean ``think_s``) after the previous
    one; conversation starts are spread so the whole trace lasts about ``requests / rate`` seconds.
    """
    rng = random.Random(seed)
    reqs: list[tuple[float, int, list[int]]] = []
    next_id = 0
    duration = n_conv * turns / rate
    starts = max(duration - (turns - 1) * think_s, 0.3 * duration)
    for _c in range(n_conv):
        t = rng.uniform(0, starts)
        blocks: list[int] = []
        for k in range(turns):
            grow = first_blocks if k == 0 else add_blocks
            blocks.extend(range(next_id, next_id + grow))
            next_id += grow
            reqs.append((t, len(blocks) * HASH_BLOCK, list(blocks)))
            t += rng.expovariate(1 / think_s)
    reqs.sort(key=lambda r: r[0])
    t0 = reqs[0][0]
    return Trace(
        "synthetic-multi-turn",
        "mooncake",
        tuple(TraceRequest(i, a - t0, n, 64, tuple(h)) for i, (a, n, h) in enumerate(reqs)),
        HASH_BLOCK,
    )


def unique_engine_blocks(trace: Trace) -> int:
    return len({h for r in trace.requests for h in (r.hash_ids or ())}) * (HASH_BLOCK // ENGINE_BLOCK)


def _scrape_tiers(consul: str) -> dict[str, float]:
    """Sum of the workers' kvbm hit tokens per tier (0 when a worker has no tiers)."""
    from dynamo_grpc.launch.consul_http import passing_instances
    from dynamo_grpc.transport.addresses import METRICS_META

    out = {"host": 0.0, "disk": 0.0}
    for e in passing_instances(consul, "dynamo-worker"):
        addr = (e["Service"].get("Meta") or {}).get(METRICS_META)
        if not addr:
            continue
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith("dynamo_worker_kvbm_hit_tokens_total{"):
                for tier in out:
                    if f'tier="{tier}"' in line:
                        out[tier] += float(line.rsplit(" ", 1)[1])
    return out


def router_args(args: argparse.Namespace) -> list[str]:
    """The router's flags in the mesh runs (every config alike): the load's prefill scale, the busy threshold
    and the router queue's order."""
    out = ["--router-prefill-load-scale", "2", "--router-busy-threshold", str(args.router_busy_threshold)]
    out += ["--router-queue-policy", args.router_queue_policy]
    if args.router_queue_policy == "cache-aware":
        out += ["--router-queue-age-cap-secs", str(args.router_queue_age_cap_secs)]
    return out


def engine_args(args: argparse.Namespace) -> list[str]:
    """The workers' scheduling flags in the mesh runs (every config alike)."""
    out = ["--schedule-policy", args.schedule_policy]
    if args.schedule_policy == "lpm":
        out += ["--schedule-age-cap-secs", str(args.schedule_age_cap_secs)]
    return out


def engine_fields(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`engine_args` as MockerConfig fields (the virtual-clock parts build their cores from them)."""
    return {"schedule_policy": args.schedule_policy, "schedule_age_cap_s": args.schedule_age_cap_secs}


def run_config(name: str, trace: Trace, args: argparse.Namespace, sizes: dict[str, int], work: Path) -> dict[str, Any]:
    from dynamo_grpc.launch.mesh import Mesh, MeshConfig

    wargs = ["--num-gpu-blocks", str(sizes["g1_blocks"]), "--metrics-port", "0", *engine_args(args)]
    if name != "g1":
        host = sizes["g2_blocks"] if name == "g1+g2" else sizes["g2_blocks"] // 2
        wargs += ["--kv-host-mib", str(host * MOCKER_BLOCK_MIB)]
    if name == "g1+g2+g3":
        d = tempfile.mkdtemp(prefix="g3-", dir=work)
        wargs += ["--kv-disk-dir", d, "--kv-disk-mib", str(sizes["g3_blocks"] * MOCKER_BLOCK_MIB)]
    cfg = ReplayConfig(trace.path, ["kv"], workers=args.workers, speedup=args.speedup, rate_scale=1.0)
    mc = MeshConfig(
        workers=args.workers,
        router_mode="kv",  # the frontend's embedded router (the default deployment; no Route RPC timeout)
        speedup_ratio=args.speedup,
        worker_args=wargs,
        frontend_args=router_args(args),
        acl=False,
    )
    t0 = time.monotonic()
    with Mesh(mc) as mesh:
        workers = sorted(str(e["Service"]["ID"]) for e in _instances(mesh.consul))
        _, records = asyncio.run(_drive(mesh.frontend_grpc, None, trace, cfg))
        tiers = _scrape_tiers(mesh.consul)
    s = summarize(records, args.speedup, workers, None)
    prompt = sum(r.prompt_tokens for r in records if r.ok)
    cached = sum(r.cached_tokens or 0 for r in records if r.ok)
    return {
        "config": name,
        "worker_args": wargs,
        "completed": s["completed"],
        "failed": s["failed"],
        "ttft_s": s["ttft_s"],
        "hit_rate": {
            "total": cached / prompt if prompt else 0.0,
            "device": (cached - tiers["host"] - tiers["disk"]) / prompt if prompt else 0.0,
            "host": tiers["host"] / prompt if prompt else 0.0,
            "disk": tiers["disk"] / prompt if prompt else 0.0,
        },
        "wall_s": round(time.monotonic() - t0, 1),
    }


def _instances(consul: str) -> list[dict[str, Any]]:
    from dynamo_grpc.launch.consul_http import passing_instances

    return list(passing_instances(consul, "dynamo-worker"))


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _summary(runs: list[dict[str, Any]], configs: tuple[str, ...] = CONFIGS) -> dict[str, Any]:
    """Per config: TTFT p50/p99 median and spread over rounds, hit rates, and the ratio to G1 only."""
    summary: dict[str, Any] = {}
    for name in configs:
        mine = [r for r in runs if r["config"] == name]
        summary[name] = {
            "ttft_p50_s": _spread([r["ttft_s"]["p50"] for r in mine]),
            "ttft_p99_s": _spread([r["ttft_s"]["p99"] for r in mine]),
            "hit_rate": {t: statistics.median(r["hit_rate"][t] for r in mine) for t in mine[0]["hit_rate"]},
        }
    g1 = [r for r in runs if r["config"] == "g1"]
    for name in configs[1:]:
        mine = [r for r in runs if r["config"] == name]
        per_round = [a["ttft_s"]["p50"] / b["ttft_s"]["p50"] for a, b in zip(g1, mine, strict=True)]
        summary[name]["ttft_p50_g1_over_this"] = _spread(per_round)
    return summary


# ---------------------------------------------------------------- one engine core on a virtual clock


def simulate_core(
    trace: Trace,
    name: str,
    sizes: dict[str, int],
    work: Path,
    host_gbps: float | None = None,
    engine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One worker's share of the trace through one mocker engine core, on a virtual clock.

    No processes and no wall time: requests join at their arrival times, each step advances the clock
    by the mocker's modelled step time (onboarding included), and TTFT is first token minus arrival.
    So the result is the timing model's answer, free of this machine's CPU contention.
    ``host_gbps`` overrides the modelled G2 bandwidth (the bound: a G2 that never misses and costs nothing);
    ``engine``: MockerConfig fields (the schedule policy).
    """
    from dynamo_grpc.bench.replay_tokens import DEFAULT_LOW_ID, DEFAULT_VOCAB_SIZE, prompt_tokens
    from dynamo_grpc.engines.base import EngineRequest, SamplingParams
    from dynamo_grpc.engines.core import EngineCore
    from dynamo_grpc.engines.mocker.config import MockerConfig
    from dynamo_grpc.engines.mocker.runner import MockerRunner
    from dynamo_grpc.kvbm import KvbmConfig

    kv = KvbmConfig()
    if name != "g1":
        host = sizes["g2_blocks"] if name == "g1+g2" else sizes["g2_blocks"] // 2
        kv.host_bytes = host * MOCKER_BLOCK_MIB << 20
        if host_gbps is not None:
            kv.host_gbps = host_gbps
    if name == "g1+g2+g3":
        kv.disk_dir = tempfile.mkdtemp(prefix="g3-core-", dir=work)
        kv.disk_bytes = sizes["g3_blocks"] * MOCKER_BLOCK_MIB << 20
    mc = MockerConfig(
        num_gpu_blocks=sizes["g1_blocks"], vocab_size=DEFAULT_VOCAB_SIZE, kvbm=kv, watermark=0.0, **(engine or {})
    )
    core = EngineCore(mc.core_config(), MockerRunner(mc))
    arrivals = {}
    first: dict[str, float] = {}
    pending = list(trace.requests)
    clock = 0.0
    core.scheduler.clock = lambda: clock  # the lpm age cap on the virtual clock
    i = 0
    cached = prompt = 0
    while i < len(pending) or core.has_work():
        while i < len(pending) and pending[i].arrival_s <= clock:
            r = pending[i]
            ids = prompt_tokens(r, HASH_BLOCK, DEFAULT_VOCAB_SIZE, DEFAULT_LOW_ID, 0).tolist()
            req = core.make_request(EngineRequest(f"r{r.index}", ids, SamplingParams(max_tokens=r.output_length)))
            core.add(req)
            arrivals[req.request_id] = r.arrival_s
            i += 1
        if not core.has_work():
            clock = pending[i].arrival_s
            continue
        res = core.step()
        clock += res.step_seconds
        for rid, out in res.outputs:
            if rid not in first:
                first[rid] = clock - arrivals[rid]
                cached += out.cached_tokens
                prompt += out.prompt_tokens
        if core.kv.tiers is not None and core.kv.tiers.disk is not None:
            core.kv.tiers.disk.flush()  # the virtual clock does not wait for the writer thread
    tiers = core.kv.tiers
    host_hits = tiers.stats.host.hit_tokens if tiers else 0
    disk_hits = tiers.stats.disk.hit_tokens if tiers else 0
    core.close()
    ttft = list(first.values())
    return {
        "config": name,
        "requests": len(ttft),
        "ttft_s": {"p50": _pct(ttft, 0.5), "p99": _pct(ttft, 0.99)},
        "hit_rate": {
            "total": cached / prompt,
            "device": (cached - host_hits - disk_hits) / prompt,
            "host": host_hits / prompt,
            "disk": disk_hits / prompt,
        },
    }


def router_flags(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`router_args` as RouterConfig fields (the routed virtual-clock part builds its router from them)."""
    out: dict[str, Any] = {
        "prefill_load_scale": 2.0,
        "busy_threshold": args.router_busy_threshold,
        "queue_policy": args.router_queue_policy,
    }
    if args.router_queue_policy == "cache-aware":
        out["queue_age_cap_s"] = args.router_queue_age_cap_secs
    return out


def routed_part(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The whole trace over ``--workers`` cores behind the real router, virtual clock (bench/kvbm_sim.py):
    the mesh's routing without its CPU contention. Round k uses the trace with seed k (round 1 = the mesh's)."""
    from dynamo_grpc.bench.kvbm_sim import simulate_routed

    runs = []
    variants: dict[str, list[dict[str, Any]]] = {}
    for rnd in range(args.rounds):
        trace = conversations(args.conversations, args.turns, 2, 2, args.rate, seed=rnd + 1, think_s=args.think_s)
        ws = unique_engine_blocks(trace)
        sizes = {
            "g1_blocks": -(-ws // 4 // args.workers),
            "g2_blocks": -(-(ws - ws // 4) * 5 // 4 // args.workers),
            "g3_blocks": -(-ws // args.workers) * 2,
        }
        for name in CONFIGS:
            r = simulate_routed(trace, name, sizes, work, args.workers, router_flags(args), engine_fields(args))
            r["round"] = rnd + 1
            runs.append(r)
            print(f"   routed {name} round {rnd + 1}: TTFT p50 {r['ttft_s']['p50']:.3f} s", file=sys.stderr)
        for label, rflags, eng in VARIANTS:
            for name in ("g1", "g1+g2"):
                r = simulate_routed(trace, name, sizes, work, args.workers, rflags, eng)
                variants.setdefault(label, []).append({"round": rnd + 1, **r})
    return {
        "router_flags": router_flags(args),
        "engine": engine_fields(args),
        "runs": runs,
        "summary": _summary(runs),
        "variants": {
            label: {
                "router_flags": rflags,
                "engine": eng,
                "runs": variants[label],
                "summary": _summary(variants[label], ("g1", "g1+g2")),
            }
            for label, rflags, eng in VARIANTS
        },
    }


_CACHE_AWARE = {
    "prefill_load_scale": 2.0,
    "busy_threshold": 0.95,
    "queue_policy": "cache-aware",
    "queue_age_cap_s": 30.0,
}
_ROUTER_FCFS = {"prefill_load_scale": 2.0, "busy_threshold": 1.0, "queue_policy": "fcfs"}
_LPM = {"schedule_policy": "lpm", "schedule_age_cap_s": 30.0}
#: the routed clock's side table (g1 vs g1+g2, every round): which router queue and engine admission order
#: let G2 gain most, like for like (docs/kvbm.md)
VARIANTS: tuple[tuple[str, dict[str, Any], dict[str, Any]], ...] = (
    ("router cache-aware, engine fcfs", _CACHE_AWARE, {}),
    ("router cache-aware, engine lpm", _CACHE_AWARE, _LPM),
    ("router fcfs (threshold off), engine fcfs", _ROUTER_FCFS, {}),
    ("router fcfs (threshold off), engine lpm", _ROUTER_FCFS, _LPM),
)


# ---------------------------------------------------------------- torch


def torch_onboard(rounds: int, prefix_tokens: int, threads: int, work: Path) -> dict[str, Any]:
    """TTFT of a ``prefix_tokens`` prompt from G1, G2, G3 or recomputed, on the default model (CPU)."""
    from dynamo_grpc.engines.base import EngineRequest, SamplingParams
    from dynamo_grpc.engines.torch import TorchEngine
    from dynamo_grpc.kvbm import KvbmConfig

    bs = ENGINE_BLOCK
    g1 = prefix_tokens // bs + 1  # one prompt (prefix + 16 tokens) fits; the next one evicts all of it
    kinds = {
        "recompute": KvbmConfig(),
        "host": KvbmConfig(host_bytes=1 << 30),
        "disk": KvbmConfig(disk_dir=str(work / "torch-g3"), disk_bytes=1 << 30),
    }
    engines = {
        k: TorchEngine(
            block_size=bs, num_blocks=g1, num_threads=threads, max_num_batched_tokens=prefix_tokens + bs, kvbm=c
        )
        for k, c in kinds.items()
    }
    rng = random.Random(7)

    def prompt() -> list[int]:
        return [rng.randrange(100, 40_000) for _ in range(prefix_tokens + 16)]

    async def first(eng: Any, ids: list[int]) -> tuple[float, int, int]:
        t0 = time.perf_counter()
        req = EngineRequest(f"r{rng.random()}", ids, SamplingParams(temperature=0, max_tokens=1))
        async for out in eng.generate(req):
            return time.perf_counter() - t0, out.token_ids[0], out.cached_tokens
        raise RuntimeError("no output")

    async def go() -> dict[str, Any]:
        for e in engines.values():
            await e.start()
        ttft: dict[str, list[float]] = {"g1": [], "host": [], "disk": [], "recompute": []}
        same = True
        cached: dict[str, list[int]] = {k: [] for k in ttft}
        try:
            await first(engines["recompute"], prompt())  # warm-up (allocator, kernels)
            for _ in range(rounds):
                p, evict = prompt(), prompt()
                toks = []
                for kind, eng in engines.items():
                    await first(eng, p)
                    if kind == "recompute":
                        t, tok, c = await first(eng, p)  # G1 hit, for reference
                        ttft["g1"].append(t)
                        cached["g1"].append(c)
                        toks.append(tok)
                    await first(eng, evict)
                    tiers = eng.core.kv.tiers
                    if tiers is not None and tiers.disk is not None:
                        tiers.disk.flush()
                    t, tok, c = await first(eng, p)
                    ttft[kind].append(t)
                    cached[kind].append(c)
                    toks.append(tok)
                same = same and len(set(toks)) == 1
        finally:
            for e in engines.values():
                await e.stop()
        med = {k: statistics.median(v) for k, v in ttft.items()}
        return {
            "prefix_tokens": prefix_tokens,
            "rounds": rounds,
            "threads": threads,
            "ttft_s": {k: _spread(v) for k, v in ttft.items()},
            "cached_tokens": cached,
            "recompute_over": {k: med["recompute"] / med[k] for k in ("g1", "host", "disk")},
            "identical_first_token": same,
        }

    return asyncio.run(go())


# ---------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynamo-grpc bench kvbm", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every config (default 3)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument(
        "--speedup",
        type=float,
        default=1.0,
        help="mocker speedup and trace compression (default 1: on a loaded machine a higher speedup measures "
        "the processes' CPU contention, multiplied, rather than the modelled engine)",
    )
    p.add_argument(
        "--router-busy-threshold",
        type=float,
        default=RouterConfig.busy_threshold,
        help="the router's KV busy threshold (default: the router's, 0.95). With this small device cache every "
        "worker is over it under load, so requests wait in the router queue: see --router-queue-policy",
    )
    p.add_argument(
        "--router-queue-policy",
        choices=QUEUE_POLICIES,
        default="cache-aware",
        help="the router queue's order (default cache-aware: a worker with room takes the waiting request with "
        "the most KV cached there; fcfs places each on whichever worker dips under the threshold first, "
        "whatever its cache holds: docs/kvbm.md)",
    )
    p.add_argument(
        "--router-queue-age-cap-secs",
        type=float,
        default=RouterConfig.queue_age_cap_s,
        help="cache-aware: the router queue's age cap (default: the router's)",
    )
    p.add_argument(
        "--schedule-policy",
        choices=("fcfs", "lpm"),
        default="fcfs",
        help="the workers' engine admission order, every config alike (default fcfs, the engine's; docs/kvbm.md)",
    )
    p.add_argument(
        "--schedule-age-cap-secs", type=float, default=30.0, help="lpm: the engine's age cap (default 30, the engine's)"
    )
    p.add_argument("--conversations", type=int, default=96)
    p.add_argument("--turns", type=int, default=7)
    p.add_argument(
        "--rate", type=float, default=18.0, help="requests per trace second as conversations start (~51k tokens/s)"
    )
    p.add_argument("--think-s", type=float, default=3.0, help="mean think time between a conversation's turns")
    p.add_argument("--skip-mocker", action="store_true", help="only the torch part")
    p.add_argument("--skip-torch", action="store_true", help="only the mocker part")
    p.add_argument("--skip-mesh", action="store_true", help="skip the mocker mesh (keep the virtual-clock core part)")
    p.add_argument(
        "--skip-routed", action="store_true", help="skip the routed virtual-clock part (N cores behind the router)"
    )
    p.add_argument("--torch-prefix", type=int, default=2048, help="prompt tokens of the torch part")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=default_results_dir() / "kvbm.json")
    p.add_argument(
        "--only-round",
        type=int,
        default=0,
        help="run only this mesh round (1..--rounds) and merge it into --json, keeping that file's other rounds, "
        "its core part and its torch part (so a long run can be split into short ones; 0 = the whole run)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not 0 <= args.only_round <= args.rounds:
        raise SystemExit(f"--only-round must be in 0..{args.rounds} (--rounds), got {args.only_round}")
    t_start = time.monotonic()
    report: dict[str, Any] = {"benchmark": "kvbm"}
    kept: dict[str, Any] = {}
    if args.only_round and args.json.exists():
        kept = json.loads(args.json.read_text())
        if kept.get("benchmark") != "kvbm":
            raise SystemExit(f"{args.json} is not a bench kvbm result: refusing to merge into it")
    work = Path(tempfile.mkdtemp(prefix="dynamo-kvbm-"))
    if not args.skip_mocker:
        trace = conversations(args.conversations, args.turns, 2, 2, args.rate, seed=1, think_s=args.think_s)
        ws = unique_engine_blocks(trace)
        sizes = {
            "working_set_blocks": ws,
            "g1_blocks": -(-ws // 4 // args.workers),
            "g2_blocks": -(-(ws - ws // 4) * 5 // 4 // args.workers),  # the rest, with a quarter spare
            "g3_blocks": -(-ws // args.workers) * 2,
        }
        report["mocker"] = {
            "trace": {
                "conversations": args.conversations,
                "turns": args.turns,
                "think_s": args.think_s,
                "requests": len(trace.requests),
                "duration_trace_s": trace.duration_s,
                "prompt_tokens_mean": statistics.mean(r.input_length for r in trace.requests),
                "offered_prompt_tokens_per_s": sum(r.input_length for r in trace.requests) / trace.duration_s,
            },
            "sizes_per_worker": sizes,
            "workers": args.workers,
            "speedup": args.speedup,
            "router_args": router_args(args),
            "engine_args": engine_args(args),
            "runs": [],
        }
        for key in ("router_args", "engine_args"):
            if kept.get("mocker", {}).get(key, report["mocker"][key]) != report["mocker"][key]:
                raise SystemExit(f"{args.json} was run with other {key}: refusing to merge rounds into it")
        if kept:
            report["mocker"]["runs"] = [
                r for r in kept.get("mocker", {}).get("runs", []) if r["round"] != args.only_round
            ]
        # one worker's share (conversations / workers at rate / workers) through one core, virtual clock
        core_runs = []
        bound_runs: list[dict[str, Any]] = []
        for rnd in range(0 if "core_virtual_clock" in kept else args.rounds):
            share = conversations(
                max(args.conversations // args.workers, 1), args.turns, 2, 2, args.rate / args.workers,
                seed=100 + rnd, think_s=args.think_s,
            )  # fmt: skip
            ws1 = unique_engine_blocks(share)
            one = {"g1_blocks": -(-ws1 // 4), "g2_blocks": -(-(ws1 - ws1 // 4) * 5 // 4), "g3_blocks": ws1 * 2}
            for name in CONFIGS:
                r = simulate_core(share, name, one, work, engine=engine_fields(args))
                r["round"] = rnd + 1
                r["sizes"] = one
                core_runs.append(r)
                print(f"   core {name} round {rnd + 1}: TTFT p50 {r['ttft_s']['p50']:.3f} s", file=sys.stderr)
            # the bound of any G2 here: the whole working set in host memory, transfers free
            b = simulate_core(
                share, "g1+g2", dict(one, g2_blocks=ws1 * 4), work, host_gbps=1e9, engine=engine_fields(args)
            )
            bound_runs.append({"round": rnd + 1, "ttft_s": b["ttft_s"], "hit_rate": b["hit_rate"]})
        g1_p50 = [r["ttft_s"]["p50"] for r in core_runs if r["config"] == "g1"]
        report["core_virtual_clock"] = (
            kept["core_virtual_clock"]
            if "core_virtual_clock" in kept
            else {
                "runs": core_runs,
                "summary": _summary(core_runs),
                "g2_bound": {
                    "what": "g1+g2 with G2 holding 4x the working set and free transfers: the most any G2 can give",
                    "runs": bound_runs,
                    "ttft_p50_g1_over_this": _spread(
                        [a / r["ttft_s"]["p50"] for a, r in zip(g1_p50, bound_runs, strict=True)]
                    ),
                },
            }
        )
        if "routed_virtual_clock" in kept:
            report["routed_virtual_clock"] = kept["routed_virtual_clock"]
        elif not args.skip_routed:
            report["routed_virtual_clock"] = routed_part(args, work)
        write_json(args.json, report)
        mesh_rounds = [] if args.skip_mesh else [args.only_round - 1] if args.only_round else range(args.rounds)
        for rnd in mesh_rounds:
            for name in CONFIGS:
                print(f"== round {rnd + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
                r = run_config(name, trace, args, sizes, work)
                r["round"] = rnd + 1
                report["mocker"]["runs"].append(r)
                print(
                    f"   TTFT p50 {r['ttft_s']['p50']:.3f} p99 {r['ttft_s']['p99']:.3f} trace-s, hit "
                    + ", ".join(f"{k} {v:.1%}" for k, v in r["hit_rate"].items()),
                    file=sys.stderr,
                    flush=True,
                )
                write_json(args.json, report)
        if report["mocker"]["runs"]:
            report["mocker"]["runs"].sort(key=lambda r: (r["round"], CONFIGS.index(r["config"])))
            report["mocker"]["summary"] = _summary(report["mocker"]["runs"])

    if args.skip_torch and "torch" in kept:
        report["torch"] = kept["torch"]  # not re-run: the earlier run's numbers stay, with their note
    if not args.skip_torch:
        print("== torch: 2k-token prefix from G1 / G2 / G3 / recompute", file=sys.stderr, flush=True)
        report["torch"] = torch_onboard(args.rounds, args.torch_prefix, args.torch_threads, work)
    report["wall_s"] = round(time.monotonic() - t_start, 1)
    write_json(args.json, report)
    print(f"wrote {args.json}", file=sys.stderr)
    png = save_plot(lambda path: _plot(report, path), args.json.with_suffix(".png"))
    if png is not None:
        print(f"wrote {png}", file=sys.stderr)
    return 0


def _plot(report: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ttft_panels: list[tuple[str, dict[str, Any], str]] = []
    if report.get("mocker", {}).get("summary"):
        ttft_panels.append(("mocker mesh (trace s)", report["mocker"]["summary"], "TTFT (trace s)"))
    if "routed_virtual_clock" in report:
        ttft_panels.append(("cores + router, virtual clock (s)", report["routed_virtual_clock"]["summary"], "TTFT (s)"))
    if "core_virtual_clock" in report:
        ttft_panels.append(("one core, virtual clock (s)", report["core_virtual_clock"]["summary"], "TTFT (s)"))
    n = len(ttft_panels) + (1 if ttft_panels else 0) + ("torch" in report)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    i = 0
    x = list(range(len(CONFIGS)))
    for title, s, ylabel in ttft_panels:
        ax = axes[i]
        for off, key, label in ((-0.2, "ttft_p50_s", "p50"), (0.2, "ttft_p99_s", "p99")):
            med = [s[c][key]["median"] for c in CONFIGS]
            lo = [m - s[c][key]["min"] for c, m in zip(CONFIGS, med, strict=True)]
            hi = [s[c][key]["max"] - m for c, m in zip(CONFIGS, med, strict=True)]
            ax.bar([v + off for v in x], med, 0.4, yerr=[lo, hi], capsize=3, label=label)
        ax.set_xticks(x, CONFIGS)
        ax.set_ylabel(ylabel + ", median of rounds, min..max")
        ax.set_title(title)
        ax.legend()
        i += 1
    if ttft_panels:
        title, s, _ = ttft_panels[0]  # the mesh's when there is one
        ax = axes[i]
        bottom = [0.0] * len(CONFIGS)
        for tier in ("device", "host", "disk"):
            vals = [100 * s[c]["hit_rate"][tier] for c in CONFIGS]
            ax.bar(x, vals, 0.6, bottom=bottom, label=tier)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_xticks(x, CONFIGS)
        ax.set_ylabel("prompt tokens served from cache (%)")
        ax.set_title(f"prefix hits by tier, {title.split(' (')[0]}")
        ax.legend()
        i += 1
    if "torch" in report:
        t = report["torch"]
        ax = axes[i]
        kinds = ["g1", "host", "disk", "recompute"]
        med = [t["ttft_s"][k]["median"] for k in kinds]
        lo = [m - t["ttft_s"][k]["min"] for k, m in zip(kinds, med, strict=True)]
        hi = [t["ttft_s"][k]["max"] - m for k, m in zip(kinds, med, strict=True)]
        ax.bar(kinds, med, yerr=[lo, hi], capsize=3)
        ax.set_ylabel("TTFT (s)")
        ax.set_title(f"torch, {t['prefix_tokens']}-token prefix (CPU)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
