"""TensorRT-LLM behind the Engine interface: ``LLM.generate_async(streaming=True)`` per request.

TensorRT-LLM batches, schedules and caches by itself; the adapter only translates. Per request it
checks what every engine checks (tokens, sampling ranges, context, cache size), refuses what the LLM
API cannot honour (``sampling.py``), bounds the queue (``max_num_seqs + max_waiting`` in flight) and
aborts the request through its handle (``RequestOutput.abort()``) when the stream is closed. Two
background tasks read ``get_kv_cache_events_async`` (translated by ``events.py``) and
``get_stats_async`` (``stats.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from dynamo_grpc import errors
from dynamo_grpc.engines.base import (
    Engine,
    EngineDead,
    EngineOutput,
    EngineOverloaded,
    EngineRequest,
    TokenLogprob,
    check_prompt_fits,
    check_token_ids,
)
from dynamo_grpc.events.kv import KvEvent, KvEventSink, KvStored, LoadMetrics
from dynamo_grpc.models.card import ModelCard
from dynamo_grpc.tokens.block_hash import block_hash_list

from . import disagg
from .api import TrtllmApi, load_api
from .config import TrtllmConfig
from .events import EventTranslator
from .sampling import check_supported, to_trtllm_kwargs
from .stats import load_from_stats, tokens_per_block

log = logging.getLogger(__name__)

#: its finish reasons -> ours
_FINISH = {"stop": "stop", "length": "length", "cancelled": "cancelled"}


class TrtllmEngine(Engine):
    """An Engine over ``tensorrt_llm.LLM``. Building it builds (or loads) the TensorRT-LLM engine."""

    def __init__(self, config: TrtllmConfig, card: ModelCard, api: TrtllmApi | None = None) -> None:
        config.validate()
        self.config = config
        self.card = card
        self.api = api or load_api()
        self.block_size = config.block_size
        self.context_length = card.context_length
        self.vocab_size = card.vocab_size
        if not card.eos_token_ids:
            raise ValueError(
                f"model {card.name!r} names no EOS token id: TensorRT-LLM runs without its tokenizer here and needs one"
            )
        self._eos = list(card.eos_token_ids)
        self._events = EventTranslator(config.block_size)
        self._sink: KvEventSink | None = None
        self._active: set[Any] = set()
        self._stats: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._dead: str | None = None
        self._stopping = False
        self.llm = self.api.LLM(**self.llm_kwargs())
        self.num_blocks = self._kv_cache_blocks()

    def llm_kwargs(self) -> dict[str, Any]:
        """The ``LLM(...)`` arguments (one place, so the mapping is testable)."""
        c = self.config
        kv: dict[str, Any] = {
            "enable_block_reuse": c.enable_prefix_caching,
            "event_buffer_max_size": c.event_buffer_max_size,
        }
        if c.num_blocks is not None:
            kv["max_tokens"] = c.num_blocks * c.block_size
        if c.free_gpu_memory_fraction is not None:
            kv["free_gpu_memory_fraction"] = c.free_gpu_memory_fraction
        try:
            kv_config = self.api.KvCacheConfig(tokens_per_block=c.block_size, **kv)
        except (TypeError, ValueError) as e:  # pydantic's ValidationError is a ValueError
            raise ValueError(
                f"TensorRT-LLM {self.api.version}: KvCacheConfig(tokens_per_block={c.block_size}) was refused "
                f"({e}); the adapter needs TensorRT-LLM >= 1.1, where the block size is a KvCacheConfig field"
            ) from e
        return {
            "model": str(c.model),
            "skip_tokenizer_init": True,  # token ids in, token ids out: the frontend owns the tokenizer
            "kv_cache_config": kv_config,
            "max_batch_size": c.max_num_seqs,
            "max_num_tokens": c.max_num_batched_tokens,
            "max_seq_len": self.context_length,
        }

    def _kv_cache_blocks(self) -> int:
        """The GPU pool's blocks, from the ``created`` KV event TensorRT-LLM emits when it builds the cache.

        Its events (and stats) are flushed once per iteration, so when none is readable yet one 1-token
        warm-up request runs first; its stats' ``maxNumBlocks`` is the fallback.
        """
        self._drain_sync()
        if not self._events.blocks_per_level:
            eos = self._eos[0]
            warm = self.api.SamplingParams(max_tokens=1, end_id=eos, pad_id=eos, detokenize=False)
            self.llm.generate([[eos]], sampling_params=warm)
            self._drain_sync()
        levels = self._events.blocks_per_level
        have = levels[0] if levels else self._stats.get("kvCacheStats", {}).get("maxNumBlocks")
        want = self.config.num_blocks
        if have is None:
            if want is None:
                raise ValueError("TensorRT-LLM reported no KV cache size (no 'created' event); set --num-gpu-blocks")
            return want
        if want is not None and have < want:
            raise ValueError(f"--num-gpu-blocks {want}: TensorRT-LLM allocated only {have} blocks")
        return int(have)

    def _drain_sync(self) -> None:
        timeout = self.config.poll_timeout_s
        for event in self.llm.get_kv_cache_events(timeout=timeout):
            self._translate(event)
        for stat in self.llm.get_stats(timeout=timeout):
            self._on_stats(stat)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._poll(self.llm.get_kv_cache_events_async, self._on_event), name="trtllm-events"),
            asyncio.create_task(self._poll(self.llm.get_stats_async, self._on_stats), name="trtllm-stats"),
        ]

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        for result in list(self._active):
            result.abort()  # each stream ends with finish_reason "cancelled"
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(self.llm.shutdown)

    async def _poll(self, source: Callable[..., AsyncIterator[Any]], handle: Callable[[Any], None]) -> None:
        """Read one of its async streams for as long as the engine runs (each ends after a quiet timeout)."""
        while not self._stopping:
            seen = 0
            try:
                async for item in source(timeout=self.config.poll_timeout_s):
                    seen += 1
                    handle(item)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad item must not stop events or stats for good
                log.exception("reading TensorRT-LLM %s failed", getattr(source, "__name__", source))
                await asyncio.sleep(0.5)
            await asyncio.sleep(0 if seen else 0.05)  # a stream that ends at once when idle must not spin

    def _translate(self, event: Any) -> list[KvEvent]:
        return self._events.translate(_as_dict(event))

    def _on_event(self, event: Any) -> None:
        out = self._translate(event)
        if out and self._sink is not None:
            self._sink(out)

    def _on_stats(self, stat: Any) -> None:
        stat = _as_dict(stat)
        self._stats = stat
        tpb = tokens_per_block(stat)
        if tpb is not None and tpb != self.block_size and self._dead is None:
            self._dead = (
                f"TensorRT-LLM runs with tokens_per_block={tpb}, the model card says {self.block_size}: "
                "the router's block hashes would not match; restart the worker with a matching --block-size"
            )
            log.error("%s", self._dead)

    # ------------------------------------------------------------------ Engine

    def set_event_sink(self, sink: KvEventSink | None) -> None:
        self._sink = sink

    def load_metrics(self) -> LoadMetrics:
        return load_from_stats(self._stats, self.num_blocks)

    def cached_blocks(self) -> list[KvStored]:
        return self._events.cached_blocks()

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        return self._run(request)

    async def prefill(self, request: EngineRequest) -> tuple[EngineOutput, bytes]:
        """Run the prompt as a ``context_only`` request: the first token(s) and the opaque params for the handle.

        The KV stays in TensorRT-LLM until the decode worker's ``generation_only`` request pulls it
        through its cache transceiver.
        """
        params = self.api.DisaggregatedParams(request_type="context_only")
        holder: list[Any] = []
        merged = EngineOutput([], prompt_tokens=len(request.token_ids))
        async for out in self._run(request, params, on_result=holder.append):
            merged.token_ids.extend(out.token_ids)
            merged.finish_reason = out.finish_reason
            merged.cached_tokens = out.cached_tokens
        result = holder[0] if holder else None
        returned = getattr(result, "disaggregated_params", None)
        if returned is None:
            raise errors.Internal("TensorRT-LLM returned no disaggregated params for a context-only request")
        return merged, disagg.encode_params(returned)

    async def decode(self, request: EngineRequest, opaque_params: bytes) -> AsyncGenerator[EngineOutput, None]:
        """Continue a prefilled request as ``generation_only`` from a prefill worker's opaque params.

        Like ``generate``, errors (opaque params that are not ours included) come from the first ``__anext__``.
        """
        params = disagg.decode_params(opaque_params, self.api.DisaggregatedParams)
        skip = disagg.first_tokens(opaque_params)
        async with contextlib.aclosing(self._run(request, params, skip=skip)) as outputs:
            async for out in outputs:
                yield out

    # ------------------------------------------------------------------ one request

    def _check(self, request: EngineRequest) -> None:
        check_token_ids(request.token_ids, self.vocab_size)
        request.sampling.validate(self.vocab_size)
        check_supported(request)
        check_prompt_fits(len(request.token_ids), self.context_length, self.num_blocks, self.block_size)
        if self._dead is not None or self._stopping:
            raise EngineDead(self._dead or "the trtllm engine is stopping")
        limit = self.config.max_num_seqs + self.config.max_waiting
        if len(self._active) >= limit:
            raise EngineOverloaded(f"waiting queue is full ({self.config.max_waiting} requests)")

    def _cached_tokens(self, token_ids: list[int]) -> int:
        """Prompt tokens in blocks its events say it holds: the prefix its radix tree will reuse."""
        n = 0
        for h in block_hash_list(token_ids[:-1], self.block_size):  # the last token is always computed
            if self._events.medium(h) is None:
                break
            n += self.block_size
        return n

    async def _run(
        self,
        request: EngineRequest,
        disaggregated: Any = None,
        *,
        skip: list[int] | None = None,
        on_result: Callable[[Any], None] | None = None,
    ) -> AsyncGenerator[EngineOutput, None]:
        self._check(request)
        cached = self._cached_tokens(request.token_ids)
        try:
            params = self.api.SamplingParams(**to_trtllm_kwargs(request, self._eos))
            result = self.llm.generate_async(
                list(request.token_ids), sampling_params=params, streaming=True, disaggregated_params=disaggregated
            )
        except ValueError as e:  # its own argument checks (pydantic's ValidationError is a ValueError)
            raise errors.InvalidArgument(f"TensorRT-LLM refused the request: {e}") from e
        self._active.add(result)
        prompt = len(request.token_ids)
        sent = 0
        done = False
        want_top = request.sampling.logprobs
        try:
            async for res in result:
                out = res.outputs[0]
                ids = list(out.token_ids)
                new, new_lp = ids[sent:], _logprobs(out, sent, len(ids), want_top)
                sent = len(ids)
                if skip:  # a generation-only stream that starts with the prefill's tokens: Prefill sent them
                    cut = 0
                    while skip and cut < len(new) and new[cut] == skip[0]:
                        cut, skip = cut + 1, skip[1:]
                    if cut < len(new):
                        skip = None  # it does not (or no longer) repeat them
                    new = new[cut:]
                    new_lp = new_lp[cut:] if new_lp is not None else None
                finish = _finish(out.finish_reason) if res.finished else None
                if new or finish is not None:
                    yield EngineOutput(new, finish, prompt, cached, new_lp)
                if res.finished:
                    done = True
                    if on_result is not None:
                        on_result(res)
                    return
            done = True
            yield EngineOutput([], "cancelled" if self._stopping else "stop", prompt, cached)
        except errors.DynamoError:
            raise
        except Exception as e:  # its RequestError is about this request; anything else means the executor failed
            if type(e).__name__ == "RequestError":
                raise errors.Internal(f"TensorRT-LLM failed the request: {e}") from e
            raise EngineDead(f"TensorRT-LLM failed: {type(e).__name__}: {e}") from e
        finally:
            self._active.discard(result)
            if not done:
                result.abort()  # the client went away: TensorRT-LLM frees the request's blocks


def _as_dict(item: Any) -> dict[str, Any]:
    """Its stats and events are dicts; some releases hand them over as JSON text."""
    return dict(json.loads(item)) if isinstance(item, str | bytes) else dict(item)


def _finish(reason: Any) -> str:
    key = str(reason) if reason is not None else "stop"
    if key == "timeout":  # its own per-request timeout (we set none, so a deployment's extra options did)
        raise errors.DeadlineExceeded("TensorRT-LLM timed the request out")
    if key not in _FINISH:
        raise errors.Internal(f"TensorRT-LLM finished the request with reason {reason!r}")
    return _FINISH[key]


def _logprobs(out: Any, start: int, end: int, want_top: int | None) -> list[TokenLogprob] | None:
    """Its per-token ``{token_id: Logprob(logprob, rank)}`` dicts as ours, trimmed to the top asked for."""
    if want_top is None:
        return None
    entries = list(getattr(out, "logprobs", None) or [])[start:end]
    ids = list(out.token_ids)[start:end]
    result: list[TokenLogprob] = []
    for tok, entry in zip(ids, entries, strict=False):
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank or 0)
        chosen = entry.get(tok)
        result.append(
            TokenLogprob(
                token_id=tok,
                logprob=float(chosen.logprob) if chosen is not None else float("nan"),
                top=[(int(t), float(lp.logprob)) for t, lp in ranked[:want_top]],
                rank=int(chosen.rank or 0) if chosen is not None else 0,
            )
        )
    return result
