"""`dynamo-grpc bench disagg --only torch`: prefill interference on the real torch engine.

A few decodes run (short prompts, long outputs) while 4k-token prompts arrive, on 2 aggregated torch
workers and on 1 prefill + 1 decode worker (the same trace, the same arrival times). Each worker gets one
intra-op thread (``--num-threads 1``) and, where the machine has the cores, one core of its own: every
thread of its process is pinned (``sched_setaffinity`` per thread, like ``taskset -a``), so the
comparison is about a prefill stalling the decodes that share its engine, not about core sharing. The
frontend, Consul and this client are not pinned.

Both meshes start once (torch workers take a while to load) and stay up; rounds alternate the layouts,
each round with fresh random prompts so no prefix cache carries over. Every request has a client-side
deadline, so the bench always ends; a request that did not finish is listed under ``unfinished`` with
the tokens it had streamed (their gaps still count in the ITL).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from dynamo_grpc.bench.replay_driver import Driver, DriverConfig
from dynamo_grpc.bench.replay_metrics import RequestRecord, percentiles
from dynamo_grpc.bench.replay_trace import TraceRequest

LAYOUTS = ("agg", "disagg")


def torch_trace(n_decodes: int, decode_prompt: int, decode_tokens: int, n_long: int, long_tokens: int, gap_s: float):
    """The decodes start together; the long prompts (4 tokens out) arrive from 1 s on, ``gap_s`` apart."""
    reqs = [TraceRequest(i, 0.05 * i, decode_prompt, decode_tokens) for i in range(n_decodes)]
    reqs += [TraceRequest(n_decodes + j, 1.0 + gap_s * j, long_tokens, 4) for j in range(n_long)]
    return reqs


def pin_workers(mesh: Any, names: list[str]) -> dict[str, int] | None:
    """Pin every thread of each named worker to a core of its own; None when there are too few cores."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < len(names):
        return None
    out: dict[str, int] = {}
    for name, core in zip(names, cores, strict=False):
        pid = mesh.proc(name).pid
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), {core})
            except (ProcessLookupError, PermissionError):  # a thread that just ended
                pass
        out[name] = core
    return out


def _gaps(rec: RequestRecord) -> list[float]:
    """Per-token gaps between streamed responses (a response of k tokens after a gap g: k gaps of g/k)."""
    out: list[float] = []
    for (t0, _), (t1, n) in zip(rec.chunks, rec.chunks[1:], strict=False):
        out += [(t1 - t0) / max(n, 1)] * max(n, 1)
    return out


async def _replay(mesh: Any, trace: list[TraceRequest], seed: int, timeout_s: float) -> list[RequestRecord]:
    driver = Driver(DriverConfig(mesh.frontend_grpc, mesh.models[0], channels=2, request_timeout_s=timeout_s))
    try:
        await driver.wait_ready()
        rng = np.random.default_rng(seed)
        prompts = {r.index: rng.integers(100, 40_000, size=r.input_length, dtype=np.int64) for r in trace}
        return await driver.run(trace, lambda r: prompts[r.index])
    finally:
        await driver.close()


def _summary(records: list[RequestRecord], long_tokens: int) -> dict[str, Any]:
    """Latencies over every token that arrived, finished or not (a decode cut by its deadline still
    streamed its tokens: their gaps are what a user saw); ``unfinished`` names the ones that did not end."""
    decodes = [r for r in records if r.prompt_tokens < long_tokens]
    longs = [r for r in records if r.prompt_tokens >= long_tokens]
    t0 = min(r.sent_s for r in records)
    t1 = max((r.chunks[-1][0] for r in records if r.chunks), default=t0)
    return {
        "unfinished": [
            {
                "request": r.index,
                "prompt_tokens": r.prompt_tokens,
                "tokens_seen": sum(n for _, n in r.chunks),
                "worker": r.worker_id,
                "error": r.error,
            }
            for r in records
            if not r.ok
        ],
        "itl_decode_ms": percentiles((g for r in decodes for g in _gaps(r)), 1e3),
        "ttft_decode_ms": percentiles((r.ttft for r in decodes if r.chunks), 1e3),
        "ttft_long_ms": percentiles((r.ttft for r in longs if r.chunks), 1e3),
        "output_tokens_per_s": sum(n for r in records for _, n in r.chunks) / max(t1 - t0, 1e-9),
        "wall_s": t1 - t0,
    }


def run_torch_interference(
    rounds: int,
    n_decodes: int = 4,
    decode_prompt: int = 64,
    decode_tokens: int = 64,
    n_long: int = 2,
    long_tokens: int = 4096,
    gap_s: float = 4.0,
    timeout_s: float = 600.0,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    """The runs, medians and the agg/disagg ITL p99 ratio; ``on_round`` gets the summary so far after
    each round (the caller saves it: a run cut short keeps its finished rounds). ``log_dir`` keeps the
    meshes' process logs (``<dir>/agg``, ``<dir>/disagg``) after the run; by default they go with it."""
    from dynamo_grpc.launch.mesh import Mesh, MeshConfig

    trace = torch_trace(n_decodes, decode_prompt, decode_tokens, n_long, long_tokens, gap_s)
    # --ttl 600: on a loaded box a worker pinned to one busy core missed its heartbeats for minutes and Consul
    # dropped it mid-run ("no live worker"); this run measures latency, not liveness
    worker_args = ["--num-threads", "1", "--ttl", "600"]
    common = dict(workers=2, engine="torch", worker_args=worker_args, ready_timeout_s=900.0)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in LAYOUTS}
    pinned: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        d = log_dir or Path(tmp)
        meshes: dict[str, Any] = {}
        for layout in LAYOUTS:
            roles = ["prefill", "decode"] if layout == "disagg" else []
            cfg = MeshConfig(**common, worker_roles=roles, log_dir=Path(d) / layout)  # type: ignore[arg-type]
            # one after the other from this thread: the children die with the thread that started them
            meshes[layout] = stack.enter_context(Mesh(cfg))
        for layout in LAYOUTS:
            pinned[layout] = pin_workers(meshes[layout], ["worker-0", "worker-1"])
        for r in range(rounds):
            for layout in LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]:
                records = asyncio.run(_replay(meshes[layout], trace, seed=1000 + r, timeout_s=timeout_s))
                res = _summary(records, long_tokens)
                runs[layout].append(res)
                if on_round is not None:
                    on_round(_result(runs, pinned, trace, long_tokens))
                itl, ttft, long = res["itl_decode_ms"], res["ttft_decode_ms"], res["ttft_long_ms"]
                print(
                    f"  round {r + 1} {layout:>6}: decode ITL p99 {itl['p99'] or 0:.0f} ms, decode TTFT p50/p99 "
                    f"{ttft['p50'] or 0:.0f}/{ttft['p99'] or 0:.0f} ms, 4k TTFT p50 {long['p50'] or 0:.0f} ms, "
                    f"{res['output_tokens_per_s']:.1f} tok/s, unfinished {res['unfinished'] or 0}",
                    flush=True,
                )

    return _result(runs, pinned, trace, long_tokens)


def _result(
    runs: dict[str, list[dict[str, Any]]], pinned: dict[str, Any], trace: list[TraceRequest], long_tokens: int
) -> dict[str, Any]:
    def med(layout: str, key: str, p: str) -> float | None:
        vals = [x[key][p] for x in runs[layout] if x[key][p] is not None]
        return float(np.median(vals)) if vals else None

    ratios = [
        a["itl_decode_ms"]["p99"] / b["itl_decode_ms"]["p99"]
        for a, b in zip(runs["agg"], runs["disagg"], strict=False)
        if a["itl_decode_ms"]["p99"] and b["itl_decode_ms"]["p99"]
    ]
    decodes = [r for r in trace if r.input_length < long_tokens]
    return {
        "trace": {
            "decodes": len(decodes),
            "decode_prompt_tokens": decodes[0].input_length if decodes else 0,
            "decode_output_tokens": decodes[0].output_length if decodes else 0,
            "long_prompts": len(trace) - len(decodes),
            "long_prompt_tokens": long_tokens,
            "long_arrivals_s": [r.arrival_s for r in trace if r.input_length >= long_tokens],
        },
        "worker_threads": 1,
        "pinned_cores": pinned,
        "runs": runs,
        "medians": {
            layout: {
                "itl_decode_p99_ms": med(layout, "itl_decode_ms", "p99"),
                "itl_decode_p50_ms": med(layout, "itl_decode_ms", "p50"),
                "ttft_decode_p50_ms": med(layout, "ttft_decode_ms", "p50"),
                "ttft_decode_p99_ms": med(layout, "ttft_decode_ms", "p99"),
                "ttft_long_p50_ms": med(layout, "ttft_long_ms", "p50"),
                "ttft_long_p99_ms": med(layout, "ttft_long_ms", "p99"),
            }
            for layout in LAYOUTS
        },
        "itl_p99_agg_over_disagg": (
            {"median": float(np.median(ratios)), "min": min(ratios), "max": max(ratios)} if ratios else None
        ),
    }
