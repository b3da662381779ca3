"""Soak: thousands of streamed requests on a mocker mesh with cancels, deadlines and a worker kill -9,
then proof that everything is back to idle.

The mesh: consul-dev (ACLs on), 3 mocker workers, a frontend with the KV router in-process. The client
sends ``--requests`` requests at ``--concurrency``: mostly KServe ModelStreamInfer, some OpenAI
streamed completions; a share is cancelled by the client after a random number of chunks, a share
carries a short deadline. Midway one worker is killed with SIGKILL and a replacement started (so the
mesh has the shape it had at warm-up). Every request must end with a full answer or a clear status;
each outcome is counted, and a stream that ends with neither is ``broken``.

"Idle" is read from the roles' /metrics after a warm-up and again after the run (waiting up to
``--settle`` seconds for it to come back): KV blocks in use, worker in-flight streams, the frontend
router's active sequences, leases when a role exposes them (``*lease*`` gauges), asyncio tasks, open
fds (procstats.py) must be exactly back; RSS within ``--rss-tolerance``.

    dynamo-grpc bench soak [--requests 10000] [--out DIR]     (bench/results/soak.json by default)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import struct
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc

from dynamo_grpc.bench.output import default_results_dir, write_json
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.consul_http import passing_instances, service_meta
from dynamo_grpc.launch.mesh import Mesh, MeshConfig
from dynamo_grpc.procstats import FDS, RSS, TASKS

#: gauges that must come back exactly: (metric name, what the table calls it)
EXACT = {
    "dynamo_worker_kv_active_blocks": "KV blocks in use",
    "dynamo_worker_inflight_requests": "worker in-flight streams",
    "dynamo_router_active_sequences": "frontend router active sequences",
    "dynamo_frontend_inflight_requests": "frontend in-flight requests",
    TASKS: "asyncio tasks",
    FDS: "open fds",
}


# -- reading the roles' metrics ---------------------------------------------------------------------


def scrape(address: str) -> dict[str, float]:
    """name -> value summed over labels, for the gauges the soak checks (and any ``*lease*`` one)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        if name in EXACT or name == RSS or "lease" in name:
            out[name] = out.get(name, 0.0) + float(value)
    return out


def snapshot(targets: dict[str, str], samples: int = 5) -> dict[str, dict[str, float]]:
    """role -> metric -> the median of ``samples`` scrapes 0.2 s apart (a scrape is itself a request)."""
    got: dict[str, list[dict[str, float]]] = {role: [] for role in targets}
    for i in range(samples):
        for role, addr in targets.items():
            got[role].append(scrape(addr))
        if i + 1 < samples:
            time.sleep(0.2)
    return {
        role: {k: statistics.median(s.get(k, 0.0) for s in scrs) for k in set().union(*scrs)}
        for role, scrs in got.items()
    }


def leaks(idle: dict[str, dict[str, float]], after: dict[str, dict[str, float]], rss_tol: float) -> list[str]:
    out = []
    for role, before in idle.items():
        for name, v0 in before.items():
            v1 = after.get(role, {}).get(name, 0.0)
            if name == RSS:
                if v1 > v0 * (1 + rss_tol):
                    out.append(f"{role} {name}: {v0:.0f} -> {v1:.0f} (> {rss_tol:.0%})")
            elif v1 != v0:
                out.append(f"{role} {name}: {v0:g} -> {v1:g}")
    return out


def settle(
    targets: dict[str, str], idle: dict[str, dict[str, float]], rss_tol: float, timeout: float
) -> tuple[dict[str, dict[str, float]], float]:
    """Poll until nothing leaks or ``timeout``; returns the last reading and the seconds it took."""
    t0 = time.monotonic()
    while True:
        after = snapshot(targets, samples=3)
        if not leaks(idle, after, rss_tol) or time.monotonic() - t0 > timeout:
            return after, time.monotonic() - t0
        time.sleep(0.5)


def table(idle: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> str:
    rows = [f"{'role':<12} {'metric':<40} {'idle':>14} {'after':>14}"]
    for role in idle:
        for name in sorted(idle[role]):
            rows.append(f"{role:<12} {name:<40} {idle[role][name]:>14g} {after.get(role, {}).get(name, 0.0):>14g}")
    return "\n".join(rows)


# -- the client ------------------------------------------------------------------------------------


@dataclass
class Plan:
    """What one request does: its API, length, and whether the client cancels or sets a deadline."""

    i: int
    api: str  # kserve | openai
    max_tokens: int
    cancel_after: int | None = None  # chunks
    deadline_s: float | None = None

    @classmethod
    def draw(cls, i: int, rng: random.Random, openai_share: float, cancel: float, deadline: float) -> Plan:
        p = cls(i, "openai" if rng.random() < openai_share else "kserve", rng.randint(8, 48))
        r = rng.random()
        if r < cancel:
            p.cancel_after = rng.randint(1, 6)
        elif r < cancel + deadline:
            p.deadline_s = rng.uniform(0.005, 0.08)
        return p


@dataclass
class Outcomes:
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, outcome: str, detail: str = "") -> None:
        self.counts[outcome] += 1
        if detail and outcome not in self.examples:
            self.examples[outcome] = detail[:300]


def _bytes(req: pb.ModelInferRequest, name: str, value: bytes) -> None:
    req.inputs.add(name=name, datatype="BYTES", shape=[1])
    req.raw_input_contents.append(struct.pack("<I", len(value)) + value)


def kserve_request(model: str, p: Plan) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id=f"soak-{p.i}")
    _bytes(req, "text_input", f"soak request {p.i}: say something about number {p.i % 97}".encode())
    _bytes(req, "sampling_parameters", json.dumps({"max_tokens": p.max_tokens, "ignore_eos": True}).encode())
    req.inputs.add(name="stream", datatype="BOOL", shape=[1])
    req.raw_input_contents.append(b"\x01")
    return req


async def run_kserve(stub: pb_grpc.GRPCInferenceServiceStub, model: str, p: Plan, out: Outcomes) -> None:
    async def one() -> AsyncIterator[pb.ModelInferRequest]:
        yield kserve_request(model, p)

    call = stub.ModelStreamInfer(one(), timeout=p.deadline_s or 60.0)
    chunks = 0
    try:
        async for msg in call:
            if msg.error_message:
                out.add("kserve:error_message", msg.error_message)
                return
            chunks += 1
            if msg.infer_response.parameters["triton_final_response"].bool_param:
                out.add("kserve:complete")
                return
            if p.cancel_after is not None and chunks >= p.cancel_after:
                call.cancel()
                out.add("kserve:client_cancel")
                return
        out.add("broken", f"kserve stream {p.i} ended without a final response or a status")
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the soak itself is being stopped
        # grpc.aio raises CancelledError for a call it considers cancelled on this side (seen rarely
        # when a deadline fires as the stream ends): the call ended with a status, count it
        out.add("kserve:deadline" if p.deadline_s is not None else "kserve:local_cancel", f"request {p.i}")
    except grpc.aio.AioRpcError as e:
        code = e.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and p.deadline_s is not None:
            out.add("kserve:deadline")
        elif code == grpc.StatusCode.CANCELLED and p.cancel_after is not None:
            out.add("kserve:client_cancel")
        else:
            out.add(f"kserve:{code.name}", e.details() or "")


async def run_openai(http: aiohttp.ClientSession, url: str, model: str, p: Plan, out: Outcomes) -> None:
    body = {"model": model, "prompt": f"soak {p.i}", "max_tokens": p.max_tokens, "stream": True, "ignore_eos": True}
    timeout = aiohttp.ClientTimeout(total=p.deadline_s or 60.0)
    chunks = 0
    saw_finish = False
    try:
        async with http.post(f"{url}/v1/completions", json=body, timeout=timeout) as resp:
            if resp.status != 200:
                out.add(f"openai:http_{resp.status}", (await resp.text())[:200])
                return
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                if line.strip() == b"data: [DONE]":
                    out.add("openai:complete" if saw_finish else "broken", f"stream {p.i}: [DONE] without a finish")
                    return
                event = json.loads(line[len(b"data: ") :])
                if "error" in event:  # the status line was sent: the error travels as an event
                    out.add("openai:error_event", json.dumps(event["error"]))
                    return
                saw_finish = saw_finish or any(c.get("finish_reason") for c in event.get("choices", []))
                chunks += 1
                if p.cancel_after is not None and chunks >= p.cancel_after:
                    resp.close()
                    out.add("openai:client_cancel")
                    return
        out.add("broken", f"openai stream {p.i} ended without [DONE] or an error")
    except TimeoutError:
        out.add("openai:deadline" if p.deadline_s is not None else "broken", f"request {p.i} timed out")
    except aiohttp.ClientError as e:
        out.add("openai:connection_error", str(e))


async def drive(
    mesh: Mesh, plans: list[Plan], concurrency: int, on_half: Any, out: Outcomes
) -> float:
    model = mesh.models[0]
    url = f"http://{mesh.frontend_http}"
    async with aiohttp.ClientSession() as http:
        channels = [grpc.aio.insecure_channel(mesh.frontend_grpc) for _ in range(4)]
        stubs = [pb_grpc.GRPCInferenceServiceStub(ch) for ch in channels]
        queue = iter(plans)
        done = 0
        half = len(plans) // 2
        fired = False

        async def lane(k: int) -> None:
            nonlocal done, fired
            for p in queue:
                if p.api == "kserve":
                    await run_kserve(stubs[k % len(stubs)], model, p, out)
                else:
                    await run_openai(http, url, model, p, out)
                done += 1
                if done >= half and not fired:
                    fired = True
                    await asyncio.get_running_loop().run_in_executor(None, on_half)

        t0 = time.perf_counter()
        await asyncio.gather(*(lane(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
        for ch in channels:
            await ch.close()
    return elapsed


# -- the mesh --------------------------------------------------------------------------------------


def _metrics_targets(mesh: Mesh) -> dict[str, str]:
    targets = {"frontend": mesh.frontend_http}
    for e in passing_instances(mesh.consul, "dynamo-worker", token=mesh.consul_token):
        meta = service_meta(e)
        targets[str(meta.get("grpc_address"))] = str(meta["metrics_address"])
    return targets


def _start_replacement(mesh: Mesh, speedup: float) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if "worker" in mesh.role_tokens:
        env["CONSUL_HTTP_TOKEN"] = mesh.role_tokens["worker"].secret_id
    args = ["worker", "--consul", mesh.consul, "--namespace", mesh.config.namespace, "--engine", "mocker"]
    args += ["--port", "0", "--metrics-port", "0", "--speedup-ratio", str(speedup)]
    with open(mesh.log_dir / "worker-replacement.log", "wb") as log:  # the child keeps its own copy
        return subprocess.Popen(
            [sys.executable, "-m", "dynamo_grpc.cli", *args], stdout=log, stderr=subprocess.STDOUT, env=env
        )


def _wait_workers(mesh: Mesh, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(passing_instances(mesh.consul, "dynamo-worker", token=mesh.consul_token)) == n:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{n} passing workers not seen within {timeout:.0f}s")


def soak(
    requests: int,
    concurrency: int = 32,
    workers: int = 3,
    speedup: float = 20.0,
    seed: int = 0,
    openai_share: float = 0.2,
    cancel_share: float = 0.1,
    deadline_share: float = 0.1,
    warmup: int = 100,
    settle_s: float = 30.0,
    rss_tolerance: float = 0.10,
    kill: bool = True,
) -> dict[str, Any]:
    """Run the soak; returns the result (outcomes, idle/after per role, leaks)."""
    rng = random.Random(seed)
    cfg = MeshConfig(
        workers=workers,
        speedup_ratio=speedup,
        router_mode="kv",
        http_port=0,
        worker_args=["--metrics-port", "0"],
    )
    replacement: subprocess.Popen[bytes] | None = None
    with Mesh(cfg) as mesh:
        try:
            warm = Outcomes()
            warm_plans = [Plan(i, "kserve" if i % 2 else "openai", 16) for i in range(warmup)]
            asyncio.run(drive(mesh, warm_plans, 8, lambda: None, warm))
            time.sleep(1.0)
            victim = mesh.procs[0]
            survivors = _metrics_targets(mesh)
            if kill:  # the victim's gauges end with it; the replacement has no idle reading
                survivors.pop(_grpc_address(victim.log), None)
            idle = snapshot(survivors)
            plans = [Plan.draw(i, rng, openai_share, cancel_share, deadline_share) for i in range(requests)]
            out = Outcomes()

            def kill9() -> None:
                nonlocal replacement
                if not kill:
                    return
                victim.popen.send_signal(signal.SIGKILL)
                victim.popen.wait()
                replacement = _start_replacement(mesh, speedup)
                _wait_workers(mesh, workers)

            elapsed = asyncio.run(drive(mesh, plans, concurrency, kill9, out))
            after, settled_s = settle(survivors, idle, rss_tolerance, settle_s)
        finally:
            if replacement is not None:
                replacement.terminate()
                try:
                    replacement.wait(15)
                except subprocess.TimeoutExpired:
                    replacement.kill()
    found = leaks(idle, after, rss_tolerance)
    return {
        "requests": requests,
        "concurrency": concurrency,
        "workers": workers,
        "speedup_ratio": speedup,
        "killed_worker": kill,
        "elapsed_s": round(elapsed, 2),
        "requests_per_s": round(requests / elapsed, 1),
        "outcomes": dict(sorted(out.counts.items())),
        "examples": out.examples,
        "broken": out.counts.get("broken", 0),
        "idle": idle,
        "after": after,
        "settle_s": round(settled_s, 2),
        "leaks": found,
        "table": table(idle, after),
        "rss_tolerance": rss_tolerance,
        "loadavg_1m": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
    }


def _grpc_address(log: Path) -> str:
    """A worker's gRPC address from its "worker ID serving MODEL on ADDRESS" line (the mesh knows pids)."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("worker ") and " serving " in line and " on " in line:
            return line.rsplit(" on ", 1)[1].strip()
    raise LookupError(f"no serving line in {log}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=default_results_dir() / "soak.json")
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--speedup-ratio", type=float, default=20.0, help="mocker speedup (lower: longer streams)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--settle", type=float, default=30.0, help="seconds to wait for idle after the run")
    p.add_argument("--no-kill", action="store_true", help="do not kill -9 a worker midway")
    args = p.parse_args(argv)
    if args.requests < 2 or args.concurrency < 1 or args.workers < 2:
        p.error("--requests must be >= 2, --concurrency >= 1, --workers >= 2 (one is killed)")
    res = soak(
        args.requests, args.concurrency, args.workers, args.speedup_ratio, args.seed,
        settle_s=args.settle, kill=not args.no_kill,
    )
    write_json(args.json, res)
    print(res["table"])
    print(json.dumps({k: res[k] for k in ("outcomes", "broken", "leaks", "elapsed_s", "requests_per_s")}, indent=2))
    return 0 if not res["leaks"] and not res["broken"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
