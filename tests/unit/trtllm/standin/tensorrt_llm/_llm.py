"""Stand-in ``LLM`` with a small in-flight-batching executor on a thread (see the package docstring).

Like TensorRT-LLM, the executor runs off the event loop and hands results to it; blocks are reused
through a radix map keyed by its own hash, evicted LRU, and announced as KV events.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import json
import math
import queue
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._params import DisaggregatedParams, KvCacheConfig, SamplingParams

#: its hash (NOT our spec): blake2b over the parent hash and the tokens
_MASK = (1 << 64) - 1
#: blocks of the stand-in "GPU" when KvCacheConfig.max_tokens is not given
DEFAULT_BLOCKS = 512
#: context state a context_only request leaves for the generation_only one (the cache transceiver's job)
_CONTEXTS: dict[int, tuple[list[int], list[int]]] = {}
_ctx_ids = itertools.count(1000)
_KNOWN_ARGS = {"model", "tokenizer", "skip_tokenizer_init", "kv_cache_config", "max_batch_size", "max_num_tokens",
               "max_seq_len", "backend", "tensor_parallel_size"}  # fmt: skip


def _their_hash(parent: int | None, tokens: list[int]) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update((parent or 0).to_bytes(8, "little"))
    h.update(b"".join(t.to_bytes(4, "little") for t in tokens))
    return int.from_bytes(h.digest(), "little") & _MASK


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None


@dataclass
class CompletionOutput:
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class RequestOutput:
    """The handle ``generate_async`` returns: async-iterable updates, ``abort()``, the final state."""

    def __init__(self, request_id: int, prompt: list[int], llm: LLM, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt
        self.outputs = [CompletionOutput()]
        self.finished = False
        self.disaggregated_params: DisaggregatedParams | None = None
        self._llm = llm
        self._loop = loop
        self._updates: asyncio.Queue[tuple[list[int], list[dict[int, Logprob]], str | None]] = asyncio.Queue()
        self._ended = False

    def abort(self) -> None:
        self._llm._abort(self.request_id)

    def _push(self, ids: list[int], lps: list[dict[int, Logprob]], finish: str | None) -> None:  # executor thread
        self._loop.call_soon_threadsafe(self._updates.put_nowait, (list(ids), list(lps), finish))

    def __aiter__(self) -> RequestOutput:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._ended:
            raise StopAsyncIteration
        ids, lps, finish = await self._updates.get()
        out = self.outputs[0]
        out.token_ids, out.logprobs, out.finish_reason = ids, lps, finish
        if finish is not None:
            self.finished = True
            self._ended = True
        return self

    async def aresult(self) -> RequestOutput:
        async for _ in self:
            pass
        return self


@dataclass
class _Req:
    rid: int
    prompt: list[int]
    sp: SamplingParams
    out: RequestOutput
    disagg: DisaggregatedParams | None
    generated: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # block ids, in order
    hashes: list[int] = field(default_factory=list)  # its hashes of the full blocks stored so far
    rng: random.Random = field(default_factory=random.Random)
    shown_from: int = 0  # outputs start here (a generation-only request may hide the first tokens)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.generated


class LLM:
    def __init__(self, model: str, **kwargs: Any) -> None:
        unknown = set(kwargs) - _KNOWN_ARGS
        if unknown:
            raise ValueError(f"unknown LLM arguments {sorted(unknown)}")
        cfg = json.loads((Path(model) / "config.json").read_text())
        self.vocab_size = int(cfg["vocab_size"])
        self.skip_tokenizer_init = bool(kwargs.get("skip_tokenizer_init", False))
        kv: KvCacheConfig = kwargs.get("kv_cache_config") or KvCacheConfig()
        self.kv = kv
        self.tpb = kv.tokens_per_block
        self.max_batch = int(kwargs.get("max_batch_size") or 2048)
        self.max_seq_len = int(kwargs.get("max_seq_len") or cfg.get("max_position_embeddings", 2048))
        self.num_blocks = kv.max_tokens // self.tpb if kv.max_tokens else DEFAULT_BLOCKS
        self.step_s = float(sys.modules[__package__].STEP_SECONDS)
        self._lock = threading.Condition()
        self._free: list[int] = list(range(self.num_blocks))  # blank blocks
        self._lru: collections.OrderedDict[int, int] = collections.OrderedDict()  # its hash -> block, reusable
        self._tree: dict[int, int] = {}  # its hash -> block (cached, maybe in use)
        self._refs: dict[int, int] = collections.Counter()
        self._waiting: collections.deque[_Req] = collections.deque()
        self._running: list[_Req] = []
        self._aborts: set[int] = set()
        self._ids = itertools.count(1)
        maxlen = kv.event_buffer_max_size or None
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=maxlen)
        self._pending: list[dict[str, Any]] = []  # like its event manager: flushed once per iteration
        self._event_ids = itertools.count()
        self._stats: queue.Queue[dict[str, Any]] = queue.Queue()
        self._iter = 0
        self._stop = False
        self._emit({"type": "created", "num_blocks_per_cache_level": [self.num_blocks, 0]})
        self._thread = threading.Thread(target=self._loop, name="standin-executor", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- public API

    def generate_async(
        self,
        inputs: list[int],
        sampling_params: SamplingParams | None = None,
        lora_request: Any = None,
        prompt_adapter_request: Any = None,
        streaming: bool = False,
        kv_cache_retention_config: Any = None,
        disaggregated_params: DisaggregatedParams | None = None,
    ) -> RequestOutput:
        sp = sampling_params or SamplingParams()
        if sp.end_id is None and self.skip_tokenizer_init:
            raise ValueError(
                "tokenizer is required to reset end_id if it is None, or you can explicitly specify the end_id"
            )
        if lora_request is not None:
            raise ValueError("the stand-in serves no LoRA")
        dp = disaggregated_params
        if dp is not None and dp.request_type == "generation_only" and dp.ctx_request_id not in _CONTEXTS:
            raise ValueError(f"unknown ctx_request_id {dp.ctx_request_id}")
        rid = next(self._ids)
        req = _Req(rid, list(inputs), sp, RequestOutput(rid, list(inputs), self, asyncio.get_running_loop()), dp)
        req.rng.seed(sp.seed if sp.seed is not None else rid)
        with self._lock:
            self._waiting.append(req)
            self._lock.notify()
        return req.out

    def generate(self, inputs: list[list[int]], sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """The blocking form: runs the prompts to completion (its own loop on a helper thread, like its executor)."""
        results: list[RequestOutput] = []

        async def run() -> None:
            for prompt in inputs:
                results.append(await self.generate_async(prompt, sampling_params).aresult())

        helper = threading.Thread(target=lambda: asyncio.run(run()))
        helper.start()
        helper.join(60)
        return results

    def get_stats(self, timeout: float = 2) -> list[dict[str, Any]]:
        out = []
        while True:
            try:
                out.append(self._stats.get_nowait())
            except queue.Empty:
                return out

    def get_kv_cache_events(self, timeout: float = 2) -> list[dict[str, Any]]:
        with self._lock:
            out = list(self._events)
            self._events.clear()
        return out

    async def get_stats_async(self, timeout: float = 2):  # type: ignore[no-untyped-def]
        async for item in self._drain(lambda: self.get_stats(), timeout):
            yield item

    async def get_kv_cache_events_async(self, timeout: float = 2):  # type: ignore[no-untyped-def]
        async for item in self._drain(lambda: self.get_kv_cache_events(), timeout):
            yield item

    async def _drain(self, take, timeout):  # type: ignore[no-untyped-def]
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < timeout and not self._stop:
            items = take()
            for item in items:
                yield item
            if items:
                quiet_since = time.monotonic()
            await asyncio.sleep(0.001)

    def shutdown(self) -> None:
        with self._lock:
            for req in list(self._waiting) + self._running:
                self._aborts.add(req.rid)
            self._step()  # pending aborts finish as "cancelled"
            self._stop = True
            self._lock.notify()
        self._thread.join(5)

    # ---------------------------------------------------------------- executor

    def _abort(self, rid: int) -> None:
        with self._lock:
            self._aborts.add(rid)
            self._lock.notify()

    def _emit(self, data: dict[str, Any]) -> None:
        self._pending.append({"event_id": next(self._event_ids), "data": data, "window_size": self.max_seq_len})

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._waiting or self._running or self._aborts or self._stop):
                    self._lock.wait()
                if self._stop:
                    return
                self._step()
            time.sleep(self.step_s)

    def _alloc(self) -> int | None:
        if self._free:
            return self._free.pop()
        if self._lru:
            h, blk = self._lru.popitem(last=False)
            del self._tree[h]
            self._emit({"type": "removed", "block_hashes": [h]})
            return blk
        return None

    def _release(self, req: _Req) -> None:
        for i, blk in enumerate(req.blocks):
            self._refs[blk] -= 1
            if self._refs[blk] > 0:
                continue
            if i < len(req.hashes) and self.kv.enable_block_reuse and self._tree.get(req.hashes[i]) == blk:
                self._lru[req.hashes[i]] = blk
            else:
                self._free.append(blk)
        req.blocks, req.hashes = [], []

    def _admit(self, req: _Req) -> bool:
        """Reuse the cached prefix, allocate the rest of the prompt's blocks; False when the cache is full."""
        toks = req.prompt
        parent: int | None = None
        for start in range(0, len(toks) - len(toks) % self.tpb, self.tpb):
            h = _their_hash(parent, toks[start : start + self.tpb])
            blk = self._tree.get(h) if self.kv.enable_block_reuse else None
            if blk is None:
                break
            self._lru.pop(h, None)
            self._refs[blk] += 1
            req.blocks.append(blk)
            req.hashes.append(h)
            parent = h
        need = -(-(len(toks) + 1) // self.tpb) - len(req.blocks)
        for _ in range(need):
            blk = self._alloc()
            if blk is None:
                self._release(req)
                return False
            self._refs[blk] += 1
            req.blocks.append(blk)
        return True

    def _store_full_blocks(self, req: _Req) -> None:
        """Blocks that just filled join the radix map; new ones are announced in contiguous runs."""
        toks = req.tokens
        parent = req.hashes[-1] if req.hashes else None
        run: list[dict[str, Any]] = []
        run_parent: int | None = None
        while (len(req.hashes) + 1) * self.tpb <= len(toks) and len(req.hashes) < len(req.blocks):
            i = len(req.hashes)
            chunk = toks[i * self.tpb : (i + 1) * self.tpb]
            h = _their_hash(parent, chunk)
            req.hashes.append(h)
            if self.kv.enable_block_reuse and h not in self._tree:
                if not run:
                    run_parent = parent
                self._tree[h] = req.blocks[i]
                run.append({"type": "stored_block", "block_hash": h, "lora_id": None, "cache_level": 0,
                            "priority": 35, "tokens": [{"type": "unique_token", "token_id": t,
                                                        "token_extra_id": 0} for t in chunk]})  # fmt: skip
            elif run:
                self._emit({"type": "stored", "parent_hash": run_parent, "blocks": run})
                run = []
            parent = h
        if run:
            self._emit({"type": "stored", "parent_hash": run_parent, "blocks": run})

    def _sample(self, req: _Req) -> tuple[int, dict[int, Logprob]]:
        sp = req.sp
        digest = hashlib.blake2b(b"".join(t.to_bytes(4, "little") for t in req.tokens[-16:]), digest_size=8)
        base = int.from_bytes(digest.digest(), "little")
        if sp._greedy_decoding or not sp.temperature:
            tok = base % self.vocab_size
        else:
            tok = req.rng.randrange(self.vocab_size)
        if sp.bad_token_ids and tok in sp.bad_token_ids:
            tok = next(t for t in range(self.vocab_size) if t not in sp.bad_token_ids)
        lp: dict[int, Logprob] = {}
        if sp.logprobs:
            lp[tok] = Logprob(math.log(0.5), 1)
            others = [t for t in range(self.vocab_size) if t != tok][: sp.logprobs - 1]
            for r, t in enumerate(others, 2):
                lp[t] = Logprob(math.log(0.5 / r), r)
        return tok, lp

    def _finish(self, req: _Req, reason: str) -> None:
        if req.disagg is not None and req.disagg.request_type == "context_only" and reason != "cancelled":
            ctx_id = next(_ctx_ids)
            _CONTEXTS[ctx_id] = (list(req.prompt), list(req.generated))
            req.out.disaggregated_params = DisaggregatedParams(
                request_type="context_only", first_gen_tokens=list(req.generated), ctx_request_id=ctx_id,
                opaque_state=b"standin-transceiver:" + str(ctx_id).encode(),
            )  # fmt: skip
        self._release(req)
        req.out._push(req.generated[req.shown_from :], req.logprobs[req.shown_from :], reason)

    def _step(self) -> None:
        self._iter += 1
        for req in [r for r in self._running if r.rid in self._aborts]:
            self._running.remove(req)
            self._finish(req, "cancelled")
        for req in [r for r in self._waiting if r.rid in self._aborts]:
            self._waiting.remove(req)
            req.out._push([], [], "cancelled")
        self._aborts.clear()
        fresh: list[_Req] = []
        while self._waiting and len(self._running) < self.max_batch:
            if not self._admit(self._waiting[0]):
                break
            req = self._waiting.popleft()
            self._running.append(req)
            fresh.append(req)
        for req in list(self._running):
            dp = req.disagg
            if req in fresh and dp is not None and dp.request_type == "generation_only":
                _prompt, first = _CONTEXTS.pop(dp.ctx_request_id or -1)  # the KV "arrives" with the first tokens
                req.generated = list(first)
                req.logprobs = [{} for _ in first]
                if not sys.modules[__package__].GEN_ONLY_REPEATS_FIRST_TOKENS:
                    req.shown_from = len(first)
            else:
                if len(req.tokens) + 1 > len(req.blocks) * self.tpb:
                    blk = self._alloc()
                    if blk is None:  # no room: preempt back to the queue (recomputed later)
                        self._running.remove(req)
                        self._release(req)
                        req.generated, req.logprobs = [], []
                        self._waiting.appendleft(req)
                        continue
                    self._refs[blk] += 1
                    req.blocks.append(blk)
                tok, lp = self._sample(req)
                req.generated.append(tok)
                req.logprobs.append(lp)
            self._store_full_blocks(req)
            reason = self._reason(req)
            if reason is not None:
                self._running.remove(req)
                self._finish(req, reason)
            else:
                req.out._push(req.generated[req.shown_from :], req.logprobs[req.shown_from :], None)
        self._publish_stats()
        self._events.extend(self._pending)  # so even "created" is readable only after the first iteration
        self._pending.clear()

    def _reason(self, req: _Req) -> str | None:
        sp, n, tok = req.sp, len(req.generated), req.generated[-1]
        if req.disagg is not None and req.disagg.request_type == "context_only":
            return "length"
        if n >= (sp.min_tokens or 0):
            if tok == sp.end_id and not sp.ignore_eos:
                return "stop"
            if sp.stop_token_ids and tok in sp.stop_token_ids:
                return "stop"
        if n >= sp.max_tokens or len(req.tokens) >= self.max_seq_len:
            return "length"
        return None

    def _publish_stats(self) -> None:
        used = sum(1 for c in self._refs.values() if c > 0)
        self._stats.put({
            "iter": self._iter, "iterLatencyMS": self.step_s * 1000, "numActiveRequests": len(self._running),
            "numQueuedRequests": len(self._waiting), "maxNumActiveRequests": self.max_batch,
            "kvCacheStats": {"maxNumBlocks": self.num_blocks, "freeNumBlocks": self.num_blocks - used,
                             "usedNumBlocks": used, "tokensPerBlock": self.tpb},
        })  # fmt: skip
