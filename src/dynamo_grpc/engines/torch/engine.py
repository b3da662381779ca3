"""TorchEngine: the Engine ABC over our Llama model, paged KV cache, scheduler and sampler.

The engine loop runs on a dedicated thread (a forward pass holds the GIL for long
stretches of C++ and would stall the asyncio loop); requests and aborts reach it
through a condition-guarded inbox, outputs go back with ``loop.call_soon_threadsafe``.
Scheduler and block-pool state is only mutated under ``_state`` so that
``cached_blocks()``/``load_metrics()`` from other threads see a consistent view, and KV
events are handed to the sink under the same lock, in the order they happened.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import torch

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
from dynamo_grpc.models import ModelCard, default_model_path, load_model_source

from .kv_cache import KvCache, num_blocks_for_bytes
from .kv_manager import KvCacheManager
from .model import LlamaModel
from .request import Request
from .runner import ModelRunner
from .sampler import SampleRow, make_generator, sample
from .scheduler import Scheduler, SchedulerConfig
from .weights import load_checkpoint

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_KV_CACHE_BYTES = 512 << 20


class _Stream:
    """The asyncio side of one request: its loop and queue."""

    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[EngineOutput | BaseException] = asyncio.Queue()


class TorchEngine(Engine):
    """A real Llama-family engine on CPU (or any torch device the weights fit)."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        block_size: int = 64,
        num_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        max_num_seqs: int = 32,
        max_num_batched_tokens: int = 2048,
        dtype: str = "float32",
        num_threads: int | None = None,
        enable_prefix_caching: bool = True,
        max_waiting: int = 4096,
        served_name: str | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if num_blocks is not None and kv_cache_bytes is not None:
            raise ValueError("give num_blocks or kv_cache_bytes, not both")
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        if num_threads is not None:
            if num_threads <= 0:
                raise ValueError("num_threads must be positive")
            torch.set_num_threads(num_threads)
        self.num_threads = num_threads or torch.get_num_threads()
        path = Path(model_path) if model_path is not None else default_model_path()
        card, self.tokenizer_json = load_model_source(path, served_name)
        self.dtype = DTYPES[dtype]
        ckpt = load_checkpoint(path, self.dtype)
        self.config = ckpt.config
        self.model = LlamaModel(ckpt, self.dtype)
        if num_blocks is None:
            num_blocks = num_blocks_for_bytes(
                self.config, block_size, self.dtype, kv_cache_bytes or DEFAULT_KV_CACHE_BYTES
            )
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.context_length = card.context_length
        self.card: ModelCard = dataclasses.replace(card, block_size=block_size, kv_blocks=num_blocks)
        eos = card.eos_token_ids or self.config.eos_token_ids
        self.eos_token_ids = frozenset(eos)
        self.max_waiting = max_waiting

        self.kv = KvCache(self.config, num_blocks, block_size, self.dtype)
        self.manager = KvCacheManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs, max_num_batched_tokens), self.manager)
        self.runner = ModelRunner(self.model, self.kv, self.manager)

        self._cv = threading.Condition()
        self._state = threading.RLock()
        self._inbox: list[Request] = []
        self._aborts: list[str] = []
        self._streams: dict[str, _Stream] = {}
        self._rows: dict[str, SampleRow] = {}
        self._sink: KvEventSink | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count()
        self.steps = 0
        self.step_seconds = 0.0

    # ------------------------------------------------------------------ Engine ABC

    async def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="torch-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        await asyncio.to_thread(thread.join)
        self._thread = None

    def set_event_sink(self, sink: KvEventSink | None) -> None:
        with self._state:
            self._sink = sink

    def load_metrics(self) -> LoadMetrics:
        with self._state:
            with self._cv:
                inbox = len(self._inbox)
            return LoadMetrics(
                active_blocks=self.manager.pool.num_active,
                total_blocks=self.num_blocks,
                waiting=len(self.scheduler.waiting) + inbox,
                running=len(self.scheduler.running),
            )

    def cached_blocks(self) -> list[KvStored]:
        with self._state:
            return self.manager.dump()

    def stats(self) -> dict[str, Any]:
        """Counters for benchmarks and metrics (prefix hit rate, preemptions, step time)."""
        with self._state:
            m = self.manager
            return {
                "prefix_hit_tokens": m.hit_tokens,
                "prefix_query_tokens": m.queried_tokens,
                "prefix_hit_rate": m.hit_tokens / m.queried_tokens if m.queried_tokens else 0.0,
                "cached_blocks": m.pool.num_cached,
                "preemptions": self.scheduler.num_preemptions,
                "steps": self.steps,
                "step_seconds": self.step_seconds,
                "kv_cache_bytes": self.kv.nbytes,
                "weight_bytes": self.model.nbytes,
            }

    def check(self, request: EngineRequest) -> None:
        """Raise the error a request that can never run here gets (before it is queued)."""
        prompt = request.token_ids
        sp = request.sampling
        if not prompt:
            raise errors.InvalidArgument("prompt has no tokens")
        vocab = self.config.vocab_size
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise errors.InvalidArgument(f"token ids must be in [0, {vocab})")
        if sp.max_tokens <= 0:
            raise errors.InvalidArgument("max_tokens must be positive")
        if sp.temperature < 0 or not 0 < sp.top_p <= 1 or sp.min_p < 0 or sp.min_p > 1:
            raise errors.InvalidArgument("temperature must be >= 0, top_p in (0, 1], min_p in [0, 1]")
        if sp.repetition_penalty <= 0:
            raise errors.InvalidArgument("repetition_penalty must be positive")
        if request.lora:
            raise errors.FailedPrecondition(f"LoRA adapter {request.lora!r}: the torch engine serves no LoRA adapters")
        capacity = self.num_blocks * self.block_size
        if len(prompt) >= self.context_length:
            raise PromptTooLong(f"prompt of {len(prompt)} tokens >= context length {self.context_length}")
        if len(prompt) >= capacity:
            raise PromptTooLong(f"prompt of {len(prompt)} tokens cannot fit the KV cache ({capacity} tokens)")

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        self.check(request)
        prompt = list(request.token_ids)
        if self._thread is None or self._stopping:
            raise EngineDead("the torch engine is not running")
        with self._cv:
            if len(self._inbox) + len(self.scheduler.waiting) >= self.max_waiting:
                raise EngineOverloaded(f"waiting queue is full ({self.max_waiting} requests)")
        req = Request(
            request_id=f"{request.request_id}#{next(self._ids)}",
            prompt_token_ids=prompt,
            sampling=request.sampling,
            eos_token_ids=self.eos_token_ids,
            max_total_tokens=min(self.context_length, self.num_blocks * self.block_size),
        )
        stream = self._stream(req)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()  # aborts the request (frees its blocks) if it did not finish

    async def _stream(self, req: Request) -> AsyncGenerator[EngineOutput, None]:
        stream = _Stream(asyncio.get_running_loop())
        rid = req.request_id
        with self._cv:
            self._streams[rid] = stream
            self._inbox.append(req)
            self._cv.notify()
        done = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                # a slow consumer gets what piled up as one output
                while item.finish_reason is None and not stream.queue.empty():
                    more = stream.queue.get_nowait()
                    if isinstance(more, BaseException):
                        done = True
                        raise more
                    item.token_ids.extend(more.token_ids)
                    if more.logprobs is not None:
                        item.logprobs = (item.logprobs or []) + more.logprobs
                    item.finish_reason = more.finish_reason
                done = item.finish_reason is not None
                yield item
                if done:
                    return
        finally:
            with self._cv:
                self._streams.pop(rid, None)
                if not done:
                    self._aborts.append(rid)
                    self._cv.notify()

    # ------------------------------------------------------------------ engine thread

    def _loop(self) -> None:
        torch.set_num_threads(self.num_threads)
        try:
            while True:
                with self._cv:
                    while not (self._inbox or self._aborts or self._stopping or self.scheduler.has_work()):
                        self._cv.wait()
                    if self._stopping:
                        break
                    inbox, self._inbox = self._inbox, []
                    aborts, self._aborts = self._aborts, []
                with self._state:
                    for rid in aborts:
                        self.scheduler.abort(rid)
                        self._rows.pop(rid, None)
                    for req in inbox:
                        self.scheduler.add(req)
                        self._rows[req.request_id] = SampleRow(
                            req.sampling,
                            req.prompt_token_ids,
                            req.output_token_ids,
                            req.eos_token_ids,
                            make_generator(req.sampling.seed),
                        )
                self._step()
        except BaseException:  # pragma: no cover - a bug in the loop must not hang clients
            log.exception("torch engine loop crashed")
            raise
        finally:
            self._shutdown()

    def _step(self) -> None:
        with self._state:
            out = self.scheduler.schedule()
            if not out:
                self._flush_events()
                if self.scheduler.running or not self.scheduler.waiting or out.preempted:
                    return
                # nothing runs and the head cannot be admitted: it can never fit
                req = self.scheduler.waiting[0]
                self.scheduler.abort(req.request_id)
                self._deliver([(req.request_id, PromptTooLong("request cannot fit the KV cache"))])
                return
        t0 = time.perf_counter()
        try:
            seqs, logits = self.runner.execute(out)
            rows = [self._rows[s.request.request_id] for s in seqs]
            tokens, lps = sample(logits, rows) if seqs else ([], [])
        except Exception as e:
            log.exception("torch engine step failed; failing its requests")
            with self._state:
                failed = []
                for s in out.seqs:
                    self.scheduler.abort(s.request.request_id)
                    failed.append((s.request.request_id, EngineDead(f"engine step failed: {e}")))
                self._flush_events()
            self._deliver(failed)
            return
        self.step_seconds += time.perf_counter() - t0
        self.steps += 1
        with self._state:
            sampled = {s.request.request_id: t for s, t in zip(seqs, tokens, strict=True)}
            finished = {f.request.request_id: f.reason for f in self.scheduler.update(out, sampled)}
            outputs: list[tuple[str, EngineOutput | BaseException]] = []
            for s, tok, lp in zip(seqs, tokens, lps, strict=True):
                req = s.request
                reason = finished.get(req.request_id)
                if reason is None and req.is_finished:
                    continue  # aborted meanwhile
                outputs.append(
                    (
                        req.request_id,
                        EngineOutput(
                            token_ids=[tok],
                            finish_reason=reason,
                            prompt_tokens=req.num_prompt_tokens,
                            cached_tokens=max(req.num_cached_tokens, 0),
                            logprobs=[lp] if lp is not None else None,
                        ),
                    )
                )
                if reason is not None:
                    self._rows.pop(req.request_id, None)
            self._flush_events()
        self._deliver(outputs)

    def _flush_events(self) -> None:
        events = self.manager.take_events()
        if events and self._sink is not None:
            try:
                self._sink(events)
            except Exception:
                log.exception("KV event sink failed")

    def _deliver(self, items: Sequence[tuple[str, EngineOutput | BaseException]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, EngineOutput | BaseException]]] = {}
        with self._cv:
            for rid, item in items:
                st = self._streams.get(rid)
                if st is not None:
                    by_loop.setdefault(st.loop, []).append((st, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that loop is closed: nobody is listening
                pass

    def _shutdown(self) -> None:
        with self._state:
            pending = list(self.scheduler.requests)
            for rid in pending:
                self.scheduler.abort(rid)
            with self._cv:
                inbox, self._inbox = self._inbox, []
                self._aborts.clear()
            self._rows.clear()
            self._flush_events()
        items: list[tuple[str, EngineOutput | BaseException]] = [
            (rid, EngineOutput([], "cancelled")) for rid in pending + [r.request_id for r in inbox]
        ]
        self._deliver(items)


def _put_all(batch: list[tuple[_Stream, EngineOutput | BaseException]]) -> None:
    for st, item in batch:
        st.queue.put_nowait(item)
