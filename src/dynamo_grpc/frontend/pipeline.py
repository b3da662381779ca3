"""One generation request end to end: preprocess → route → worker Decode stream → detokenise.

`Pipeline.generate` yields `Chunk`s of final text. It owns the request's life: the context-length
check, the router's bookkeeping (PREFILL_DONE after the first token, FREE at the end, always), stop
strings (the worker stream is cancelled as soon as one is seen) and migration: when a worker dies
mid-stream the request is re-routed, excluding that worker, with the prompt plus the tokens generated
so far and max_tokens reduced by them, so the client sees every token exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from dynamo_grpc.frontend.errors import Code, FrontendError, WorkerLost
from dynamo_grpc.frontend.models import ModelRegistry, ServedModel
from dynamo_grpc.frontend.request import LlmRequest
from dynamo_grpc.frontend.routing import Router
from dynamo_grpc.tokens.chat_template import ChatTemplateError, render_chat
from dynamo_grpc.tokens.detok import IncrementalDetokenizer
from dynamo_grpc.v1 import common_pb2, worker_pb2

log = logging.getLogger(__name__)

_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CANCELLED: "cancelled",
    common_pb2.FINISH_REASON_ERROR: "error",
}


class DecodeClient(Protocol):
    def decode(
        self, address: str, request: worker_pb2.DecodeRequest, timeout: float | None = None
    ) -> AsyncGenerator[worker_pb2.DecodeResponse, None]: ...


@dataclass
class Chunk:
    """New text of a request; `finish_reason` is set on the last chunk."""

    text: str
    num_new_tokens: int
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    worker_id: str = ""
    #: logprobs of this chunk's new tokens (when the request asked for them)
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    #: sum of the sampled tokens' logprobs so far
    cumulative_logprob: float = 0.0


@dataclass
class Timings:
    """Where a request's time went, for ModelStatistics (nanoseconds)."""

    preprocess_ns: int = 0
    infer_ns: int = 0
    first_token_ns: int = 0
    migrations: int = 0


@dataclass
class Prepared:
    model: ServedModel
    prompt_text: str
    prompt_ids: list[int]
    max_tokens: int
    timings: Timings = field(default_factory=Timings)


_END = object()


async def coalesced(
    stream: AsyncGenerator[worker_pb2.DecodeResponse, None],
) -> AsyncGenerator[worker_pb2.DecodeResponse, None]:
    """The worker's responses, with those that arrived while we were busy merged into one.

    Under load this turns many one-token messages into fewer client responses (each costs a gRPC write),
    and at low load it changes nothing. Errors surface in order; closing this closes the worker stream.
    """
    q: asyncio.Queue[object] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for r in stream:
                q.put_nowait(r)
            q.put_nowait(_END)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # handed to the consumer, in order
            q.put_nowait(e)

    task = asyncio.get_running_loop().create_task(pump())
    try:
        while True:
            batch = [await q.get()]
            while not q.empty():
                batch.append(q.get_nowait())
            merged: worker_pb2.DecodeResponse | None = None
            for item in batch:
                if item is _END or isinstance(item, BaseException):
                    if merged is not None:
                        yield merged
                    if isinstance(item, BaseException):
                        raise item
                    return
                assert isinstance(item, worker_pb2.DecodeResponse)
                if merged is None:
                    merged = item
                else:
                    merged.token_ids.extend(item.token_ids)
                    merged.logprobs.extend(item.logprobs)
                    merged.finish_reason = item.finish_reason
                    if item.HasField("usage"):
                        merged.usage.CopyFrom(item.usage)
                if merged.finish_reason:
                    break
            assert merged is not None
            yield merged
            if merged.finish_reason:
                return
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await stream.aclose()


_ids = itertools.count()
_PID = os.getpid()


def new_request_id() -> str:
    return f"fe-{_PID}-{next(_ids)}"


class Pipeline:
    """Preprocessing, routing and streaming for every request of one frontend."""

    def __init__(
        self, registry: ModelRegistry, router: Router, workers: DecodeClient, migration_limit: int = 3
    ) -> None:
        self.registry = registry
        self.router = router
        self.workers = workers
        self.migration_limit = migration_limit

    def model(self, name: str) -> ServedModel:
        m = self.registry.get(name)
        if m is None:
            known = ", ".join(x.name for x in self.registry.models()) or "none"
            raise FrontendError(Code.NOT_FOUND, f"unknown model '{name}' (served: {known})")
        return m

    def prepare(self, model_name: str, req: LlmRequest) -> Prepared:
        """Tokenise (rendering chat messages first) and check the prompt fits the model's context."""
        t0 = time.perf_counter_ns()
        m = self.model(model_name)
        if req.token_ids is not None:
            text = ""
            ids = req.token_ids
            vocab = m.tokenizer.vocab_size
            bad = next((i for i in ids if i >= vocab), None)
            if bad is not None:
                raise FrontendError(
                    Code.INVALID_ARGUMENT, f"tensor 'input_ids': token id {bad} outside vocabulary of size {vocab}"
                )
        elif req.messages is not None:
            template = m.card.chat_template
            if not template:
                raise FrontendError(Code.INVALID_ARGUMENT, f"model '{m.name}' has no chat template")
            try:
                text = render_chat(template, req.messages, special_tokens=m.card.special_tokens_map())
            except ChatTemplateError as e:
                raise FrontendError(Code.INVALID_ARGUMENT, f"messages: {e}") from e
            ids = m.tokenizer.encode(text, add_special_tokens=False)
        else:
            text = req.prompt or ""
            ids = m.tokenizer.encode(text, add_special_tokens=True)
        if not ids:
            raise FrontendError(Code.INVALID_ARGUMENT, "tensor 'text_input': prompt has no tokens")
        ctx = m.card.context_length
        if len(ids) >= ctx:
            raise FrontendError(
                Code.RESOURCE_EXHAUSTED,
                f"prompt is {len(ids)} tokens; model '{m.name}' has a context length of {ctx}",
            )
        max_tokens = min(req.sampling.max_tokens, ctx - len(ids))
        p = Prepared(m, text, ids, max_tokens)
        p.timings.preprocess_ns = time.perf_counter_ns() - t0
        return p

    def _decode_request(
        self, rid: str, p: Prepared, req: LlmRequest, generated: Sequence[int]
    ) -> worker_pb2.DecodeRequest:
        s = req.sampling
        sampling = common_pb2.SamplingOptions(
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            repetition_penalty=s.repetition_penalty,
            frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty,
        )
        if s.seed is not None:
            sampling.seed = s.seed
        if s.logprobs is not None:
            sampling.logprobs = s.logprobs
        stop = common_pb2.StopConditions(
            max_tokens=p.max_tokens - len(generated),
            stop_token_ids=s.stop_token_ids,
            stop=req.stop,
            ignore_eos=s.ignore_eos,
            min_tokens=max(0, s.min_tokens - len(generated)),
        )
        return worker_pb2.DecodeRequest(
            request_id=rid,
            model=p.model.name,
            token_ids=[*p.prompt_ids, *generated],
            sampling=sampling,
            stop=stop,
            lora=req.lora,
        )

    async def generate(
        self, p: Prepared, req: LlmRequest, request_id: str | None = None, timeout: float | None = None
    ) -> AsyncGenerator[Chunk, None]:
        """Stream the request's text. Closing the iterator cancels the worker stream and frees the route."""
        # Client ids are not unique across clients; ours are (the client's is kept for logs and traces).
        rid = new_request_id() + (f":{request_id[:64]}" if request_id else "")
        m = p.model
        detok = IncrementalDetokenizer(
            m.tokenizer,
            p.prompt_ids,
            skip_special_tokens=req.skip_special_tokens,
            stop=req.stop,
            include_stop_str=req.include_stop_str_in_output,
        )
        generated: list[int] = []
        cumulative = 0.0
        exclude: set[str] = set()
        cached = 0
        attempt = 0
        t_start = time.perf_counter_ns()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if not m.workers and not exclude:
                raise FrontendError(Code.UNAVAILABLE, f"model '{m.name}' has no live worker")
            route_id = rid if attempt == 0 else f"{rid}.m{attempt}"
            try:
                pick = await self.router.route(
                    route_id,
                    m.name,
                    [*p.prompt_ids, *generated],
                    m.workers,
                    exclude,
                    p.max_tokens - len(generated),
                    req.lora,
                )
            except FrontendError as e:
                if attempt and e.code == Code.UNAVAILABLE:
                    raise FrontendError(Code.UNAVAILABLE, f"worker lost and no other worker left: {e.message}") from e
                raise
            finish: str | None = None
            first = True
            remaining = None if deadline is None else max(0.001, deadline - time.monotonic())
            stream = coalesced(
                self.workers.decode(pick.address, self._decode_request(route_id, p, req, generated), remaining)
            )
            try:
                async with contextlib.aclosing(stream):
                    async for resp in stream:
                        if first:
                            first = False
                            if attempt == 0:
                                p.timings.first_token_ns = time.perf_counter_ns() - t_start
                            self.router.prefill_done(route_id, len(resp.token_ids))
                        new = list(resp.token_ids)
                        overshoot = len(generated) + len(new) - p.max_tokens
                        if overshoot > 0:  # a worker that ignores max_tokens is cut here
                            new = new[: len(new) - overshoot]
                        generated.extend(new)
                        lps = list(resp.logprobs[: len(new)])
                        cumulative += sum(lp.logprob for lp in lps)
                        if resp.HasField("usage") and attempt == 0:
                            cached = max(cached, resp.usage.cached_tokens)
                        text = detok.add(new)
                        if detok.stopped:
                            finish = "stop"
                        elif resp.finish_reason:
                            finish = _FINISH.get(resp.finish_reason, "stop")
                            if finish == "error":
                                raise FrontendError(Code.INTERNAL, f"worker {pick.instance_id} failed the request")
                            if finish == "cancelled":
                                raise WorkerLost(f"worker {pick.instance_id} cancelled the request")
                            text += detok.flush()
                        elif overshoot > 0:
                            finish = "length"
                            text += detok.flush()
                        if finish is not None:
                            p.timings.infer_ns = time.perf_counter_ns() - t_start
                        if finish is not None or text or new:
                            yield Chunk(
                                text,
                                len(new),
                                finish,
                                len(p.prompt_ids),
                                len(generated),
                                cached,
                                pick.instance_id,
                                lps,
                                cumulative,
                            )
                        if finish is not None:
                            return
                raise WorkerLost(f"worker {pick.instance_id} ended the stream without a finish")
            except WorkerLost as e:
                attempt += 1
                p.timings.migrations = attempt
                if attempt > self.migration_limit:
                    raise FrontendError(
                        Code.UNAVAILABLE, f"{e} (migration limit {self.migration_limit} reached)"
                    ) from e
                log.warning("request %s: %s; migrating with %d tokens generated", rid, e, len(generated))
                exclude.add(pick.instance_id)
                if len(generated) >= p.max_tokens:
                    yield Chunk(
                        detok.flush(),
                        0,
                        "length",
                        len(p.prompt_ids),
                        len(generated),
                        cached,
                        pick.instance_id,
                        cumulative_logprob=cumulative,
                    )
                    return
            finally:
                self.router.free(route_id, len(generated))
