"""`bench kvbm`'s routed part on a virtual clock: N mocker engine cores behind the real router, no processes.

The mesh part measures real processes, and on a shared 2-core machine their CPU contention moves rounds
by more than the effect under test. Here the same trace goes through the real :class:`Router` (index fed
by the cores' KV events through the event codec, LoadMetrics after every step, the router queue with its
policy and age cap on the same clock) and one :class:`EngineCore` per worker, each step advancing that
worker's clock by the mocker's modelled step time. What differs from the mesh is only what costs wall
time there: no network, no event or load-report delay (a core's events and load reach the router when its
step ends), and predicted prefixes off (events are never late here).
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import tempfile
from pathlib import Path
from typing import Any

from dynamo_grpc.bench.replay_sim import _pct
from dynamo_grpc.bench.replay_trace import Trace

__all__ = ["simulate_routed"]


def _p50(values: list[float]) -> float:
    return _pct(values, 0.5) if values else 0.0


def simulate_routed(
    trace: Trace,
    name: str,
    sizes: dict[str, int],
    work: Path,
    workers: int,
    router_flags: dict[str, Any],
    engine: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """TTFT and hits of ``trace`` over ``workers`` cores of config ``name`` (bench.kvbm.CONFIGS) behind a
    router built with ``router_flags`` (RouterConfig fields); ``engine``: MockerConfig fields for every core
    (the schedule policy)."""
    return asyncio.run(_run(trace, name, sizes, work, workers, router_flags, engine or {}))


async def _run(
    trace: Trace,
    name: str,
    sizes: dict[str, int],
    work: Path,
    workers: int,
    router_flags: dict[str, Any],
    engine: dict[str, Any],
) -> dict[str, Any]:
    from dynamo_grpc.bench.kvbm import HASH_BLOCK, MOCKER_BLOCK_MIB
    from dynamo_grpc.bench.replay_tokens import DEFAULT_LOW_ID, DEFAULT_VOCAB_SIZE, prompt_tokens
    from dynamo_grpc.engines.base import EngineRequest, SamplingParams
    from dynamo_grpc.engines.core import EngineCore
    from dynamo_grpc.engines.mocker.config import MockerConfig
    from dynamo_grpc.engines.mocker.runner import MockerRunner
    from dynamo_grpc.events.codec import make_batch
    from dynamo_grpc.kvbm import KvbmConfig
    from dynamo_grpc.router.config import RouterConfig
    from dynamo_grpc.router.router import RouteInput, Router, RouteResult, WorkerInfo
    from dynamo_grpc.router.sync import IndexSink

    cores: list[EngineCore] = []
    for i in range(workers):
        kv = KvbmConfig()
        if name != "g1":
            host = sizes["g2_blocks"] if name == "g1+g2" else sizes["g2_blocks"] // 2
            kv.host_bytes = host * MOCKER_BLOCK_MIB << 20
        if name == "g1+g2+g3":
            kv.disk_dir = tempfile.mkdtemp(prefix=f"g3-sim{i}-", dir=work)
            kv.disk_bytes = sizes["g3_blocks"] * MOCKER_BLOCK_MIB << 20
        mc = MockerConfig(
            num_gpu_blocks=sizes["g1_blocks"], vocab_size=DEFAULT_VOCAB_SIZE, kvbm=kv, watermark=0.0, **engine
        )
        cores.append(EngineCore(mc.core_config(), MockerRunner(mc)))
    bs = cores[0].config.block_size
    clock = [0.0]
    for c in cores:
        c.scheduler.clock = lambda: clock[0]  # the lpm age cap on the virtual clock
    router = Router(RouterConfig(block_size=bs, seed=1, predicted_ttl_s=0, **router_flags))
    router.clock = lambda: clock[0]
    if router.queue is not None:
        router.queue.clock = router.clock
    ids = [f"w{i}" for i in range(workers)]
    router.set_workers([WorkerInfo(w, f"sim:{w}", block_size=bs, kv_blocks=sizes["g1_blocks"]) for w in ids])
    router.ready = True
    sink = IndexSink(router)
    seqs = [0] * workers

    arrival: dict[str, float] = {}
    first: dict[str, float] = {}
    cached: dict[str, tuple[int, int]] = {}
    placed: list[tuple[str, RouteResult]] = []
    busy_until: list[float | None] = [None] * workers  # a core's step in flight ends then
    pending_step: list[Any] = [None] * workers
    prompts: dict[str, list[int]] = {}
    events: list[tuple[float, int, int, str]] = []  # (time, order, worker or -1, request id)
    order = 0
    for r in trace.requests:
        rid = f"r{r.index}"
        prompts[rid] = prompt_tokens(r, HASH_BLOCK, DEFAULT_VOCAB_SIZE, DEFAULT_LOW_ID, 0).tolist()
        heapq.heappush(events, (r.arrival_s, order, -1, rid))
        order += 1
    tasks: list[asyncio.Task[RouteResult]] = []

    def start(i: int) -> None:
        """Run core i's next step now (its effect shows when the step ends)."""
        nonlocal order
        core = cores[i]
        if busy_until[i] is not None or not core.has_work():
            return
        res = core.step()
        if core.kv.tiers is not None and core.kv.tiers.disk is not None:
            core.kv.tiers.disk.flush()  # the virtual clock does not wait for the writer thread
        if not res.ran and not res.outputs and not res.events:
            return  # nothing can run until something arrives or leaves
        end = clock[0] + res.step_seconds
        busy_until[i] = end
        pending_step[i] = res
        heapq.heappush(events, (end, order, i, ""))
        order += 1

    def finish(i: int) -> None:
        res, pending_step[i], busy_until[i] = pending_step[i], None, None
        for erid, out in res.outputs:
            rid = erid.split("#", 1)[0]  # the core's id is the request's plus a placement suffix
            if rid not in first:
                first[rid] = clock[0] - arrival[rid]
                cached[rid] = (out.cached_tokens, out.prompt_tokens)
                router.prefill_done(rid, len(out.token_ids))
            if out.finish_reason is not None:
                router.free(rid)
        for erid, err in res.failures:
            raise RuntimeError(f"{erid} failed in the simulation: {err}")
        if res.events:
            seqs[i] += 1
            sink.apply_batch(make_batch(ids[i], 0, seqs[i], 1, bs, res.events, clock[0]))
        lm = cores[i].load_metrics()
        router.set_load((ids[i], 0), lm.active_blocks, lm.total_blocks, lm.waiting, lm.running)

    async def settle() -> None:
        for _ in range(3):
            await asyncio.sleep(0)
        while placed:
            rid, res = placed.pop(0)
            core = cores[int(res.instance_id[1:])]
            req = core.make_request(EngineRequest(rid, prompts[rid], SamplingParams(max_tokens=64)))
            core.add(req)
            start(int(res.instance_id[1:]))

    placed_at: dict[str, float] = {}
    later: set[str] = set()  # requests that are not their conversation's first turn
    conv_of = {f"r{r.index}": (r.hash_ids or (r.index,))[0] for r in trace.requests}
    last_worker: dict[int, str] = {}  # conversation (its first hash) -> the worker its last turn went to
    moved = [0, 0]  # later turns placed away from their previous turn's worker, later turns

    def on_placed(rid: str, task: asyncio.Task[RouteResult]) -> None:
        placed_at[rid] = clock[0]
        res = task.result()
        prev = last_worker.get(conv_of[rid])
        if prev is not None:
            later.add(rid)
            moved[0] += prev != res.instance_id
            moved[1] += 1
        last_worker[conv_of[rid]] = res.instance_id
        placed.append((rid, res))

    out_len = {f"r{r.index}": r.output_length for r in trace.requests}
    while events:
        t, _, who, rid = heapq.heappop(events)
        clock[0] = t
        if who < 0:
            arrival[rid] = t
            inp = RouteInput(rid, token_ids=prompts[rid], expected_output_tokens=out_len[rid])
            task = asyncio.ensure_future(router.route_wait(inp))
            task.add_done_callback(functools.partial(on_placed, rid))
            tasks.append(task)
        else:
            finish(who)
            start(who)
        await settle()
        for i in range(workers):
            start(i)
    host_hits = sum(c.kv.tiers.stats.host.hit_tokens for c in cores if c.kv.tiers is not None)
    disk_hits = sum(c.kv.tiers.stats.disk.hit_tokens for c in cores if c.kv.tiers is not None)
    for c in cores:
        c.close()
    if len(first) != len(trace.requests):
        raise RuntimeError(f"{len(trace.requests) - len(first)} requests never got a first token")
    ttft = list(first.values())
    prompt = sum(p for _, p in cached.values())
    hit = sum(c for c, _ in cached.values())
    q = router.queue
    router_wait = [placed_at[r] - arrival[r] for r in first]
    engine_wait = [first[r] - (placed_at[r] - arrival[r]) for r in first]
    diag = {
        # where TTFT goes: waiting in the router queue, then in the engine (admission + prefill)
        "router_wait_p50_s": _pct(router_wait, 0.5),
        "engine_ttft_p50_s": _pct(engine_wait, 0.5),
        "prefill_tokens": sum(c.stats.prefill_tokens for c in cores),
        "busy_s": sum(c.stats.simulated_s for c in cores),
        "steps": sum(c.stats.steps for c in cores),
        "decode_tokens": sum(c.stats.decode_tokens for c in cores),
        "end_s": clock[0],
        "moved_turns": moved[0] / max(moved[1], 1),
        # TTFT p50 of first turns (nothing cached anywhere) and of later ones: who waits for whom
        "ttft_p50_first_turns_s": _p50([first[r] for r in first if r not in later]),
        "ttft_p50_later_turns_s": _p50([first[r] for r in first if r in later]),
        "preemptions": sum(c.scheduler.num_preemptions for c in cores),
        "engine_overtaken": sum(c.scheduler.num_overtaken for c in cores),
        "engine_aged": sum(c.scheduler.num_aged for c in cores),
        "onboards": sum(
            c.kv.tiers.stats.host.onboards + c.kv.tiers.stats.disk.onboards for c in cores if c.kv.tiers is not None
        ),
    }
    return {
        "diag": diag,
        "config": name,
        "requests": len(ttft),
        "ttft_s": {"p50": _pct(ttft, 0.5), "p99": _pct(ttft, 0.99)},
        "hit_rate": {
            "total": hit / prompt,
            "device": (hit - host_hits - disk_hits) / prompt,
            "host": host_hits / prompt,
            "disk": disk_hits / prompt,
        },
        "queue": {"dispatched": q.dispatched, "overtaken": q.overtaken, "aged": q.aged} if q is not None else {},
    }
