"""Router indexer and decision benchmark: ours vs baselines, same run, same workload.

At 64 workers and ~1M stored block events: KV block events applied per second, Route decisions
per second and p50/p99 decision latency (full ``Router.route`` with precomputed block hashes,
policy over 64 workers), and bytes of memory per indexed block (tracemalloc).

Three decision paths over the same queries:
  * ``ours``: bitmask index + dense per-rank numpy arrays (the router as shipped);
  * ``candidates``: the same index, but the earlier policy path that builds one ``Candidate``
    object per rank in Python per decision (what ``ours`` replaced);
  * ``naive``: a set of hashes per worker, scanned per query, with the candidate path.

Latency is measured per decision after a warm-up, both as wall time (perf_counter: includes
preemption by other processes) and as this thread's CPU time (thread_time: what one core
spends), once with the garbage collector enabled and once with ``gc.disable()`` around the
timed loop. Throughput is decisions / wall time of the timed loop, and decisions / CPU time.
Writes JSON (``--json``) and a PNG next to it.

    dynamo-grpc bench router [--out DIR]        (bench/results/router.json by default)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import time
import tracemalloc
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

from dynamo_grpc.bench.output import default_results_dir, save_plot, write_json
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.indexer import KvIndexer
from dynamo_grpc.router.policy import Candidate, costs, not_busy, pick
from dynamo_grpc.router.router import NoWorkers, RouteInput, Router, RouteResult, WorkerInfo


class NaiveIndexer:
    """Baseline: a set of block hashes per worker; a query scans every worker's set."""

    def __init__(self) -> None:
        self.sets: dict[Hashable, set[int]] = {}

    def store(self, key: Hashable, hashes: Sequence[int], parent_hash: int | None = None) -> None:
        self.sets.setdefault(key, set()).update(hashes)

    def remove(self, key: Hashable, hashes: Sequence[int]) -> None:
        s = self.sets.get(key)
        if s is not None:
            s.difference_update(hashes)

    def overlaps(self, chain: Sequence[int], touch: bool = True) -> dict[Hashable, int]:
        out = {}
        for key, s in self.sets.items():
            n = 0
            for h in chain:
                if h not in s:
                    break
                n += 1
            if n:
                out[key] = n
        return out

    def __len__(self) -> int:
        return len(set().union(*self.sets.values())) if self.sets else 0

    def needs_sweep(self) -> bool:
        return False


def make_workload(workers: int, blocks: int, chain_len: int, seed: int) -> list[tuple[tuple[str, int], list[int]]]:
    """Stored events: chains of ``chain_len`` hashes; half of the chains share a prefix with another."""
    rng = random.Random(seed)
    events = []
    prefixes: list[list[int]] = []
    total = 0
    while total < blocks:
        key = (f"w{rng.randrange(workers)}", 0)
        if prefixes and rng.random() < 0.5:
            base = rng.choice(prefixes)[: rng.randrange(1, chain_len)]
        else:
            base = []
        chain = base + [rng.getrandbits(64) for _ in range(chain_len - len(base))]
        prefixes.append(chain)
        if len(prefixes) > 1000:
            prefixes.pop(0)
        events.append((key, chain))
        total += chain_len
    return events


def bench_apply(index: KvIndexer | NaiveIndexer, events: list[tuple[tuple[str, int], list[int]]]) -> float:
    gc.collect()
    t0 = time.perf_counter()
    for key, chain in events:
        index.store(key, chain)
    dt = time.perf_counter() - t0
    return sum(len(c) for _, c in events) / dt


class CandidateRouter(Router):
    """Baseline decision path: one ``Candidate`` per rank built in Python per decision (the pre-numpy policy)."""

    def route(self, inp: RouteInput) -> RouteResult:
        ranks = [k for w in self.workers.values() for k in w.ranks()]
        if inp.exclude:
            ranks = [k for k in ranks if k[0] not in set(inp.exclude)]
        if not ranks:
            raise NoWorkers("no live worker")
        hashes = self.hashes_for(inp)
        overlaps = self.indexer.overlaps(hashes)
        per_worker = self.active._per_worker
        cands = []
        for key in ranks:
            a = per_worker.get(key)
            usage = self.kv_usage.get(key)
            if usage is None and a is not None and self.workers[key[0]].kv_blocks:
                usage = (a.prefill_blocks + a.decode_blocks) / self.workers[key[0]].kv_blocks
            if a is None:
                cands.append(Candidate(key, overlaps.get(key, 0), 0, 0, usage))
            else:
                cands.append(Candidate(key, overlaps.get(key, 0), a.prefill_blocks, a.decode_blocks, usage))
        cands = not_busy(cands, self.config.busy_threshold)
        prompt_blocks = len(hashes)
        decode_new = prompt_blocks + -(-inp.expected_output_tokens // self.block_size)
        choice = pick(
            costs(cands, prompt_blocks, decode_new, self.config.prefill_load_scale), self.config.temperature, self.rng
        )
        chosen: tuple[str, int] = choice.key  # type: ignore[assignment]
        iid, rank = chosen
        return RouteResult(
            iid, rank, self.workers[iid].grpc_address, choice.overlap, prompt_blocks,
            choice.prefill_cost, choice.decode_cost, "kv",
        )  # fmt: skip


def _percentiles(lat: list[float]) -> dict[str, float]:
    lat = sorted(lat)
    return {
        "p50_ms": lat[len(lat) // 2] * 1e3,
        "p99_ms": lat[int(len(lat) * 0.99)] * 1e3,
        "p999_ms": lat[int(len(lat) * 0.999)] * 1e3,
        "max_ms": lat[-1] * 1e3,
        "mean_ms": statistics.fmean(lat) * 1e3,
    }


def bench_decisions(
    index: KvIndexer | NaiveIndexer,
    events: list[tuple[tuple[str, int], list[int]]],
    workers: int,
    n: int,
    seed: int,
    router_cls: type[Router] = Router,
    warmup: int = 1000,
) -> dict[str, object]:
    """Route ``n`` queries (a random stored chain cut at a random depth, plus one unseen block).

    Every query has a 50 % chance to be committed (load added to the chosen rank) and a
    committed request is freed 256 decisions later, so per-rank load changes all the time and
    the decision's load arrays are really exercised; frees are outside the timed call but
    inside the throughput loop.
    """
    router = router_cls(RouterConfig(block_size=64, max_indexed_blocks=0, seed=seed), indexer=index)  # type: ignore[arg-type]
    router.set_workers([WorkerInfo(f"w{i}", f"127.0.0.1:{9000 + i}", "m", 64, 1, 16384) for i in range(workers)])
    router.ready = True
    rng = random.Random(seed)

    def queries(tag: str, count: int) -> list[RouteInput]:
        out = []
        for i in range(count):
            _, chain = events[rng.randrange(len(events))]
            cut = rng.randrange(1, len(chain) + 1)
            hashes = [*chain[:cut], rng.getrandbits(64)]
            out.append(
                RouteInput(f"{tag}{i}", block_hashes=hashes, expected_output_tokens=256, dry_run=rng.random() < 0.5)
            )
        return out

    def run(qs: list[RouteInput]) -> tuple[list[float], list[float], float, float]:
        wall: list[float] = []
        cpu: list[float] = []
        live: list[str] = []
        perf, thread = time.perf_counter, time.thread_time
        t_all, c_all = perf(), thread()
        for q in qs:
            c0 = thread()
            t0 = perf()
            router.route(q)
            t1 = perf()
            c1 = thread()
            wall.append(t1 - t0)
            cpu.append(c1 - c0)
            if not q.dry_run:
                live.append(q.request_id)
                if len(live) > 256:
                    router.free(live.pop(0))
        total_wall, total_cpu = perf() - t_all, thread() - c_all
        for rid in live:
            router.free(rid)
        return wall, cpu, total_wall, total_cpu

    run(queries("warm", warmup))
    out: dict[str, object] = {}
    for label, disable_gc in (("gc_on", False), ("gc_off", True)):
        qs = queries(label, n)
        gc.collect()
        if disable_gc:
            gc.disable()
        try:
            wall, cpu, total_wall, total_cpu = run(qs)
        finally:
            gc.enable()
        out[label] = {
            "decisions_per_s": n / total_wall,
            "decisions_per_cpu_s": n / total_cpu,
            "wall": _percentiles(wall),
            "cpu": _percentiles(cpu),
        }
    return out


def bench_memory(make: type, events: list[tuple[tuple[str, int], list[int]]]) -> float:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    index = make()
    for key, chain in events:
        index.store(key, list(chain))  # fresh int objects, as decoded from protobuf
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / max(len(index), 1)


def bench_remove(index: KvIndexer | NaiveIndexer, events: list[tuple[tuple[str, int], list[int]]]) -> float:
    sample = events[: len(events) // 4]
    t0 = time.perf_counter()
    for key, chain in sample:
        index.remove(key, chain)
    return sum(len(c) for _, c in sample) / (time.perf_counter() - t0)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = ["ours", "candidates", "naive"]
    colors = ["tab:green", "tab:orange", "tab:gray"]
    dec = {p: result["decisions"][p] for p in paths}
    index = result["index"]
    idx_paths = ["ours", "naive"]
    panels: list[tuple[str, list[str], list[float], float | None]] = [
        ("store events/s (M)", idx_paths, [index[p]["store_events_per_s"] / 1e6 for p in idx_paths], 1.0),
        ("decisions/s, wall (k)", paths, [dec[p]["gc_on"]["decisions_per_s"] / 1e3 for p in paths], 20.0),
        ("decisions per CPU-s (k)", paths, [dec[p]["gc_on"]["decisions_per_cpu_s"] / 1e3 for p in paths], 20.0),
        ("p99 decision, wall ms (gc off)", paths, [dec[p]["gc_off"]["wall"]["p99_ms"] for p in paths], 1.0),
        ("p99 decision, CPU ms (gc on)", paths, [dec[p]["gc_on"]["cpu"]["p99_ms"] for p in paths], 1.0),
        ("bytes/block", idx_paths, [index[p]["bytes_per_block"] for p in idx_paths], None),
    ]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(20, 3.8))
    for ax, (title, names, values, target) in zip(axes, panels, strict=True):
        ax.bar(names, values, color=[colors[paths.index(n)] for n in names])
        if target is not None:
            ax.axhline(target, color="tab:red", linestyle="--", linewidth=1, label="target")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(
        f"router: {result['workers']} workers, {result['indexed_blocks']:,} indexed blocks "
        f"({result['machine']}); red = target"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dynamo-grpc bench router", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--blocks", type=int, default=1_000_000)
    p.add_argument("--chain-len", type=int, default=32)
    p.add_argument("--decisions", type=int, default=20_000)
    p.add_argument("--baseline-decisions", type=int, default=3_000)
    p.add_argument("--memory-blocks", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=default_results_dir() / "router.json")
    args = p.parse_args(argv)

    events = make_workload(args.workers, args.blocks, args.chain_len, args.seed)
    ours_idx, naive_idx = KvIndexer(), NaiveIndexer()
    index: dict[str, dict[str, float]] = {
        "ours": {"store_events_per_s": bench_apply(ours_idx, events)},
        "naive": {"store_events_per_s": bench_apply(naive_idx, events)},
    }
    indexed = len(ours_idx)
    decisions = {
        "ours": bench_decisions(ours_idx, events, args.workers, args.decisions, args.seed),
        "candidates": bench_decisions(
            ours_idx, events, args.workers, args.baseline_decisions, args.seed, CandidateRouter
        ),
        "naive": bench_decisions(naive_idx, events, args.workers, args.baseline_decisions, args.seed, CandidateRouter),
    }
    index["ours"]["remove_events_per_s"] = bench_remove(ours_idx, events)
    index["naive"]["remove_events_per_s"] = bench_remove(naive_idx, events)
    mem_events = make_workload(args.workers, args.memory_blocks, args.chain_len, args.seed + 1)
    index["ours"]["bytes_per_block"] = bench_memory(KvIndexer, mem_events)
    index["naive"]["bytes_per_block"] = bench_memory(NaiveIndexer, mem_events)
    result: dict[str, Any] = {
        "workers": args.workers,
        "indexed_blocks": indexed,
        "stored_block_events": sum(len(c) for _, c in events),
        "chain_len": args.chain_len,
        "machine": f"{os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f} at the end",
        "index": index,
        "decisions": decisions,
        "targets": {"store_events_per_s": 1e6, "decisions_per_s": 2e4, "p99_ms": 1.0},
        "dynamo_rust_reference_events_per_s": 1e7,
    }
    write_json(args.json, result)
    save_plot(lambda png: plot(result, png), args.json.with_suffix(".png"))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
