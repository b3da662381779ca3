"""Where the frontend's CPU per streamed request goes: the `bench frontend` load on a frontend run under cProfile.

Starts a mocker mesh (2 workers at 10^6 speedup, consul-dev) and one more frontend (in-process KV router)
whose whole process runs under cProfile, sends it `bench frontend`'s 16-token streamed KServe requests at
`--concurrency`, and splits the profile into the stages of a request: KServe parse, tokenise, route,
worker stream (the Decode call and its reads), detokenise, response build, the client write, metrics, and
the rest (asyncio and gRPC's event-loop machinery, anything unlisted). cProfile slows Python code more
than C code, so the split is a guide to where to cut, not a measurement of the unprofiled cost (that is
`bench frontend`'s CPU per request).

    dynamo-grpc bench frontend-profile [--requests N] [--frontend-src DIR] [--json FILE]
                                                           (bench/results/frontend-profile.json)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from dynamo_grpc.bench.cpu import process_cpu_seconds
from dynamo_grpc.bench.frontend import _wait_model, via_frontend
from dynamo_grpc.bench.output import default_results_dir, write_json
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.mesh import Mesh, MeshConfig
from dynamo_grpc.models import default_model_path, load_model_source

#: stage -> (file suffix, function name, "cum" for a plain function's cumulative time | "tot" for own time).
#: Coroutines and generators count per resumption in cProfile, so their own time is taken, never their
#: cumulative time (which would count what ran while they were suspended... and their callers twice).
STAGES: dict[str, list[tuple[str, str, str]]] = {
    "parse": [
        ("kserve/codec.py", "decode_inputs", "cum"),
        ("kserve/parse.py", "parse_request", "cum"),
        ("kserve/parse.py", "requested_outputs", "cum"),
    ],
    "tokenise": [("frontend/pipeline.py", "prepare", "cum")],
    "route": [
        ("frontend/kv_router.py", "route", "tot"),
        ("router/router.py", "route", "cum"),
        ("frontend/kv_router.py", "prefill_done", "cum"),
        ("frontend/kv_router.py", "free", "cum"),
    ],
    "worker_stream": [
        ("frontend/engine_client.py", "decode", "tot"),
        ("grpc/aio/_call.py", "_read", "tot"),
        ("grpc/aio/_call.py", "_fetch_stream_responses", "tot"),
        ("grpc/aio/_call.py", "_send_unary_request", "tot"),
        ("grpc/aio/_call.py", "__init__", "cum"),
        ("frontend/session.py", "_placements", "tot"),
        ("frontend/session.py", "_count_tokens", "cum"),
        ("frontend/session.py", "decode_request", "cum"),
        ("frontend/session.py", "coalesced", "tot"),  # the read-ahead task and queue (before this change)
        ("frontend/session.py", "pump", "tot"),
    ],
    "detokenise": [("frontend/token_stream.py", "add", "cum"), ("frontend/token_stream.py", "out_of_tokens", "cum")],
    "response_build": [
        ("kserve/responses.py", "stream_frame", "cum"),  # the bytes path (it calls chunk/wrapped for the last)
        ("kserve/responses.py", "chunk", "cum"),
        ("kserve/responses.py", "wrapped", "cum"),
        ("kserve/responses.py", "__init__", "cum"),
    ],
    # (a tree that writes from `_answer` directly has its client writes in request_plumbing's `_answer`)
    "client_write": [("kserve/service.py", "write", "tot")],
    "request_plumbing": [
        ("kserve/service.py", "ModelStreamInfer", "tot"),
        ("kserve/service.py", "_answer", "tot"),
        ("kserve/service.py", "one", "tot"),
        ("kserve/service.py", "_infer", "tot"),
        ("frontend/pipeline.py", "generate", "tot"),
    ],
    "metrics_stats": [
        ("frontend/metrics.py", "finished", "cum"),
        ("frontend/metrics.py", "started", "cum"),
        ("frontend/stats.py", "record_success", "cum"),
    ],
}


def split(prof: Path, requests: int, cpu_ms_per_request: float) -> dict[str, Any]:
    """Milliseconds per request of each stage (profiled), the rest being the event loop and unlisted code."""
    stats = pstats.Stats(str(prof)).stats  # type: ignore[attr-defined]
    out: dict[str, float] = {}
    for stage, fns in STAGES.items():
        kinds = {
            key: next(k for suffix, fn, k in fns if key[2] == fn and key[0].endswith(suffix))
            for key in stats
            if any(key[2] == fn and key[0].endswith(suffix) for suffix, fn, _ in fns)
        }
        total = 0.0
        for key, kind in kinds.items():
            _cc, _nc, tt, ct, callers = stats[key]
            if kind == "cum":  # less what another cumulative entry of this stage called it for (counted there)
                ct -= sum(edge[3] for caller, edge in callers.items() if kinds.get(caller) == "cum")
            total += ct if kind == "cum" else tt
        out[stage] = round(total / requests * 1e3, 3)
    # the process's own CPU under the profiler, idle waits excluded (epoll's time is mostly sleeping)
    listed = sum(out.values())
    out["event_loop_and_other"] = round(max(0.0, cpu_ms_per_request - listed), 3)
    return out


async def load(address: str, model: str, requests: int, concurrency: int) -> None:
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(4)]
    stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
    await _wait_model(stubs[0], model)
    for i in range(20):  # warm channels and caches, as bench frontend does
        await via_frontend(stubs[i % 4], model, 10_000_000 + i)
    counter = itertools.count()

    async def lane() -> None:
        while (i := next(counter)) < requests:
            await via_frontend(stubs[i % len(stubs)], model, i)

    await asyncio.gather(*(lane() for _ in range(concurrency)))
    for c in channels:
        await c.close()


#: the profiled frontend's whole process: cProfile around `dynamo-grpc frontend` (only `dynamo_grpc.cli` is
#: imported, so `--frontend-src` can point it at another checkout's src/ for a before/after in one harness)
PROFILED_FRONTEND = """
import cProfile, os, sys, time
from dynamo_grpc import cli
prof = cProfile.Profile(time.thread_time)  # CPU of the event-loop thread: wall time would count waits
prof.enable()
try:
    cli.main(["frontend", *sys.argv[1:]])
except SystemExit:
    pass
finally:
    prof.disable()
    prof.dump_stats(os.environ["DYN_BENCH_PROFILE_OUT"])
"""

#: the synchronous per-request path without gRPC or the event loop (KServe parse, tokenise, 16 tokens through
#: the token stream and the response builder, each response serialised), `K` tokens per worker message:
#: process CPU time, best of 5 x 1,000 requests, so it resolves small changes that the loaded mesh cannot
SYNC_PATH = """
import json, sys, time
from dynamo_grpc.bench.frontend import kserve_request
from dynamo_grpc.frontend.kserve.codec import decode_inputs, parameters_dict
from dynamo_grpc.frontend.kserve.parse import parse_request, requested_outputs
from dynamo_grpc.frontend.kserve.responses import Responder
from dynamo_grpc.frontend.token_stream import TokenStream
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.models import default_model_path, load_model_source
from dynamo_grpc.tokens.tokenizer import Tokenizer
from dynamo_grpc.v1 import common_pb2, worker_pb2

card, tj = load_model_source(default_model_path())
tok = Tokenizer.from_card(card, tj)
getattr(tok, "ascii_pieces", lambda: None)()  # as a serving frontend has it
text = " The quick brown fox jumps over the lazy dog, and then it runs far away again."
out_ids = tok.encode(text, add_special_tokens=False)[:16]
res = {}
for k in (1, 2, 4):
    def one(i):
        request = kserve_request(card.name, i)
        inputs = decode_inputs(request)
        req = parse_request(inputs, parameters_dict(request.parameters), requested_outputs(request.outputs),
                            stream_rpc=True)
        ids = tok.encode(req.prompt, add_special_tokens=True)
        stream, responder = TokenStream(req, ids, 16, tok), Responder(request, req, tok, True)
        for j in range(0, 16, k):
            r = worker_pb2.DecodeResponse(token_ids=out_ids[j : j + k])
            if j + k >= 16:
                r.finish_reason = common_pb2.FINISH_REASON_LENGTH
            c = stream.add(r, "worker-1", True)
            if c is None:
                continue
            frame = getattr(responder, "stream_frame", None)  # a tree that writes raw responses as bytes
            if frame is not None:
                msg = frame(c)
                if msg is not None and not isinstance(msg, bytes):
                    msg.SerializeToString()
                continue
            out = responder.chunk(c)
            if out is not None:
                wrapped = getattr(responder, "wrapped", None)  # a tree before it wrapped by copying
                msg = wrapped(out) if wrapped else pb.ModelStreamInferResponse(infer_response=out)
                msg.SerializeToString()
    for i in range(200):
        one(i)
    best = []
    for _ in range(5):
        t0 = time.process_time()
        for i in range(1000):
            one(i)
        best.append(time.process_time() - t0)
    res[f"tokens_per_message_{k}"] = round(min(best), 4)  # seconds per 1,000 = ms per request
print(json.dumps(res))
"""


#: the whole KServe request path in one process, without gRPC: `InferenceServicer.ModelStreamInfer` with a
#: one-request stream and a context whose `write` serialises like gRPC's, the real pipeline (parse, tokenise,
#: route session, token stream, responses, metrics and statistics), a round-robin router (the KV router's
#: cost is in the profile's "route" stage) and a stand-in worker that yields 16 tokens, 2 per Decode message
#: (bench frontend's ~8 messages), each parsed from its wire bytes and after a loop turn as a gRPC read is.
#: Process CPU, best of 5 x 1,000 requests (50 at a time): it resolves what the end-to-end bench cannot
REQUEST_PATH = """
import asyncio, itertools, json, time
from dynamo_grpc.bench.frontend import kserve_request
from dynamo_grpc.frontend.kserve.service import InferenceServicer
from dynamo_grpc.frontend.models import ModelRegistry, ServedModel
from dynamo_grpc.frontend.pipeline import Pipeline
from dynamo_grpc.frontend.routing import Pick, WorkerEndpoint
from dynamo_grpc.frontend.stats import StatsBook
from dynamo_grpc.models import default_model_path, load_model_source
from dynamo_grpc.tokens.tokenizer import Tokenizer
from dynamo_grpc.v1 import common_pb2, worker_pb2
try:
    from dynamo_grpc.frontend.kserve.wire import serialize_stream_response as serialize
except ImportError:  # a tree before responses were written as bytes
    def serialize(m):
        return m.SerializeToString()

card, tj = load_model_source(default_model_path())
tok = Tokenizer.from_card(card, tj)
getattr(tok, "ascii_pieces", lambda: None)()
text = " The quick brown fox jumps over the lazy dog, and then it runs far away again."
wire = []
ids = tok.encode(text, add_special_tokens=False)[:16]
for j in range(0, 16, 2):
    r = worker_pb2.DecodeResponse(token_ids=ids[j : j + 2])
    if j + 2 >= 16:
        r.finish_reason = common_pb2.FINISH_REASON_LENGTH
    wire.append(r.SerializeToString())

class Workers:
    async def decode(self, address, request, timeout=None):
        for b in wire:
            await asyncio.sleep(0)
            yield worker_pb2.DecodeResponse.FromString(b)

class Router:
    mode = "round-robin"
    turn = itertools.count()
    async def route(self, request_id, model, token_ids, workers, exclude, expected_output_tokens, lora, **kw):
        w = workers[next(self.turn) % len(workers)]
        return Pick(w.instance_id, w.address)
    def prefill_done(self, request_id, output_tokens):
        pass
    def free(self, request_id, output_tokens):
        pass

async def no_fetch(*a):
    raise AssertionError("no model files are fetched here")
async def no_cards(model):
    return {}
registry = ModelRegistry(no_fetch, no_cards)
endpoints = [WorkerEndpoint("w0", "127.0.0.1:1"), WorkerEndpoint("w1", "127.0.0.1:2")]
registry.add(ServedModel(card.name, card, tok, endpoints))
servicer = InferenceServicer(Pipeline(registry, Router(), Workers()), StatsBook())
written = [0]
try:  # as a serving frontend has it once started
    from dynamo_grpc.gc_tuning import tune_for_serving
    tune_for_serving()
except ImportError:  # a tree before the collector was tuned
    pass

class Context:
    def time_remaining(self):
        return None
    async def write(self, msg):
        serialize(msg)
        written[0] += 1

async def one(i):
    async def stream():
        yield kserve_request(card.name, i)
    await servicer.ModelStreamInfer(stream(), Context())

async def main():
    for i in range(200):
        await one(i)
    best = []
    for _ in range(5):
        t0 = time.process_time()
        for b in range(0, 1000, 50):
            await asyncio.gather(*(one(i) for i in range(b, b + 50)))
        best.append(time.process_time() - t0)
    return {"ms_per_request": round(min(best), 4), "responses_per_request": round(written[0] / 5200, 2)}
print(json.dumps(asyncio.run(main())))
"""


def request_path(src: str | None) -> dict[str, float]:
    """`REQUEST_PATH`'s ms per request, run in a fresh process on ``src`` (None: this checkout)."""
    env = {**os.environ, **({"PYTHONPATH": src} if src else {})}
    out = subprocess.run([sys.executable, "-c", REQUEST_PATH], env=env, capture_output=True, text=True, check=True)
    res: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return res


def sync_path(src: str | None) -> dict[str, float]:
    """`SYNC_PATH`'s ms per request, run in a fresh process on ``src`` (None: this checkout)."""
    env = {**os.environ, **({"PYTHONPATH": src} if src else {})}
    out = subprocess.run([sys.executable, "-c", SYNC_PATH], env=env, capture_output=True, text=True, check=True)
    res: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=default_results_dir() / "frontend-profile.json")
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--profile-out", type=Path, default=None, help="also keep the raw cProfile stats here")
    p.add_argument("--frontend-src", default=None, metavar="DIR",
                   help="profile the frontend of another source tree (its src/), e.g. before a change")
    p.add_argument("--stream-interval", type=int, default=1, metavar="N",
                   help="the workers' --stream-interval (tokens per Decode message; 1: what is ready)")
    args = p.parse_args(argv)
    card, _ = load_model_source(default_model_path())
    cfg = MeshConfig(workers=2, speedup_ratio=1e6, router_mode="kv", start_router=False, acl=False,
                     worker_args=["--stream-interval", str(args.stream_interval)])
    with Mesh(cfg) as mesh, tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "fe.json"
        prof = args.profile_out or Path(tmp) / "fe.prof"
        cmd = [
            sys.executable, "-c", PROFILED_FRONTEND, "--consul", mesh.consul,
            "--namespace", mesh.config.namespace, "--grpc-port", "0", "--ready-file", str(ready),
        ]  # fmt: skip
        env = {**os.environ, "DYN_BENCH_PROFILE_OUT": str(prof), "OTEL_TRACES_EXPORTER": "none"}
        if args.frontend_src:
            env["PYTHONPATH"] = args.frontend_src
        log = Path(tmp) / "fe.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180  # slow under the profiler on a loaded box
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                    raise RuntimeError("the profiled frontend did not start: " + " | ".join(tail))
                time.sleep(0.1)
            address = json.loads(ready.read_text())["grpc_address"]
            cpu0, t0 = process_cpu_seconds(proc.pid), time.perf_counter()
            asyncio.run(load(address, card.name, args.requests, args.concurrency))
            elapsed, cpu = time.perf_counter() - t0, process_cpu_seconds(proc.pid) - cpu0
        finally:
            proc.terminate()
            proc.wait(60)
        cpu_ms = cpu / args.requests * 1e3
        result = {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "requests_per_s_profiled": round(args.requests / elapsed, 1),
            "frontend_cpu_ms_per_request_profiled": round(cpu_ms, 3),
            # the warm-up and start-up are in the profile too: spread over the measured requests (20 of 3,000)
            "split_ms_per_request_profiled": split(prof, args.requests, cpu_ms),
            "frontend_src": args.frontend_src or "this checkout",
            "stream_interval": args.stream_interval,
            "sync_path_ms_per_request": sync_path(args.frontend_src),
            "request_path_ms_per_request": request_path(args.frontend_src),
            "loadavg_1m": os.getloadavg()[0],
            "cpu_count": os.cpu_count(),
        }
    write_json(args.json, result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
