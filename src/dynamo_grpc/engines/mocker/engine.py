"""The mocker engine: the scheduler and block manager driven by an asyncio task on a simulated clock.

No model runs. Each loop iteration schedules a step, waits the timing model's step time (divided
by speedup_ratio), applies it and hands each request its new token. The wait is paced against a
simulated clock rather than slept per step, so at a high speedup_ratio (steps of microseconds) the
loop runs many steps per sleep yet keeps the simulated rate, and it still yields to the event loop
every step so gRPC handlers are served fairly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from dynamo_grpc import errors
from dynamo_grpc.engines.base import (
    Engine,
    EngineDead,
    EngineOutput,
    EngineOverloaded,
    EngineRequest,
    KvEventSink,
    KvStored,
    LoadMetrics,
    PromptTooLong,
)

from .config import MockerConfig
from .request import MockRequest
from .scheduler import Scheduler
from .timing import TimingModel

log = logging.getLogger(__name__)

#: the loop sleeps only once the simulated clock is this far ahead of the wall clock
_MIN_SLEEP_S = 0.001


@dataclass
class EngineStats:
    """Counters the worker turns into Prometheus metrics."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    #: sum of the timing model's step times (what the steps "cost"; wall time tracks it)
    simulated_s: float = 0.0


class _Stream:
    """Per-request mailbox between the engine loop and the generate() iterator.

    Lighter than an asyncio.Queue (one future per wake-up, none while outputs are pending), which
    matters at high speedup ratios where the loop produces tokens for hundreds of streams per step.
    """

    __slots__ = ("done", "pending", "request", "waiter")

    def __init__(self, request: MockRequest) -> None:
        self.request = request
        self.pending: list[EngineOutput] = []
        self.waiter: asyncio.Future[None] | None = None
        self.done = False

    def put(self, out: EngineOutput) -> None:
        self.pending.append(out)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> EngineOutput:
        """Everything produced since the last take, merged into one output."""
        while not self.pending:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        outs, self.pending = self.pending, []
        if len(outs) == 1:
            return outs[0]
        last = outs[-1]
        tokens = [t for o in outs for t in o.token_ids]
        return EngineOutput(tokens, last.finish_reason, last.prompt_tokens, last.cached_tokens)


class MockerEngine(Engine):
    """An Engine with the behaviour and timing of a vLLM-like engine, and real KV events."""

    def __init__(self, config: MockerConfig | None = None) -> None:
        self.config = config or MockerConfig()
        self.scheduler = Scheduler(self.config)
        self.timing = TimingModel(self.config.speedup_ratio)
        self.block_size = self.config.block_size
        self.num_blocks = self.config.num_gpu_blocks
        self.context_length = self.config.context_length
        self.stats = EngineStats()
        self._max_total = min(self.context_length, self.num_blocks * self.block_size)
        self._sink: KvEventSink | None = None
        self._streams: dict[str, _Stream] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._ids = itertools.count()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("engine already started")
        self._stopped = False
        self._task = asyncio.create_task(self._loop(), name="mocker-engine")

    async def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for rid in list(self._streams):
            self._abort(rid)
        self._flush_events()

    def set_event_sink(self, sink: KvEventSink | None) -> None:
        self._sink = sink

    # ------------------------------------------------------------------ requests

    def check(self, request: EngineRequest) -> None:
        """Raise PromptTooLong / ValueError for a request that can never run here."""
        n = len(request.token_ids)
        if n == 0:
            raise errors.InvalidArgument("token_ids is empty")
        if request.sampling.max_tokens < 1:
            raise errors.InvalidArgument(f"max_tokens must be >= 1, got {request.sampling.max_tokens}")
        if n >= self.context_length:
            raise PromptTooLong(
                f"prompt has {n} tokens; the context length is {self.context_length} "
                "(prompt + at least 1 generated token must fit)"
            )
        cache_tokens = self.num_blocks * self.block_size
        if n + 1 > cache_tokens:
            raise PromptTooLong(
                f"prompt has {n} tokens; the KV cache holds {cache_tokens} "
                f"({self.num_blocks} blocks of {self.block_size})"
            )
        if request.sampling.logprobs is not None:
            # tokens come from a hash, not a distribution: any number here would be made up
            raise errors.UnsupportedOption(
                "logprobs", "is not supported by the mocker engine (it runs no model); ask a torch or trtllm worker"
            )
        vocab = self.config.vocab_size
        bad = next((t for t in request.token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise errors.InvalidArgument(f"token id {bad} is outside the vocabulary (size {vocab})")

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        self.check(request)
        if self._stopped or self._task is None:
            raise EngineDead("the mocker engine is not running")
        if self.config.max_waiting and len(self.scheduler.waiting) >= self.config.max_waiting:
            raise EngineOverloaded(f"waiting queue is full ({self.config.max_waiting} requests)")
        req = MockRequest(
            # internal id: a client's id may repeat (retries, migrations) and must never fail its request
            request_id=f"{request.request_id}#{next(self._ids)}",
            prompt=list(request.token_ids),
            sampling=request.sampling,
            lora=request.lora or None,
            max_total_tokens=self._max_total,
        )
        stream = _Stream(req)
        self._streams[req.request_id] = stream
        self.scheduler.add(req)
        self._wake.set()
        try:
            while True:
                out = await stream.take()
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            if not stream.done:
                self._abort(req.request_id)
                self._flush_events()

    def _abort(self, request_id: str) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        stream.done = True
        if self.scheduler.abort(request_id) is not None:
            self.stats.cancelled += 1
            self._wake.set()  # freed blocks may let a waiting request in
        req = stream.request
        stream.put(EngineOutput([], "cancelled", len(req.prompt), max(req.cached_tokens, 0)))

    # ------------------------------------------------------------------ introspection

    def load_metrics(self) -> LoadMetrics:
        s = self.scheduler
        return LoadMetrics(
            active_blocks=s.kv.pool.num_active,
            total_blocks=self.num_blocks,
            waiting=len(s.waiting),
            running=len(s.running),
        )

    def cached_blocks(self) -> list[KvStored]:
        return self.scheduler.kv.dump()

    def hit_rate(self) -> float:
        kv = self.scheduler.kv
        return kv.hit_tokens / kv.queried_tokens if kv.queried_tokens else 0.0

    # ------------------------------------------------------------------ loop

    def _flush_events(self) -> None:
        events = self.scheduler.kv.take_events()
        if events and self._sink is not None:
            try:
                self._sink(events)
            except Exception:
                log.exception("KV event sink failed; %d events dropped", len(events))

    async def _loop(self) -> None:
        sched = self.scheduler
        clock = time.monotonic()  # simulated time of the end of the last step
        while not self._stopped:
            if not sched.has_work():
                self._flush_events()
                self._wake.clear()
                await self._wake.wait()
                clock = time.monotonic()
                continue
            out = sched.schedule()
            self._flush_events()  # evictions made while allocating
            if out.is_empty:
                # Nothing fits (every block pinned by requests that cannot advance): wait for a change.
                self._wake.clear()
                await self._wake.wait()
                clock = time.monotonic()
                continue
            active = sched.kv.pool.num_active / self.num_blocks
            step_s = self.timing.step_seconds(out.prefill_tokens, out.num_decodes, active)
            self.stats.simulated_s += step_s
            # Lag behind the wall clock (a busy event loop) is forgiven up to 50 ms, never more.
            clock = max(clock, time.monotonic() - 0.05) + step_s
            ahead = clock - time.monotonic()
            await asyncio.sleep(ahead if ahead >= _MIN_SLEEP_S else 0)
            results = sched.update(out)
            self._flush_events()
            self.stats.steps += 1
            self.stats.prefill_tokens += out.prefill_tokens
            self.stats.decode_tokens += out.num_decodes
            for r in results:
                stream = self._streams.get(r.request.request_id)
                if stream is None:
                    continue
                req = r.request
                toks = [r.token_id] if r.token_id is not None else []
                stream.put(EngineOutput(toks, r.finish_reason, len(req.prompt), max(req.cached_tokens, 0)))
                if r.finish_reason is not None:
                    stream.done = True
                    self._streams.pop(req.request_id, None)
                    self.stats.finished += 1
