"""`dynamo-grpc bench security`: what mTLS + CURVE cost on the request path and at start-up.

Two meshes side by side (consul-dev with ACLs, one mocker worker at a high speed-up, a frontend with the embedded
KV router): one plaintext, one with `run-local --tls --curve`'s material. Rounds alternate between them (plain,
secure, plain, ...) so machine noise hits both; each round sends the same unary KServe requests at a fixed
concurrency from a client that holds the CA. Reported: per-round p50/p95 latency and throughput, their
secure/plain ratios (median and spread over rounds), and each mesh's time to ready.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from dynamo_grpc.bench.output import default_results_dir, save_plot, write_json
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.mesh import Mesh, MeshConfig
from dynamo_grpc.launch.security import MeshSecurity, local_security


def _request(model: str, seed: int, tokens: int) -> pb.ModelInferRequest:
    """64 prompt token ids (distinct per seed: no prefix-cache luck) and `tokens` generated ones."""
    ids = [(seed * 7919 + i * 31) % 40_000 + 100 for i in range(64)]
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="input_ids", datatype="INT32", shape=[len(ids)])
    req.raw_input_contents.append(struct.pack(f"<{len(ids)}i", *ids))
    sampling = json.dumps({"max_tokens": tokens, "ignore_eos": True}).encode()
    req.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(struct.pack("<I", len(sampling)) + sampling)
    return req


def _channel(mesh: Mesh, sec: MeshSecurity | None) -> grpc.aio.Channel:
    if sec is None or sec.tls is None:
        return grpc.aio.insecure_channel(mesh.frontend_grpc)
    return grpc.aio.secure_channel(mesh.frontend_grpc, grpc.ssl_channel_credentials(sec.tls.ca.read_bytes()))


async def _round(
    mesh: Mesh, sec: MeshSecurity | None, n: int, concurrency: int, tokens: int, seed: int
) -> dict[str, float]:
    """One round on a fresh channel (so the handshake is part of it, as for a new client)."""
    latencies: list[float] = []
    sem = asyncio.Semaphore(concurrency)
    async with _channel(mesh, sec) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)

        async def one(i: int) -> None:
            async with sem:
                t = time.perf_counter()
                await stub.ModelInfer(_request(mesh.models[0], seed + i, tokens), timeout=60)
                latencies.append((time.perf_counter() - t) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    latencies.sort()
    return {
        "p50_ms": statistics.median(latencies),
        "p95_ms": latencies[int(0.95 * (len(latencies) - 1))],
        "rps": n / wall,
    }


def _start(sec: MeshSecurity | None, speedup: float) -> tuple[Mesh, float]:
    t = time.monotonic()
    mesh = Mesh(MeshConfig(workers=1, speedup_ratio=speedup, router_mode="kv", security=sec, ready_timeout_s=120))
    mesh.start()
    return mesh, time.monotonic() - t


def run(args: argparse.Namespace) -> dict[str, Any]:
    sec = local_security(Path(tempfile.mkdtemp(prefix="dynamo-bench-security-")), tls=True, curve=True)
    plain, plain_ready = _start(None, args.speedup)
    try:
        secure, secure_ready = _start(sec, args.speedup)
        try:
            rounds: dict[str, list[dict[str, float]]] = {"plain": [], "secure": []}

            async def go() -> None:
                for _ in range(args.warmup):
                    await _round(plain, None, args.requests, args.concurrency, args.tokens, 0)
                    await _round(secure, sec, args.requests, args.concurrency, args.tokens, 0)
                for r in range(args.rounds):
                    order = [("plain", plain, None), ("secure", secure, sec)]
                    for name, mesh, s in order if r % 2 == 0 else order[::-1]:
                        rounds[name].append(await _round(mesh, s, args.requests, args.concurrency, args.tokens, r))

            asyncio.run(go())
        finally:
            secure.stop()
    finally:
        plain.stop()
    pairs = list(zip(rounds["plain"], rounds["secure"], strict=True))
    ratios = {m: [s[m] / p[m] for p, s in pairs] for m in ("p50_ms", "p95_ms", "rps")}
    return {
        "config": vars(args) | {"json": str(args.json)},
        "ready_s": {"plain": plain_ready, "secure": secure_ready},
        "rounds": rounds,
        "ratio_secure_over_plain": {
            m: {"median": statistics.median(v), "min": min(v), "max": max(v)} for m, v in ratios.items()
        },
    }


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in ("plain", "secure"):
        ax.plot([r["p50_ms"] for r in result["rounds"][name]], marker="o", label=f"{name} p50")
    ax.set_xlabel("round (interleaved)")
    ax.set_ylabel("ModelInfer latency, ms")
    ax.set_title("plaintext vs mTLS + CURVE (1 mocker worker)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dynamo-grpc bench security", description=__doc__)
    p.add_argument("--rounds", type=int, default=6, help="measured rounds per mesh (interleaved)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--requests", type=int, default=100, help="requests per round")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--tokens", type=int, default=8, help="max_tokens per request")
    p.add_argument("--speedup", type=float, default=1000.0, help="mocker speed-up (high: measure the transport)")
    p.add_argument("--json", type=Path, default=default_results_dir() / "security.json")
    p.add_argument("--png", default=None, help="default: the --json path with .png")
    args = p.parse_args(argv)
    result = run(args)
    out = write_json(args.json, result)
    png = save_plot(lambda png: plot(result, png), Path(args.png) if args.png else out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("ready_s", "ratio_secure_over_plain")}, indent=2))
    print(f"wrote {out}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
