"""Frontend overhead benchmark: KServe stream through frontend → router → mocker vs the worker's Decode directly.

One run starts a real mesh (consul-dev, 2 mocker workers at a very high speedup, a frontend with the KV router
in-process, a `dynamo-router` and a second frontend that asks it over gRPC) and measures, for streamed requests
of 16 output tokens, side by side on the same workers:
- `direct`: the worker's Decode, one call per request (the baseline);
- `passthrough`: the cheapest possible Python gRPC hop, a grpc.aio process that forwards Decode untouched
  (the floor any Python frontend pays for one hop);
- `passthrough_kserve`: a do-nothing KServe forwarder (`bench/kserve_forwarder.py`: bidi ModelStreamInfer, a
  task per request, a fixed Decode request, a fixed response per worker message): what the protocol costs;
- `frontend_kv`: KServe ModelStreamInfer → frontend (tokenise, in-process KV routing, detokenise) → worker;
- `frontend_kv_service`: the same through a frontend that asks the `dynamo-router` (Route + Update hop);
- with `--call-transport-row`, `frontend_decode_calls`: `frontend_kv` with `--decode-transport call` (a Decode
  call per request instead of each worker's one DecodeStream);
and reports added latency (p50/p99 at concurrency 1, minus `direct`), requests/s at `--concurrency`, and
the CPU each process spent per request. Frontend throughput is measured twice: a new decoupled stream per
request, and one stream per client lane carrying its requests one after another (tritonclient's
`start_stream` / perf_analyzer's streaming mode). The client shares the machine's cores with the mesh.

    dynamo-grpc bench frontend [--out DIR]      (bench/results/frontend.json by default)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from dynamo_grpc.bench import kserve_forwarder
from dynamo_grpc.bench.cpu import process_cpu_seconds
from dynamo_grpc.bench.output import default_results_dir, save_plot, write_json
from dynamo_grpc.bench.tracing_off import off_path_cost
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.consul_http import passing_instances, service_meta
from dynamo_grpc.launch.mesh import Mesh, MeshConfig
from dynamo_grpc.models import default_model_path, load_model_source
from dynamo_grpc.tokens.tokenizer import Tokenizer
from dynamo_grpc.v1 import common_pb2, worker_pb2, worker_pb2_grpc

PROMPT = "Benchmark the frontend: how much does a KServe hop, routing and detokenisation add?"
OUT_TOKENS = 16


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
    """One Decode call; returns how many messages it took."""
    n = 0
    async for resp in stub.Decode(decode_request(model, ids, i)):
        n += 1
        if resp.finish_reason:
            return n
    raise RuntimeError("decode ended without a finish")


class LaneStream:
    """One decoupled ModelStreamInfer stream that carries a lane's requests one after another."""

    def __init__(self, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
        self.queue: asyncio.Queue[pb.ModelInferRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[pb.ModelInferRequest]:
            while (r := await self.queue.get()) is not None:
                yield r

        self.call = stub.ModelStreamInfer(requests())

    async def infer(self, model: str, i: int) -> int:
        await self.queue.put(kserve_request(model, i))
        n = 0
        while True:
            msg = await self.call.read()
            if msg is grpc.aio.EOF:
                raise RuntimeError("stream closed")
            if msg.error_message:
                raise RuntimeError(msg.error_message)
            n += 1
            if msg.infer_response.parameters["triton_final_response"].bool_param:
                return n

    async def close(self) -> None:
        await self.queue.put(None)
        await self.call.wait_for_connection()
        self.call.cancel()


Call = Callable[[int, int], Awaitable[int]]  # (request index, lane) -> responses


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each process so far, and of this client process."""
    return {"client": time.process_time(), **{name: process_cpu_seconds(pid) for name, pid in pids.items()}}


async def measure(call: Call, requests: int, concurrency: int, pids: dict[str, int]) -> dict[str, Any]:
    counter = itertools.count()
    lat: list[float] = []
    messages = 0  # responses (or Decode messages) the client received: each is a write in the server

    async def lane(k: int) -> None:
        nonlocal messages
        while (i := next(counter)) < requests:
            t0 = time.perf_counter()
            n = await call(i, k)
            messages += n  # (not `messages += await ...`: that reads the total before the await)
            lat.append(time.perf_counter() - t0)

    for i in range(min(20, requests)):  # warm channels, router, tokenizer caches
        await call(10_000_000 + i, i % concurrency)
    cpu0 = cpu_seconds(pids)
    t0 = time.perf_counter()
    await asyncio.gather(*(lane(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - t0
    cpu1 = cpu_seconds(pids)
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
        "messages_per_request": round(messages / max(1, len(lat)), 2),
        "tokens_per_message": round(OUT_TOKENS * len(lat) / max(1, messages), 2),
        "cpu_ms_per_request": {k: round((cpu1[k] - cpu0[k]) / len(lat) * 1e3, 3) for k in cpu0},
    }


def serve_passthrough(workers: list[str]) -> None:
    """A do-nothing grpc.aio DecodeService that forwards each call to a worker (round-robin); prints its address."""

    async def serve() -> None:
        stubs = [worker_pb2_grpc.DecodeServiceStub(grpc.aio.insecure_channel(w)) for w in workers]
        turn = itertools.count()

        class Forward(worker_pb2_grpc.DecodeServiceServicer):
            async def Decode(self, request: Any, context: Any) -> AsyncIterator[Any]:  # type: ignore[override]
                async for r in stubs[next(turn) % len(stubs)].Decode(request):
                    yield r

        server = grpc.aio.server()
        worker_pb2_grpc.add_DecodeServiceServicer_to_server(Forward(), server)  # type: ignore[abstract]  # Decode only: DecodeStream answers UNIMPLEMENTED
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"127.0.0.1:{port}", flush=True)
        await server.wait_for_termination()

    asyncio.run(serve())


def start_frontend(
    mesh: Mesh, tmp: Path, name: str, args: list[str], env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Another frontend on the mesh's workers (its own flags and environment); returns it and its address.
    With ``--replicas N`` it is the supervisor; ``replica_pids`` reads its replicas' pids."""
    ready = tmp / f"{name}.json"
    cmd = [
        sys.executable, "-m", "dynamo_grpc.cli", "frontend", "--consul", mesh.consul,
        "--namespace", mesh.config.namespace, "--grpc-port", "0", "--ready-file", str(ready), *args,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})}
    )
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the {name} frontend did not start")
        time.sleep(0.1)
    address: str = json.loads(ready.read_text())["grpc_address"]
    return proc, address


def start_forwarder(flag: str, workers: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    """One of this module's do-nothing forwarders (``--serve-passthrough`` / ``--serve-kserve-forwarder``) in
    its own process over ``workers``; returns it and the address it prints once serving."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dynamo_grpc.bench.frontend", flag, ",".join(workers)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().decode().strip()


def replica_pids(tmp: Path, name: str) -> list[int]:
    """The pids of a `--replicas N` frontend's replicas (from the instance ids in its ready file)."""
    data = json.loads((tmp / f"{name}.json").read_text())
    return [int(r["instance_id"].rsplit("-", 2)[1]) for r in data.get("replicas", [])]


def start_service_frontend(mesh: Mesh, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A second frontend that routes through the mesh's dynamo-router over gRPC."""
    return start_frontend(mesh, tmp, "fe-service", ["--router-mode", "kv-service", "--router", mesh.router_grpc])


def tracing_frontends(tmp: Path, baseline_src: str | None) -> dict[str, tuple[list[str], dict[str, str]]]:
    """The tracing rows: the same in-process-KV frontend with tracing off, and on (sampled 100 % and 1 %,
    spans to a --trace-file); with --baseline-src, a frontend built from that source tree (one without
    tracing) in the same run, the reference for "no cost when off"."""
    off = {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": ""}
    rows: dict[str, tuple[list[str], dict[str, str]]] = {"frontend_trace_off": ([], off)}
    for label, ratio in (("100", "1.0"), ("1", "0.01")):
        env = {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": ratio}
        rows[f"frontend_trace_{label}pct"] = (["--trace-file", str(tmp / f"trace-{label}.jsonl")], env)
    if baseline_src:
        rows["frontend_baseline_build"] = ([], {**off, "PYTHONPATH": baseline_src})
    return rows


async def _wait_model(stub: pb_grpc.GRPCInferenceServiceStub, model: str) -> None:
    for _ in range(300):
        try:
            if (await stub.ModelReady(pb.ModelReadyRequest(name=model), timeout=2)).ready:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"model {model} never became ready")


async def run(
    args: argparse.Namespace,
    mesh: Mesh,
    passthrough: str,
    fe_service: str,
    kserve_forwarder: str,
    pids: dict[str, int],
    extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    workers = [service_meta(e)["grpc_address"] for e in passing_instances(mesh.consul, "dynamo-worker")]
    card, tok_json = load_model_source(default_model_path())
    ids = Tokenizer.from_card(card, tok_json).encode(PROMPT, add_special_tokens=True)
    model = card.name
    channels: list[grpc.aio.Channel] = []

    def stubs(address: str, cls: Any) -> list[Any]:
        # a connection per channel: gRPC would otherwise share one subchannel among equal channels, putting
        # every stream on one connection (past the frontend's --max-concurrent-streams 100 at 64 lanes plus
        # 64 requests, and on one replica of a --replicas frontend)
        new = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
               for _ in range(args.channels)]
        channels.extend(new)
        return [cls(c) for c in new]

    wk = [s for w in workers for s in stubs(w, worker_pb2_grpc.DecodeServiceStub)]
    px = stubs(passthrough, worker_pb2_grpc.DecodeServiceStub)
    fe = {
        "frontend_kv": stubs(mesh.frontend_grpc, pb_grpc.GRPCInferenceServiceStub),
        "frontend_kv_service": stubs(fe_service, pb_grpc.GRPCInferenceServiceStub),
        **{name: stubs(address, pb_grpc.GRPCInferenceServiceStub) for name, address in (extra or {}).items()},
    }
    for pool in fe.values():
        await _wait_model(pool[0], model)

    def decode_via(pool: list[Any]) -> Call:
        return lambda i, k: via_decode(pool[i % len(pool)], model, ids, i)

    def stream_per_request(pool: list[Any]) -> Call:
        return lambda i, k: via_frontend(pool[i % len(pool)], model, i)

    only = set(args.only.split(",")) if args.only else None

    def wanted(name: str) -> bool:
        return only is None or name in only

    kx = stubs(kserve_forwarder, pb_grpc.GRPCInferenceServiceStub)
    paths: dict[str, Call] = {"direct": decode_via(wk), "passthrough": decode_via(px),
                              "passthrough_kserve": stream_per_request(kx)}
    paths.update({name: stream_per_request(pool) for name, pool in fe.items()})
    paths = {n: c for n, c in paths.items() if wanted(n)}
    out: dict[str, Any] = {"workers": len(workers), "prompt_tokens": len(ids), "output_tokens": OUT_TOKENS}
    # concurrency 1 in interleaved rounds too (median by p50), each round's CPU kept for the ratios' spread
    lat_rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
    for _ in range(args.latency_rounds):
        for name, call in paths.items():
            lat_rounds[name].append(await measure(call, args.latency_requests, 1, pids))
    out["latency"] = {}
    for name, runs in lat_rounds.items():
        cpu_rounds = [r["cpu_ms_per_request"] for r in runs]
        runs.sort(key=lambda r: r["p50_ms"])
        out["latency"][name] = {**runs[len(runs) // 2], "rounds_p50_ms": [r["p50_ms"] for r in runs],
                                "rounds_cpu_ms_per_request": cpu_rounds,
                                "rounds_messages_per_request": [r["messages_per_request"] for r in runs]}
    lanes = {name: [LaneStream(pool[k % len(pool)]) for k in range(args.concurrency)]
             for name, pool in fe.items() if wanted(f"{name}_lanes")}
    for name, streams in lanes.items():

        def lane_call(i: int, k: int, streams: list[LaneStream] = streams) -> Awaitable[int]:
            return streams[k].infer(model, i)

        paths[f"{name}_lanes"] = lane_call
    # Throughput in interleaved rounds (every path once per round), median per path: the box is shared and
    # drifts, and one long run per path would credit or blame whichever ran in a quiet moment.
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, call in paths.items():
            rounds[name].append(await measure(call, args.requests, args.concurrency, pids))
    out["throughput"] = {}
    for name, runs in rounds.items():
        cpu_rounds = [r["cpu_ms_per_request"] for r in runs]
        runs.sort(key=lambda r: r["requests_per_s"])
        out["throughput"][name] = {**runs[len(runs) // 2], "rounds_requests_per_s": [r["requests_per_s"] for r in runs],
                                   "rounds_cpu_ms_per_request": cpu_rounds,
                                   "rounds_messages_per_request": [r["messages_per_request"] for r in runs]}
    for streams in lanes.values():
        for lane in streams:
            await lane.close()
    base = out["latency"].get("direct")
    if base is not None:
        out["added_p50_ms"] = {n: r["p50_ms"] - base["p50_ms"] for n, r in out["latency"].items() if n != "direct"}
        out["added_p99_ms"] = {n: r["p99_ms"] - base["p99_ms"] for n, r in out["latency"].items() if n != "direct"}
    out["targets"] = {"requests_per_s": 500, "added_p50_ms": 2.0, "tracing_off_cpu_overhead_pct": 2.0}
    out["tracing"] = tracing_cost(out)
    for c in channels:
        await c.close()
    return out


def tracing_cost(out: dict[str, Any]) -> dict[str, Any]:
    """Frontend CPU ms per request of each tracing row (throughput rounds, the frontend process only), and its
    cost relative to tracing off (and tracing off relative to the baseline build, when measured)."""
    tp = out["throughput"]
    rows = [n for n in tp if n.startswith(("frontend_trace", "frontend_baseline_build"))]
    cpu = {n: tp[n]["cpu_ms_per_request"][n.removesuffix("_lanes").replace("_", "-")] for n in rows}
    res: dict[str, Any] = {"frontend_cpu_ms_per_request": cpu, "vs_off_pct": {}}
    for n, v in cpu.items():
        off = cpu.get("frontend_trace_off" + ("_lanes" if n.endswith("_lanes") else ""))
        if off and not n.startswith("frontend_trace_off"):
            res["vs_off_pct"][n] = round((v / off - 1) * 100, 1)
    for suffix in ("", "_lanes"):
        base, off = cpu.get("frontend_baseline_build" + suffix), cpu.get("frontend_trace_off" + suffix)
        if base and off:
            res[f"off_vs_baseline_build_pct{suffix}"] = round((off / base - 1) * 100, 1)
    # the same question answered call by call (stable where the process totals above are noise-bound)
    off_cpu = cpu.get("frontend_trace_off") or tp.get("frontend_kv", {}).get("cpu_ms_per_request", {}).get("frontend")
    res["off_path"] = off_path_cost(off_cpu)
    return res


def frontend_cpu(row: dict[str, Any], name: str) -> float:
    """CPU ms per request of the frontend process(es) that served ``name`` (all replicas of a replica row)."""
    proc = name.removesuffix("_lanes").replace("_", "-")
    proc = "frontend" if proc == "frontend-kv" else proc
    cpu = row["cpu_ms_per_request"]
    return float(sum(v for k, v in cpu.items() if k == proc or k.startswith(proc + "#")))


def floor_ratios(out: dict[str, Any]) -> dict[str, Any]:
    """Frontend CPU per request over the do-nothing forwarder's, at concurrency 1 and at --concurrency
    (per-request streams), for every frontend row: the ratio of each interleaved round (the forwarder's CPU
    in the same round), their median and range. The issue's target is <= 1.5."""
    res: dict[str, Any] = {}
    for phase in ("latency", "throughput"):
        rows = out[phase]
        if "passthrough" not in rows:
            continue
        floors = [c["passthrough"] for c in rows["passthrough"]["rounds_cpu_ms_per_request"]]
        kserve = rows.get("passthrough_kserve")  # the protocol's own cost: the frontend's Python is above it
        kfloors = [c["passthrough-kserve"] for c in kserve["rounds_cpu_ms_per_request"]] if kserve else []
        # what each side moved: the forwarder forwards every worker message; the frontend sends one response per
        # worker message that adds text (so both move the workers' messages, whatever --stream-interval is)
        phase_res: dict[str, Any] = {
            "passthrough_cpu_ms_rounds": floors,
            "passthrough_messages_per_request": statistics.median(
                rows["passthrough"].get("rounds_messages_per_request") or [rows["passthrough"]["messages_per_request"]]
            ),
        }
        if kfloors:
            kratios = sorted(round(k / f, 2) for k, f in zip(kfloors, floors, strict=True) if f)
            phase_res["passthrough_kserve"] = {"cpu_ms_rounds": kfloors, "cpu_ms_median": statistics.median(kfloors),
                                               "ratio_median": statistics.median(kratios), "ratio_rounds": kratios}
        for n, r in rows.items():
            if not n.startswith("frontend") or n.endswith("_lanes") or n == "frontend_kv_service":
                continue
            cpus = [frontend_cpu({"cpu_ms_per_request": c}, n) for c in r["rounds_cpu_ms_per_request"]]
            ratios = sorted(round(c / f, 2) for c, f in zip(cpus, floors, strict=True) if f)
            msgs = r.get("rounds_messages_per_request") or [r["messages_per_request"]]
            phase_res[n] = {"cpu_ms_rounds": cpus, "cpu_ms_median": statistics.median(cpus),
                            "messages_per_request": statistics.median(msgs),
                            "ratio_median": statistics.median(ratios) if ratios else None, "ratio_rounds": ratios}
            if kfloors:  # the same rounds over the KServe forwarder's CPU
                kr = sorted(round(c / f, 2) for c, f in zip(cpus, kfloors, strict=True) if f)
                phase_res[n].update(ratio_to_kserve_median=statistics.median(kr), ratio_to_kserve_rounds=kr)
        res[phase] = phase_res
    return res


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    floor = result.get("floor_ratio", {})
    fig, axes = plt.subplots(1, 3 if floor else 2, figsize=(19 if floor else 13, 4.5))
    a, b = axes[0], axes[1]
    tp = result["throughput"]
    names = list(tp)
    colors = ["#888" if n == "direct" else "#c84" if n.startswith("passthrough") else "#2a7" for n in names]
    a.bar(range(len(names)), [tp[n]["requests_per_s"] for n in names], color=colors)
    a.axhline(result["targets"]["requests_per_s"], color="r", ls="--", label="target")
    a.set_xticks(range(len(names)), [n.replace("_", "\n", 1) for n in names], fontsize=7)
    a.set_ylabel("streamed requests/s (16 tokens)")
    a.set_title(f"throughput, {result['concurrency']} concurrent, {result['cpu_count']} cores shared")
    a.legend()
    lat = result["latency"]
    lnames = list(lat)
    x = range(len(lnames))
    b.bar([i - 0.2 for i in x], [lat[n]["p50_ms"] for n in lnames], 0.4, label="p50")
    b.bar([i + 0.2 for i in x], [lat[n]["p99_ms"] for n in lnames], 0.4, label="p99")
    b.set_xticks(list(x), [n.replace("_", "\n", 1) for n in lnames], fontsize=7)
    b.set_ylabel("request latency, ms, one at a time")
    added = result.get("added_p50_ms", {})
    b.set_title(
        "added p50: " + ", ".join(f"{n} {v:.2f} ms" for n, v in added.items() if not n.startswith("frontend_trace")),
        fontsize=7,
    )
    b.legend()
    if floor:  # frontend CPU per request over the forwarder's, per interleaved round (median bar, rounds as dots)
        c = axes[2]
        labels: list[str] = []
        for phase, offset, color in (("throughput", -0.2, "#2a7"), ("latency", 0.2, "#58c")):
            rows = {n: r for n, r in floor.get(phase, {}).items() if isinstance(r, dict) and r.get("ratio_rounds")}
            labels = labels or list(rows)
            for i, n in enumerate(labels):
                r = rows.get(n)
                if r is None:
                    continue
                c.bar(i + offset, r["ratio_median"], 0.4, color=color,
                      label=f"concurrency {result['concurrency'] if phase == 'throughput' else 1}" if i == 0 else None)
                c.plot([i + offset] * len(r["ratio_rounds"]), r["ratio_rounds"], "k.", ms=4)
        c.axhline(1.5, color="r", ls="--", label="target (conc. 64)")
        c.set_xticks(range(len(labels)), [n.replace("_", "\n", 1) for n in labels], fontsize=7)
        c.set_ylabel("frontend CPU per request / forwarder's (same round)")
        c.set_title("floor ratio: median, dots = rounds", fontsize=9)
        c.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=default_results_dir() / "frontend.json")
    p.add_argument("--png", type=Path, default=None, help="default: --json with .png")
    p.add_argument("--requests", type=int, default=2000, help="per path and round at --concurrency")
    p.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds; the median is reported")
    p.add_argument("--latency-requests", type=int, default=300)
    p.add_argument("--latency-rounds", type=int, default=1, help="interleaved rounds at concurrency 1")
    p.add_argument("--only", default="", help="measure only these paths (comma list, e.g. passthrough,frontend_kv)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--speedup-ratio", type=float, default=1e6)
    p.add_argument(
        "--baseline-src",
        default=None,
        metavar="DIR",
        help="also measure a frontend run from this source tree (e.g. a checkout without tracing: its src/)",
    )
    p.add_argument("--no-tracing-rows", action="store_true", help="skip the tracing off/on frontends")
    p.add_argument("--round-robin-row", action="store_true",
                   help="also measure a frontend with --router-mode round-robin (what in-process KV routing costs)")
    p.add_argument("--call-transport-row", action="store_true",
                   help="also measure a frontend with --decode-transport call (a Decode call per request instead of "
                        "each worker's one DecodeStream)")
    p.add_argument("--replica-rows", type=int, default=0, metavar="N",
                   help="also measure a `frontend --replicas N` (CPU summed over its replicas)")
    p.add_argument("--stream-interval", type=int, default=1, metavar="N",
                   help="the workers' --stream-interval (tokens per Decode message; 1: what is ready)")
    p.add_argument("--serve-passthrough", default="", help=argparse.SUPPRESS)
    p.add_argument("--serve-kserve-forwarder", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_passthrough:
        serve_passthrough(args.serve_passthrough.split(","))
        return 0
    if args.serve_kserve_forwarder:
        card, tok_json = load_model_source(default_model_path())
        ids = Tokenizer.from_card(card, tok_json).encode(PROMPT, add_special_tokens=True)
        kserve_forwarder.serve(args.serve_kserve_forwarder.split(","), card.name, ids, OUT_TOKENS)
        return 0
    cfg = MeshConfig(
        workers=2, speedup_ratio=args.speedup_ratio, router_mode="kv", start_router=True, acl=False,
        worker_args=["--stream-interval", str(args.stream_interval)],
    )  # acl off: the bench starts a second frontend and reads Consul with no role token
    load_before = os.getloadavg()
    with Mesh(cfg) as mesh, tempfile.TemporaryDirectory() as tmp:
        workers = [service_meta(e)["grpc_address"] for e in passing_instances(mesh.consul, "dynamo-worker")]
        forwarder, passthrough = start_forwarder("--serve-passthrough", workers)
        kforwarder, kserve_address = start_forwarder("--serve-kserve-forwarder", workers)
        fe_proc, fe_service = start_service_frontend(mesh, Path(tmp))
        started = [fe_proc]
        try:
            pids = {p.name: p.popen.pid for p in mesh.procs}
            pids["frontend-kv-service"] = fe_proc.pid
            pids["passthrough"] = forwarder.pid
            pids["passthrough-kserve"] = kforwarder.pid
            extra: dict[str, str] = {}
            rows = tracing_frontends(Path(tmp), args.baseline_src)
            if args.no_tracing_rows:
                rows = {k: v for k, v in rows.items() if not k.startswith("frontend_trace")}
            if args.round_robin_row:  # tracing off as the frontend_trace_off row, only the router mode differs
                off = {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": ""}
                rows["frontend_round_robin"] = (["--router-mode", "round-robin"], off)
            if args.call_transport_row:  # tracing off as frontend_trace_off; a Decode call per request
                off = {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": ""}
                rows["frontend_decode_calls"] = (["--decode-transport", "call"], off)
            if args.replica_rows > 1:
                rows[f"frontend_replicas{args.replica_rows}"] = (["--replicas", str(args.replica_rows)], {})
            for name, (fe_args, env) in rows.items():
                proc, extra[name] = start_frontend(mesh, Path(tmp), name, fe_args, env)
                started.append(proc)
                kids = replica_pids(Path(tmp), name)
                for k, pid in enumerate(kids):  # a supervisor: count its replicas' CPU
                    pids[f"{name.replace('_', '-')}#{k}"] = pid
                if not kids:
                    pids[name.replace("_", "-")] = proc.pid
            result = asyncio.run(run(args, mesh, passthrough, fe_service, kserve_address, pids, extra))
        finally:
            for proc in started:
                proc.terminate()
                proc.wait(10)
            for fwd in (forwarder, kforwarder):
                fwd.kill()
                fwd.wait()
    # The machine is shared: record how busy it was, since every number here depends on it.
    result["loadavg_1m_before_after"] = [load_before[0], os.getloadavg()[0]]
    result["cpu_count"] = os.cpu_count()
    result["concurrency"] = args.concurrency
    result["floor_ratio"] = floor_ratios(result)
    result["settings"] = {"requests": args.requests, "rounds": args.rounds, "latency_requests": args.latency_requests,
                          "latency_rounds": args.latency_rounds, "baseline_src": args.baseline_src,
                          "replica_rows": args.replica_rows, "only": args.only,
                          "round_robin_row": args.round_robin_row, "call_transport_row": args.call_transport_row,
                          "stream_interval": args.stream_interval}
    write_json(args.json, result)
    save_plot(lambda png: plot(result, png), args.png or args.json.with_suffix(".png"))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
