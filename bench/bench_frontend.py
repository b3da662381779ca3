"""Frontend overhead benchmark: KServe stream through frontend → router → mocker vs the worker's Decode directly.

One run starts a real mesh (consul-dev, KV router, 2 mocker workers at a very high speedup, frontend) and
measures, for streamed requests of 16 output tokens:
- added latency: p50/p99 request latency (send → last token) at concurrency 1, frontend path minus direct
  Decode on the same workers with the same prompt ids;
- throughput: completed requests/s at concurrency `--concurrency`, both paths.
Writes JSON (`--json`) and a PNG under bench/results/. The client shares the machine's cores with the mesh.

    PYTHONPATH=src:gen python bench/bench_frontend.py --json bench/results/frontend.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.consul_http import passing_instances, service_meta
from dynamo_grpc.launch.mesh import Mesh, MeshConfig
from dynamo_grpc.models import default_model_path, load_model_source
from dynamo_grpc.tokens.tokenizer import Tokenizer
from dynamo_grpc.v1 import common_pb2, worker_pb2, worker_pb2_grpc

PROMPT = "Benchmark the frontend: how much does a KServe hop, routing and detokenisation add?"
OUT_TOKENS = 16
RESULTS = Path(__file__).parent / "results"


def _bytes(req: pb.ModelInferRequest, name: str, value: bytes) -> None:
    req.inputs.add(name=name, datatype="BYTES", shape=[1])
    req.raw_input_contents.append(struct.pack("<I", len(value)) + value)


def kserve_request(model: str, i: int) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id=f"b{i}")
    _bytes(req, "text_input", PROMPT.encode())
    sp = {"max_tokens": OUT_TOKENS, "ignore_eos": True, "seed": i}
    _bytes(req, "sampling_parameters", json.dumps(sp).encode())
    req.inputs.add(name="stream", datatype="BOOL", shape=[1])
    req.raw_input_contents.append(b"\x01")
    req.inputs.add(name="exclude_input_in_output", datatype="BOOL", shape=[1])
    req.raw_input_contents.append(b"\x01")
    return req


def decode_request(model: str, ids: list[int], i: int) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(
        request_id=f"d{i}-{os.getpid()}",
        model=model,
        token_ids=ids,
        sampling=common_pb2.SamplingOptions(seed=i),
        stop=common_pb2.StopConditions(max_tokens=OUT_TOKENS, ignore_eos=True),
    )


async def via_frontend(stub: pb_grpc.GRPCInferenceServiceStub, model: str, i: int) -> int:
    async def one() -> AsyncIterator[pb.ModelInferRequest]:
        yield kserve_request(model, i)

    n = 0
    async for msg in stub.ModelStreamInfer(one()):
        if msg.error_message:
            raise RuntimeError(msg.error_message)
        n += 1
        if msg.infer_response.parameters["triton_final_response"].bool_param:
            return n
    raise RuntimeError("stream ended without a final response")


async def via_decode(stub: worker_pb2_grpc.DecodeServiceStub, model: str, ids: list[int], i: int) -> int:
    n = 0
    async for resp in stub.Decode(decode_request(model, ids, i)):
        n += len(resp.token_ids)
        if resp.finish_reason:
            return n
    raise RuntimeError("decode ended without a finish")


async def measure(call: Callable[[int], Awaitable[int]], requests: int, concurrency: int) -> dict[str, Any]:
    counter = itertools.count()
    lat: list[float] = []

    async def lane() -> None:
        while (i := next(counter)) < requests:
            t0 = time.perf_counter()
            await call(i)
            lat.append(time.perf_counter() - t0)

    for i in range(min(20, requests)):  # warm channels, router, tokenizer caches
        await call(10_000_000 + i)
    t0 = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    lat.sort()
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else lat * 99
    return {
        "requests": len(lat),
        "concurrency": concurrency,
        "elapsed_s": elapsed,
        "requests_per_s": len(lat) / elapsed,
        "p50_ms": q[49] * 1e3,
        "p99_ms": q[98] * 1e3,
        "mean_ms": statistics.fmean(lat) * 1e3,
    }


async def run(args: argparse.Namespace, mesh: Mesh) -> dict[str, Any]:
    workers = [service_meta(e)["grpc_address"] for e in passing_instances(mesh.consul, "dynamo-worker")]
    card, tok_json = load_model_source(default_model_path())
    ids = Tokenizer.from_card(card, tok_json).encode(PROMPT, add_special_tokens=True)
    model = card.name
    fe_channels = [grpc.aio.insecure_channel(mesh.frontend_grpc) for _ in range(args.channels)]
    wk_channels = [grpc.aio.insecure_channel(w) for w in workers for _ in range(args.channels)]
    fe_stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in fe_channels]
    wk_stubs = [worker_pb2_grpc.DecodeServiceStub(c) for c in wk_channels]

    def fe(i: int) -> Awaitable[int]:
        return via_frontend(fe_stubs[i % len(fe_stubs)], model, i)

    def direct(i: int) -> Awaitable[int]:
        return via_decode(wk_stubs[i % len(wk_stubs)], model, ids, i)

    out: dict[str, Any] = {"workers": len(workers), "prompt_tokens": len(ids), "output_tokens": OUT_TOKENS}
    out["latency_direct"] = await measure(direct, args.latency_requests, 1)
    out["latency_frontend"] = await measure(fe, args.latency_requests, 1)
    out["throughput_direct"] = await measure(direct, args.requests, args.concurrency)
    out["throughput_frontend"] = await measure(fe, args.requests, args.concurrency)
    out["added_p50_ms"] = out["latency_frontend"]["p50_ms"] - out["latency_direct"]["p50_ms"]
    out["added_p99_ms"] = out["latency_frontend"]["p99_ms"] - out["latency_direct"]["p99_ms"]
    for c in fe_channels + wk_channels:
        await c.close()
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["direct Decode", "frontend (KServe → router → worker)"]
    rps = [result["throughput_direct"]["requests_per_s"], result["throughput_frontend"]["requests_per_s"]]
    a.bar(names, rps, color=["#888", "#2a7"])
    a.axhline(500, color="r", ls="--", label="target 500 req/s")
    a.set_ylabel("streamed requests/s")
    a.set_title(f"throughput, concurrency {result['throughput_frontend']['concurrency']}")
    a.legend()
    a.tick_params(axis="x", labelsize=8)
    x = range(2)
    b.bar(
        [i - 0.2 for i in x],
        [result["latency_direct"]["p50_ms"], result["latency_frontend"]["p50_ms"]],
        0.4,
        label="p50",
    )
    b.bar(
        [i + 0.2 for i in x],
        [result["latency_direct"]["p99_ms"], result["latency_frontend"]["p99_ms"]],
        0.4,
        label="p99",
    )
    b.set_xticks(list(x), names, fontsize=8)
    b.set_ylabel("request latency, ms (16 tokens)")
    b.set_title(f"added p50 {result['added_p50_ms']:.2f} ms, p99 {result['added_p99_ms']:.2f} ms")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=RESULTS / "frontend.json")
    p.add_argument("--png", type=Path, default=None, help="default: --json with .png")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--latency-requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--speedup-ratio", type=float, default=1e6)
    p.add_argument("--router-mode", default="kv", choices=["kv", "round-robin", "random"])
    args = p.parse_args(argv)
    cfg = MeshConfig(workers=2, speedup_ratio=args.speedup_ratio, router_mode=args.router_mode)
    load_before = os.getloadavg()
    with Mesh(cfg) as mesh:
        result = asyncio.run(run(args, mesh))
    # The machine is shared: record how busy it was, since every number here depends on it.
    result["loadavg_1m_before_after"] = [load_before[0], os.getloadavg()[0]]
    result["cpu_count"] = os.cpu_count()
    result["router_mode"] = args.router_mode
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    png = args.png or args.json.with_suffix(".png")
    plot(result, png)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
