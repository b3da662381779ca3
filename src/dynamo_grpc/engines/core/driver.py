"""The asyncio face of an engine core: ``generate()`` streams, and a loop that steps the core.

Two ways to run the loop, one interface: ``threaded=False`` steps the core inside the event loop and
awaits each step's simulated time (the mocker: steps are cheap, so it yields to gRPC handlers every
step and paces a simulated clock); ``threaded=True`` steps it on a dedicated thread (the torch
engine: a forward pass holds the GIL for long stretches of C++ and would stall the event loop).
Either way, core state changes only under ``_state``, so ``load_metrics()``/``cached_blocks()`` see
a consistent view, and each step's KV events reach the sink once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from dynamo_grpc import errors
from dynamo_grpc.engines.base import Engine, EngineDead, EngineOutput, EngineOverloaded, EngineRequest
from dynamo_grpc.events.kv import KvEvent, KvEventSink, KvStored, LoadMetrics
from dynamo_grpc.kvbm.stats import kvbm_stats

from .engine_core import EngineCore, StepResult
from .kv_manager import KvReservation
from .leases import Lease
from .request import Request

log = logging.getLogger(__name__)

#: the inline loop sleeps only once the simulated clock is this far ahead of the wall clock
_MIN_SLEEP_S = 0.001
#: lag behind the wall clock (a busy event loop) forgiven when pacing simulated time
_MAX_LAG_S = 0.05

_Item = EngineOutput | errors.DynamoError


class _Stream:
    """Per-request mailbox between the loop and the generate() iterator; merges what piles up."""

    __slots__ = ("done", "loop", "pending", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pending: list[_Item] = []
        self.waiter: asyncio.Future[None] | None = None
        self.done = False

    def put(self, item: _Item) -> None:
        self.pending.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def take(self) -> EngineOutput:
        """Everything produced since the last take, merged into one output (or the error)."""
        while not self.pending:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        items, self.pending = self.pending, []
        first = items[0]
        if isinstance(first, errors.DynamoError):
            raise first
        if len(items) == 1:
            return first
        out = EngineOutput(list(first.token_ids), first.finish_reason, first.prompt_tokens, first.cached_tokens)
        out.logprobs = list(first.logprobs) if first.logprobs else None
        for i, item in enumerate(items[1:], 1):
            if isinstance(item, errors.DynamoError):
                self.pending = items[i:]  # deliver the tokens first, the error on the next take
                break
            out.token_ids.extend(item.token_ids)
            if item.logprobs:
                out.logprobs = (out.logprobs or []) + item.logprobs
            out.finish_reason = item.finish_reason
            out.cached_tokens = item.cached_tokens
        return out


class CoreEngine(Engine):
    """An Engine over an :class:`EngineCore`; executors plug into the core, not into this class."""

    def __init__(self, core: EngineCore, *, threaded: bool) -> None:
        self.core = core
        self.threaded = threaded
        cfg = core.config
        self.block_size = cfg.block_size
        self.num_blocks = cfg.num_blocks
        self.context_length = cfg.context_length
        self._state = threading.RLock()
        self._cv = threading.Condition()
        self._inbox: list[Request] = []
        self._aborts: list[str] = []
        self._streams: dict[str, _Stream] = {}
        self._sink: KvEventSink | None = None
        self._running = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._wake = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._running:
            raise RuntimeError("engine already started")
        self._running, self._stopping = True, False
        if self.threaded:
            self._thread = threading.Thread(target=self._thread_loop, name="engine-core", daemon=True)
            self._thread.start()
        else:
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._inline_loop(), name="engine-core")

    async def stop(self) -> None:
        """Stop the loop; in-flight generate() iterators end with finish_reason "cancelled"."""
        if not self._running:
            return
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._running = False
        self._shutdown()
        with self._state:
            self.core.close()

    def set_event_sink(self, sink: KvEventSink | None) -> None:
        with self._state:
            self._sink = sink

    # ------------------------------------------------------------------ requests

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineOutput, None]:
        core = self.core
        core.check(request)
        if not self._running or self._stopping:
            raise EngineDead("the engine is not running")
        req = core.make_request(request)
        rid = req.request_id
        stream = _Stream(asyncio.get_running_loop())
        with self._cv:
            if len(self._inbox) + len(core.scheduler.waiting) >= core.config.max_waiting:
                raise EngineOverloaded(f"waiting queue is full ({core.config.max_waiting} requests)")
            self._streams[rid] = stream
            self._inbox.append(req)
            self._cv.notify()
        self._wake.set()
        try:
            while True:
                out = await stream.take()
                if out.finish_reason is not None:
                    stream.done = True
                yield out
                if stream.done:
                    return
        except errors.DynamoError:
            stream.done = True
            raise
        finally:
            with self._cv:
                self._streams.pop(rid, None)
                if not stream.done:
                    self._aborts.append(rid)
                    self._cv.notify()
            if not stream.done and not self.threaded:
                self._apply_aborts()  # free the blocks now, not at the next step
                self._wake.set()

    # ------------------------------------------------------------------ introspection

    def load_metrics(self) -> LoadMetrics:
        with self._state:
            with self._cv:
                inbox = len(self._inbox)
            return self.core.load_metrics(extra_waiting=inbox)

    def cached_blocks(self) -> list[KvStored]:
        with self._state:
            return self.core.cached_blocks()

    def hit_rate(self) -> float:
        return self.core.kv.hit_rate

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (vLLM's ``reset_prefix_cache``, KvCleared at the next step); False while
        requests hold blocks. Benchmarks use it so that repeated rounds start cold."""
        with self._state:
            return self.core.kv.pool.clear()

    def kvbm_stats(self) -> dict[str, Any]:
        """The KV tiers' counters and gauges (empty without tiers), for metrics and benchmarks."""
        with self._state:
            return kvbm_stats(self.core.kv.tiers)
    # ------------------------------------------------------------------ KV leases (disaggregation)

    def begin_pull(self, lease_id: str) -> Lease:
        """Claim a lease for one pull (errors.NotFound / FailedPrecondition); call ``end_pull`` after."""
        with self._state:
            return self.core.leases.begin_pull(lease_id)

    def end_pull(self, lease_id: str) -> bool:
        with self._state:
            done = self.core.leases.end_pull(lease_id)
        self._blocks_freed()
        return done

    def release_lease(self, lease_id: str) -> bool:
        with self._state:
            done = self.core.leases.release(lease_id)
        self._blocks_freed()
        return done

    def expire_leases(self) -> int:
        with self._state:
            n = self.core.leases.expire()
        if n:
            self._blocks_freed()
        return n

    def lease_counts(self) -> dict[str, int]:
        """Leases now and so far, for /metrics."""
        with self._state:
            t = self.core.leases
            st = t.stats
            return {
                "active": t.num_active,
                "pinned_blocks": t.num_blocks,
                "created": st.created,
                "pulled": st.pulled,
                "released": st.released,
                "expired": st.expired,
                "refused": st.refused,
            }

    # ------------------------------------------------------------------ pulled KV (the decode side)

    def reserve_kv(self, token_ids: list[int], lora: str | None = None) -> KvReservation | None:
        """Reserve the blocks a pulled prompt's KV goes into (EngineCore.reserve_import); the caller
        hands the reservation to its request (``KvImport.reservation``) or cancels it."""
        with self._state:
            res = self.core.reserve_import(token_ids, lora)
            self._emit(self.core.kv.take_events())  # cached blocks it evicted (KvRemoved), now, not next step
            return res

    def cancel_reservation(self, res: KvReservation) -> bool:
        """Free a reservation no request claimed (idempotent: False once claimed or cancelled)."""
        with self._state:
            done = self.core.kv.cancel(res)
        if done:
            self._blocks_freed()
        return done

    def import_views(self, block_ids: list[int]) -> list[memoryview]:
        """Writable views of reserved blocks in the wire layout (a transfer writes into them); empty
        for executors that hold no bytes (the mocker)."""
        views = getattr(self.core.executor, "import_views", None)
        return views(block_ids) if views is not None else []

    def export_blocks(self, block_ids: list[int]) -> bytes:
        """Raw KV bytes of pinned blocks (executors that hold no tensors return b"")."""
        export = getattr(self.core.executor, "export_blocks", None)
        return export(block_ids) if export is not None else b""

    def export_views(self, block_ids: list[int]) -> list[memoryview]:
        """The same bytes as :meth:`export_blocks`, as views of the cache's memory where the executor
        can give them (a zero-copy socket write); otherwise one view of the copied bytes."""
        views = getattr(self.core.executor, "export_views", None)
        return views(block_ids) if views is not None else [memoryview(self.export_blocks(block_ids))]

    def _blocks_freed(self) -> None:
        """Blocks went back to the pool: a waiting request may fit now."""
        with self._cv:
            self._cv.notify()
        if not self.threaded:
            self._wake.set()

    # ------------------------------------------------------------------ the loop

    def _intake(self) -> None:
        """Apply queued aborts, then admit queued requests whose client is still there."""
        with self._cv:
            inbox, self._inbox = self._inbox, []
            aborts, self._aborts = self._aborts, []
            live = [r for r in inbox if r.request_id in self._streams]
        with self._state:
            for rid in aborts:
                self.core.abort(rid)
            for req in live:
                self.core.add(req)

    def _apply_aborts(self) -> None:
        with self._cv:
            aborts, self._aborts = self._aborts, []
        if aborts:
            with self._state:
                for rid in aborts:
                    self.core.abort(rid)  # one still in the inbox is dropped by _intake

    def _step(self) -> StepResult:
        with self._state:
            res = self.core.step()
            self._emit(res.events)
        return res

    def _emit(self, events: list[KvEvent]) -> None:
        if events and self._sink is not None:
            try:
                self._sink(events)
            except Exception:
                log.exception("KV event sink failed; %d events dropped", len(events))

    def _items(self, res: StepResult) -> list[tuple[str, _Item]]:
        items: list[tuple[str, _Item]] = list(res.outputs)
        items.extend(res.failures)
        return items

    async def _inline_loop(self) -> None:
        core = self.core
        clock = time.monotonic()  # simulated time of the end of the last step
        while not self._stopping:
            self._intake()
            if not core.has_work():
                self._wake.clear()
                if not self._inbox:
                    await self._wake.wait()
                clock = time.monotonic()
                continue
            res = self._step()
            if not res.ran:
                self._deliver_inline(self._items(res))
                # nothing fits (every block pinned by requests that cannot advance): wait for a change
                self._wake.clear()
                if not self._inbox and not self._aborts:
                    await self._wake.wait()
                clock = time.monotonic()
                continue
            clock = max(clock, time.monotonic() - _MAX_LAG_S) + res.step_seconds
            ahead = clock - time.monotonic()
            await asyncio.sleep(ahead if ahead >= _MIN_SLEEP_S else 0)
            self._deliver_inline(self._items(res))

    def _deliver_inline(self, items: Sequence[tuple[str, _Item]]) -> None:
        streams = self._streams
        for rid, item in items:
            st = streams.get(rid)
            if st is not None:
                st.put(item)

    def _on_loop_thread(self) -> None:
        """Called first on the loop thread (threaded mode): per-thread set-up of the executor."""

    def _thread_loop(self) -> None:
        core = self.core
        self._on_loop_thread()
        try:
            while True:
                with self._cv:
                    while not (self._inbox or self._aborts or self._stopping or core.has_work()):
                        self._cv.wait()
                    if self._stopping:
                        break
                self._intake()
                res = self._step()
                items = self._items(res)
                if items:
                    self._deliver_threadsafe(items)
                if not res.ran:
                    # nothing fits (blocks held by leases, pulls in flight, or requests that cannot advance):
                    # wait for a change instead of spinning; blocks coming back notify (_blocks_freed)
                    with self._cv:
                        if not (self._inbox or self._aborts or self._stopping):
                            self._cv.wait(0.05)
        except BaseException as e:  # pragma: no cover - a bug in the loop must not hang clients
            log.exception("engine loop crashed")
            with self._cv:
                self._stopping = True
                dead = [(rid, EngineDead(f"engine loop crashed: {e}")) for rid in self._streams]
            self._deliver_threadsafe(dead)  # type: ignore[arg-type]
            raise

    def _deliver_threadsafe(self, items: Sequence[tuple[str, _Item]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, _Item]]] = {}
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
        """End every request "cancelled" and free its blocks (the loop is no longer running)."""
        with self._state:
            with self._cv:
                inbox, self._inbox = self._inbox, []
                self._aborts.clear()
            pending = self.core.abort_all() + [r.request_id for r in inbox]
            self.core.leases.release_all()
            self._emit(self.core.kv.take_events())
            with self._cv:
                streams = [(self._streams.pop(rid, None), rid) for rid in pending]
        for st, _ in streams:
            if st is None:
                continue
            item = EngineOutput([], "cancelled")
            if st.loop.is_closed():
                continue
            if st.loop is _current_loop():
                st.put(item)
            else:
                st.loop.call_soon_threadsafe(st.put, item)


def _current_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _put_all(batch: list[tuple[_Stream, _Item]]) -> None:
    for st, item in batch:
        st.put(item)
