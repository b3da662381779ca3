"""One generation request end to end: prepare (template, tokenise, check) → route session → token stream.

`Pipeline.prepare` turns an `LlmRequest` into token space once (prompt ids, bad words, the worker's
sampling options) and checks it against the model (context length, vocabulary). `Pipeline.generate`
yields `Chunk`s of final text: the route session places the request on workers (and moves it when one
is lost), the token stream turns tokens into text; closing the iterator cancels the worker stream and
frees the route.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from dynamo_grpc import errors
from dynamo_grpc.frontend.admission import Admission
from dynamo_grpc.frontend.disagg import DisaggPlanner
from dynamo_grpc.frontend.limits import OFFLOAD_TOKENISE_BYTES, Limits
from dynamo_grpc.frontend.models import ModelRegistry, ServedModel
from dynamo_grpc.frontend.request import LlmRequest
from dynamo_grpc.frontend.routing import Router
from dynamo_grpc.frontend.session import DecodeClient, RouteSession
from dynamo_grpc.frontend.token_stream import Chunk, TokenStream
from dynamo_grpc.observability.spans import span
from dynamo_grpc.tokens.chat_template import ChatTemplateError, render_chat
from dynamo_grpc.tokens.tokenizer import Tokenizer
from dynamo_grpc.v1 import common_pb2

__all__ = ["Chunk", "Pipeline", "Prepared", "Timings", "new_request_id"]


@dataclass
class Timings:
    """Where a request's time went, for ModelStatistics (nanoseconds)."""

    preprocess_ns: int = 0
    infer_ns: int = 0
    first_token_ns: int = 0
    migrations: int = 0
    # for the Prometheus metrics (frontend/metrics.py): perf_counter_ns() instants and token counts
    arrival_ns: int = 0
    routed_at_ns: int = 0
    first_token_at_ns: int = 0
    last_token_at_ns: int = 0
    #: (seconds per token, tokens) for each response after the first: the inter-token latencies
    token_gaps: list[tuple[float, int]] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    status: str = ""  # success / error once recorded (the OpenAI app's metrics)


@dataclass
class Prepared:
    """A request in token space, checked against its model; what every placement sends to a worker."""

    model: ServedModel
    prompt_text: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: common_pb2.SamplingOptions = field(default_factory=common_pb2.SamplingOptions)
    stop: common_pb2.StopConditions = field(default_factory=common_pb2.StopConditions)
    timings: Timings = field(default_factory=Timings)


def new_request_id() -> str:
    """Unguessable and unique: a client cannot predict (or collide with) another request's worker-side key.
    (128 random bits as 32 hex digits, as uuid4().hex without building a UUID: a fifth of its cost.)"""
    return secrets.token_hex(16)


#: what one chat turn adds to a prompt besides its content (role and template markup), for the byte limit
MESSAGE_OVERHEAD_BYTES = 16


def input_bytes(req: LlmRequest) -> int:
    """The prompt's size before tokenising: text, or the messages' string contents."""
    if req.prompt is not None:
        return len(req.prompt)  # characters: a cheap bound (UTF-8 bytes are counted only near the limit)
    if req.messages is not None:  # + a turn's markup, so that many empty turns count too
        return sum(len(str(m.get("content") or "")) + MESSAGE_OVERHEAD_BYTES for m in req.messages)
    return 0


def _check_ids(where: str, ids: list[int], vocab: int) -> None:
    bad = next((i for i in ids if i >= vocab), None)
    if bad is not None:
        raise errors.InvalidArgument(f"{where}: token id {bad} outside vocabulary of size {vocab}")


def bad_word_ids(tokenizer: Tokenizer, words: list[str]) -> list[list[int]]:
    """Each bad word's token ids, alone and after a space (as vLLM does: a word mid-sentence has one)."""
    seqs: list[list[int]] = []
    for w in words:
        for variant in (w, " " + w.lstrip()) if not w.startswith(" ") else (w,):
            ids = tokenizer.encode(variant, add_special_tokens=False)
            if ids and ids not in seqs:
                seqs.append(ids)
    return seqs


def sampling_options(req: LlmRequest, tokenizer: Tokenizer) -> common_pb2.SamplingOptions:
    """The worker's sampling options; the frontend-only options (stop strings, detokenising) stay here."""
    s = req.sampling
    out = common_pb2.SamplingOptions(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        repetition_penalty=s.repetition_penalty,
        frequency_penalty=s.frequency_penalty,
        presence_penalty=s.presence_penalty,
    )
    if s.seed is not None:
        out.seed = s.seed
    if s.logprobs is not None:
        out.logprobs = s.logprobs
    if req.allowed_token_ids:
        _check_ids("allowed_token_ids", req.allowed_token_ids, tokenizer.vocab_size)
        out.allowed_token_ids.extend(req.allowed_token_ids)
    if req.logit_bias:
        _check_ids("logit_bias", list(req.logit_bias), tokenizer.vocab_size)
        out.logit_bias.update(req.logit_bias)
    if req.bad_words:
        for ids in bad_word_ids(tokenizer, req.bad_words):
            out.bad_words.add(token_ids=ids)
    return out


class Pipeline:
    """Preprocessing, routing and streaming for every request of one frontend."""

    def __init__(
        self,
        registry: ModelRegistry,
        router: Router,
        workers: DecodeClient,
        migration_limit: int = 3,
        limits: Limits | None = None,
        disagg: DisaggPlanner | None = None,
    ) -> None:
        self.registry = registry
        #: conditional disaggregation (frontend/disagg.py); None: every request is aggregated
        self.disagg = disagg
        self.router = router
        self.workers = workers
        self.migration_limit = migration_limit
        self.limits = limits or Limits()
        self.admission = Admission(self.limits.max_inflight_requests, self.limits.max_queued_requests)

    def check_input_size(self, req: LlmRequest) -> int:
        """Refuse a prompt above --max-input-bytes before any tokenising; returns its size."""
        n = input_bytes(req)
        limit = self.limits.max_input_bytes
        if n > limit // 4:  # characters -> UTF-8 bytes (at most 4 each) only when it could matter
            n = len(req.prompt.encode("utf-8", "surrogatepass")) if req.prompt is not None else n
            if n > limit:
                raise errors.PromptTooLong(
                    f"prompt is {n} bytes; this server accepts at most {limit} (--max-input-bytes)"
                )
        return n

    async def prepare_async(self, model_name: str, req: LlmRequest) -> Prepared:
        """`prepare`, with a big prompt tokenised in a thread so other requests keep being served meanwhile."""
        if self.check_input_size(req) > OFFLOAD_TOKENISE_BYTES:
            return await asyncio.to_thread(self.prepare, model_name, req)
        return self.prepare(model_name, req)

    def model(self, name: str) -> ServedModel:
        m = self.registry.get(name)
        if m is None:
            known = ", ".join(x.name for x in self.registry.models()) or "none"
            raise errors.ModelNotFound(f"unknown model '{name}' (served: {known})")
        return m

    def prepare(self, model_name: str, req: LlmRequest) -> Prepared:
        """Tokenise (rendering chat messages first) and check the prompt and options against the model."""
        t0 = time.perf_counter_ns()
        with span("preprocess", model=model_name):
            p = self._prepare(model_name, req)
        p.timings.arrival_ns = t0
        p.timings.prompt_tokens = len(p.prompt_ids)
        p.timings.preprocess_ns = time.perf_counter_ns() - t0
        return p

    def _prepare(self, model_name: str, req: LlmRequest) -> Prepared:
        m = self.model(model_name)
        self.check_input_size(req)
        if req.token_ids is not None:
            text = ""
            ids = req.token_ids
            _check_ids("tensor 'input_ids'", ids, m.tokenizer.vocab_size)
        elif req.messages is not None:
            template = m.card.chat_template
            if not template:
                raise errors.InvalidArgument(f"model '{m.name}' has no chat template")
            try:
                text = render_chat(
                    template,
                    req.messages,
                    add_generation_prompt=req.add_generation_prompt,
                    special_tokens=m.card.special_tokens_map(),
                )
            except ChatTemplateError as e:
                raise errors.InvalidArgument(f"messages: {e}") from e
            ids = m.tokenizer.encode(text, add_special_tokens=False)
        else:
            text = req.prompt or ""
            ids = m.tokenizer.encode(text, add_special_tokens=True)
        if not ids:
            raise errors.InvalidArgument("tensor 'text_input': prompt has no tokens")
        ctx = m.card.context_length
        if len(ids) >= ctx:
            raise errors.PromptTooLong(f"prompt is {len(ids)} tokens; model '{m.name}' has a context length of {ctx}")
        most = self.limits.max_prompt_tokens
        if most and len(ids) > most:
            raise errors.PromptTooLong(
                f"prompt is {len(ids)} tokens; this server accepts at most {most} (--max-prompt-tokens)"
            )
        s = req.sampling
        max_tokens = min(s.max_tokens, ctx - len(ids))
        stop = common_pb2.StopConditions(
            max_tokens=max_tokens,
            stop_token_ids=s.stop_token_ids,
            stop=req.stop,
            ignore_eos=s.ignore_eos,
            min_tokens=s.min_tokens,
        )
        return Prepared(m, text, ids, max_tokens, sampling_options(req, m.tokenizer), stop)

    async def generate(
        self, p: Prepared, req: LlmRequest, request_id: str | None = None, timeout: float | None = None
    ) -> AsyncGenerator[Chunk, None]:
        """Stream the request's text. `timeout` (seconds) is the earlier of the RPC's and the request's own."""
        # Client ids are not unique across clients; ours are (the client's is kept for logs and traces, and
        # echoed back unchanged by the protocol layer).
        rid = new_request_id() + (f":{request_id[:64]}" if request_id else "")
        if req.timeout_s is not None:
            timeout = req.timeout_s if timeout is None else min(timeout, req.timeout_s)
        deadline = None if timeout is None else time.monotonic() + timeout
        t_start = time.perf_counter_ns()
        stream = TokenStream(req, p.prompt_ids, p.max_tokens, p.model.tokenizer)
        session = RouteSession(
            self.router, self.workers, p, req.lora, rid, self.migration_limit, deadline, self.disagg
        )
        responses = session.responses(stream.generated)
        async with contextlib.aclosing(responses):
            async for resp in responses:
                chunk = stream.add(resp, session.worker_id, session.migrations == 0)
                if chunk is not None:
                    chunk.prefill_worker_id = session.prefill_worker_id
                    if stream.finish is not None:
                        p.timings.infer_ns = stream.finished_at_ns - t_start
                        chunk.route_pool, chunk.route_reason = session.route_pool, session.route_reason
                    yield chunk
                if stream.finish is not None:
                    return
        chunk = stream.out_of_tokens(session.worker_id)
        chunk.route_pool, chunk.route_reason = session.route_pool, session.route_reason
        chunk.prefill_worker_id = session.prefill_worker_id
        p.timings.infer_ns = stream.finished_at_ns - t_start
        yield chunk
