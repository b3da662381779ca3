"""Herding without replica sync: a burst sharing a cached prefix, through one frontend and through 2 frontend
replicas with and without `--router-replica-sync`, in interleaved rounds (each run its own mocker mesh).

Each embedded KV router prefers the worker that holds the burst's prefix, and counts the load it has sent there
until that worker's cost exceeds another's. With sync it also counts what the other replica sent, so the holder
is "full" after half as many of its own requests and the rest of the burst spreads; without sync each replica
sends its share there as if the other sent nothing: both herd onto one worker. What a user notices: the holder
gets more of the burst and the burst's latency grows. (`bench replay-replicas` shows the other half of the
claim: on a trace, synced replicas route as well as one frontend.)

    dynamo-grpc bench replica-herding [--requests 48] [--rounds 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from dynamo_grpc.bench.output import default_results_dir, save_plot, write_json
from dynamo_grpc.bench.replay_driver import build_request
from dynamo_grpc.bench.replay_replicas import Panel, plot_rounds
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.mesh import Mesh, MeshConfig

CONFIGS: dict[str, list[str]] = {
    "1 frontend": [],  # the reference: one router sees every request
    "2 replicas, sync": ["--replicas", "2"],
    "2 replicas, no sync": ["--replicas", "2", "--no-router-replica-sync"],
}


def token_ids(seed: int, n: int) -> np.ndarray:
    """``n`` deterministic token ids; two seeds share no leading block."""
    return (seed * 7919 + np.arange(n) * 31) % 40_000 + 100


async def _ask(stub: pb_grpc.GRPCInferenceServiceStub, req: pb.ModelInferRequest) -> tuple[str, float, float]:
    """One streamed request: the worker that served it, its time to first response and to the last (s)."""

    async def one() -> Any:
        yield req

    t0 = time.perf_counter()
    ttft = None
    async for msg in stub.ModelStreamInfer(one(), timeout=120):
        if msg.error_message:
            raise RuntimeError(msg.error_message)
        if ttft is None:
            ttft = time.perf_counter() - t0
        params = msg.infer_response.parameters
        if params["triton_final_response"].bool_param:
            return params["worker_id"].string_param, ttft, time.perf_counter() - t0
    raise RuntimeError("stream ended without a final response")


async def burst(address: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    """Cache a prefix on one worker, then send the burst that shares it; where it went and how long it took."""
    opts = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel: the kernel spreads them
    channels = [grpc.aio.insecure_channel(address, options=opts) for _ in range(args.channels)]
    stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
    try:
        for k, stub in enumerate(stubs):  # open every connection (each lands on one replica)
            await _ask(stub, build_request(f"c{k}", model, token_ids(10_000 + k, 64), 1))
        prefix = token_ids(1, args.prefix_tokens)
        holder, _, _ = await _ask(stubs[0], build_request("warm", model, np.concatenate([prefix, token_ids(2, 64)]), 1))
        await asyncio.sleep(1.0)  # the prefix's KV events reach both replicas' indexes
        reqs = [
            build_request(f"b{i}", model, np.concatenate([prefix, token_ids(100 + i, 64)]), args.output_tokens)
            for i in range(args.requests)
        ]
        async def later(i: int, req: pb.ModelInferRequest) -> tuple[str, float, float]:
            await asyncio.sleep(i * args.spacing_ms / 1e3)
            return await _ask(stubs[i % len(stubs)], req)

        done = await asyncio.gather(*(later(i, r) for i, r in enumerate(reqs)))
    finally:
        for c in channels:
            await c.close()
    return summarize(holder, done)


def summarize(holder: str, done: list[tuple[str, float, float]]) -> dict[str, Any]:
    """Share of the burst on the prefix's holder, requests per worker, and the burst's latencies."""
    per = Counter(w for w, _, _ in done)
    counts = sorted(per.values(), reverse=True)
    ttft = sorted(t for _, t, _ in done)
    e2e = sorted(t for _, _, t in done)
    n = len(done)
    return {
        "holder_share": per[holder] / n,
        "requests_per_worker": counts,
        "requests_cv": statistics.pstdev(counts) / statistics.mean(counts) if counts else 0.0,
        "ttft_p50_s": ttft[n // 2],
        "ttft_max_s": ttft[-1],
        "e2e_p50_s": e2e[n // 2],
        "e2e_max_s": e2e[-1],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name, frontend_args in CONFIGS.items():
            cfg = MeshConfig(workers=args.workers, speedup_ratio=args.speedup, frontend_args=frontend_args,
                             acl=False, ready_timeout_s=90.0)  # fmt: skip
            with Mesh(cfg) as mesh:
                rounds[name].append(asyncio.run(burst(mesh.frontend_grpc, mesh.models[0], args)))
            print(f"[replica-herding] round {r + 1}: {name}: {rounds[name][-1]}", file=sys.stderr, flush=True)
    keys = ("holder_share", "requests_cv", "ttft_p50_s", "ttft_max_s", "e2e_p50_s", "e2e_max_s")
    medians = {name: {k: statistics.median(x[k] for x in runs) for k in keys} for name, runs in rounds.items()}
    return {
        "requests": args.requests, "prefix_tokens": args.prefix_tokens, "output_tokens": args.output_tokens,
        "spacing_ms": args.spacing_ms,
        "workers": args.workers, "speedup": args.speedup, "channels": args.channels, "rounds": args.rounds,
        "medians": medians, "runs": rounds,
    }  # fmt: skip


def plot(result: dict[str, Any], png: Path) -> None:
    panels: list[Panel] = [
        ("burst on the prefix's worker, %", [("holder_share", 100.0, "#c84")]),
        ("burst latency, s (blue p50, green max)", [("e2e_p50_s", 1.0, "#48c"), ("e2e_max_s", 1.0, "#2a7")]),
    ]
    title = (f"{result['requests']} requests sharing a {result['prefix_tokens']}-token prefix, "
             f"{result['workers']} workers, {result['rounds']} rounds")  # fmt: skip
    plot_rounds(result["runs"], panels, title, png, hline=(100 / result["workers"], "an even share"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dynamo-grpc bench replica-herding", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--requests", type=int, default=48, help="requests in the burst")
    p.add_argument("--prefix-tokens", type=int, default=1024, help="the prefix the burst shares")
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--spacing-ms", type=float, default=10.0,
                   help="between two requests' starts (0: all at once, faster than replica sync can tell the other)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--speedup", type=float, default=1.0, help="mocker speedup (1: requests overlap for ~1 s)")
    p.add_argument("--channels", type=int, default=16, help="client connections (spread over the replicas)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--json", type=Path, default=default_results_dir() / "replica_herding.json")
    args = p.parse_args(argv)
    result = run(args)
    out = write_json(args.json, result)
    save_plot(lambda png: plot(result, png), out.with_suffix(".png"))
    print({name: {k: round(v, 3) for k, v in m.items()} for name, m in result["medians"].items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
