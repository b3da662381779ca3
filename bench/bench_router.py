"""Router indexer and decision benchmark: ours vs a naive per-worker-set baseline, same run.

At 64 workers and ~1M indexed blocks: KV block events applied per second, Route decisions
per second and p50/p99 decision latency (full Router.route with precomputed block hashes,
policy over 64 workers), and bytes of memory per indexed block (tracemalloc).
Writes JSON (``--json``) and a PNG under bench/results/.

    PYTHONPATH=src:gen python bench/bench_router.py --json bench/results/router.json
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time
import tracemalloc
from collections.abc import Hashable, Sequence
from pathlib import Path

from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.indexer import KvIndexer
from dynamo_grpc.router.router import RouteInput, Router, WorkerInfo


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


def bench_decisions(
    index: KvIndexer | NaiveIndexer, events: list[tuple[tuple[str, int], list[int]]], workers: int, n: int, seed: int
) -> dict[str, float]:
    router = Router(RouterConfig(block_size=64, max_indexed_blocks=0, seed=seed))
    router.set_workers([WorkerInfo(f"w{i}", f"127.0.0.1:{9000 + i}", "m", 64, 1, 16384) for i in range(workers)])
    router.indexer = index  # type: ignore[assignment]
    router.ready = True
    rng = random.Random(seed)
    queries = []
    for i in range(n):
        _, chain = events[rng.randrange(len(events))]
        cut = rng.randrange(1, len(chain) + 1)
        queries.append(RouteInput(f"q{i}", block_hashes=[*chain[:cut], rng.getrandbits(64)], dry_run=True))
    lat = []
    gc.collect()
    t_all = time.perf_counter()
    for q in queries:
        t0 = time.perf_counter()
        router.route(q)
        lat.append(time.perf_counter() - t0)
    total = time.perf_counter() - t_all
    lat.sort()
    return {
        "decisions_per_s": n / total,
        "p50_ms": lat[len(lat) // 2] * 1e3,
        "p99_ms": lat[int(len(lat) * 0.99)] * 1e3,
        "mean_ms": statistics.fmean(lat) * 1e3,
    }


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


def plot(result: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours, naive = result["ours"], result["naive"]
    assert isinstance(ours, dict) and isinstance(naive, dict)
    metrics = [
        ("store events/s", "store_events_per_s"),
        ("remove events/s", "remove_events_per_s"),
        ("decisions/s", "decisions_per_s"),
        ("p99 decision ms", "p99_ms"),
        ("bytes/block", "bytes_per_block"),
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(16, 3.6))
    for ax, (title, key) in zip(axes, metrics, strict=True):
        ax.bar(["ours", "naive"], [ours[key], naive[key]], color=["tab:green", "tab:gray"])
        ax.set_title(title)
    fig.suptitle(f"router indexer: {result['workers']} workers, {result['indexed_blocks']:,} blocks")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--blocks", type=int, default=1_000_000)
    p.add_argument("--chain-len", type=int, default=32)
    p.add_argument("--decisions", type=int, default=20_000)
    p.add_argument("--naive-decisions", type=int, default=2_000)
    p.add_argument("--memory-blocks", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench/results/router.json")
    args = p.parse_args(argv)

    events = make_workload(args.workers, args.blocks, args.chain_len, args.seed)
    ours_idx, naive_idx = KvIndexer(), NaiveIndexer()
    ours: dict[str, float] = {"store_events_per_s": bench_apply(ours_idx, events)}
    naive: dict[str, float] = {"store_events_per_s": bench_apply(naive_idx, events)}
    indexed = len(ours_idx)
    ours.update(bench_decisions(ours_idx, events, args.workers, args.decisions, args.seed))
    naive.update(bench_decisions(naive_idx, events, args.workers, args.naive_decisions, args.seed))
    ours["remove_events_per_s"] = bench_remove(ours_idx, events)
    naive["remove_events_per_s"] = bench_remove(naive_idx, events)
    mem_events = make_workload(args.workers, args.memory_blocks, args.chain_len, args.seed + 1)
    ours["bytes_per_block"] = bench_memory(KvIndexer, mem_events)
    naive["bytes_per_block"] = bench_memory(NaiveIndexer, mem_events)
    result: dict[str, object] = {
        "workers": args.workers,
        "indexed_blocks": indexed,
        "chain_len": args.chain_len,
        "ours": ours,
        "naive": naive,
        "targets": {"store_events_per_s": 1e6, "decisions_per_s": 2e4, "p99_ms": 1.0},
        "dynamo_rust_reference_events_per_s": 1e7,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
