"""The interface between a worker process and the engine it hosts.

Plain dataclasses cross this boundary; no protobuf, no grpc. The worker's servicers
translate protobuf to these types and back (STYLE.md), so every engine is testable
without a server.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dynamo_grpc import errors
from dynamo_grpc.events.kv import KvEventSink, KvStored, LoadMetrics

if TYPE_CHECKING:
    from dynamo_grpc.engines.core.kv_manager import KvReservation

# Engines raise the one error model's classes (errors.py imports grpc lazily, so engines stay grpc-free).
#: anything an engine reports about a request
EngineError = errors.DynamoError
#: the prompt can never fit the context or the KV cache (RESOURCE_EXHAUSTED "prompt_too_long")
PromptTooLong = errors.PromptTooLong
#: the bounded waiting queue is full (RESOURCE_EXHAUSTED "overloaded": the frontend re-routes once)
EngineOverloaded = errors.Overloaded


class EngineDead(errors.WorkerLost):
    """The engine itself failed (a crashed step, a stopped loop): not the client's fault.

    Like vLLM's EngineDeadError, distinct from a request-scoped failure: it reaches the client as
    UNAVAILABLE "worker_lost", so the frontend migrates the request to another worker.
    """


#: OpenAI's logit_bias range
LOGIT_BIAS_LIMIT = 100.0
#: OpenAI's frequency/presence penalty range
PENALTY_LIMIT = 2.0


@dataclass
class SamplingParams:
    """Per-request sampling, with vLLM's defaults and meanings. :meth:`validate` is the one range check."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # number of top logprobs to return per token; None: none
    #: token sequences never to generate: the last token of one is banned while the output ends with the rest
    bad_words: list[list[int]] = field(default_factory=list)
    #: when set, only these token ids may be sampled
    allowed_token_ids: list[int] | None = None
    #: added to a token's logit before sampling, in [-100, 100]
    logit_bias: dict[int, float] = field(default_factory=dict)

    def set_options(self) -> list[str]:
        """Names of the options that differ from their defaults (what an engine must honour or refuse)."""
        default = _DEFAULT_SAMPLING
        return [name for name in _OPTION_NAMES if getattr(self, name) != getattr(default, name)]

    def validate(self, vocab_size: int = 0) -> None:
        """Raise ``errors.InvalidArgument`` naming the first field out of range (ids checked when vocab_size > 0)."""

        def bad(name: str, rule: str, value: object) -> errors.InvalidArgument:
            return errors.InvalidArgument(f"{name} must be {rule}, got {value}")

        if self.max_tokens < 1:
            raise bad("max_tokens", ">= 1", self.max_tokens)
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise bad("min_tokens", f"in [0, max_tokens={self.max_tokens}]", self.min_tokens)
        if not self.temperature >= 0:  # also refuses NaN
            raise bad("temperature", ">= 0", self.temperature)
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "in (0, 1]", self.top_p)
        if self.top_k < -1:
            raise bad("top_k", ">= -1 (0 or -1 disable it)", self.top_k)
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "in [0, 1]", self.min_p)
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "> 0", self.repetition_penalty)
        for name in ("frequency_penalty", "presence_penalty"):
            if not -PENALTY_LIMIT <= getattr(self, name) <= PENALTY_LIMIT:
                raise bad(name, f"in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}]", getattr(self, name))
        if self.logprobs is not None and self.logprobs < 0:
            raise bad("logprobs", ">= 0", self.logprobs)
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise errors.InvalidArgument("allowed_token_ids must not be empty when given")
        if any(not w for w in self.bad_words):
            raise errors.InvalidArgument("bad_words must not contain an empty sequence")
        for token, bias in self.logit_bias.items():
            if not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
                raise bad(f"logit_bias[{token}]", f"in [-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]", bias)
        ids: list[tuple[str, list[int]]] = [
            ("stop_token_ids", self.stop_token_ids),
            ("allowed_token_ids", self.allowed_token_ids or []),
            ("logit_bias", list(self.logit_bias)),
            ("bad_words", [t for w in self.bad_words for t in w]),
        ]
        for name, values in ids:
            out = [t for t in values if t < 0 or (vocab_size > 0 and t >= vocab_size)]
            if out:
                raise errors.InvalidArgument(f"{name} {out} outside the vocabulary (size {vocab_size})")


_DEFAULT_SAMPLING = SamplingParams()
#: options an engine may be unable to honour (the rest every engine implements)
_OPTION_NAMES = ("logprobs", "bad_words", "allowed_token_ids", "logit_bias")


@dataclass
class KvImport:
    """KV blocks of the prompt computed elsewhere (a prefill worker), installed instead of recomputed.

    The bytes are already in the cache: the transfer wrote them into ``reservation``'s blocks (the
    blocks the request owns once the scheduler takes it; :meth:`KvManager.reserve`). They cover the
    prompt's blocks from ``start_block`` to the last (maybe partial) one; the blocks before it were
    cached here.
    """

    start_block: int
    num_tokens: int
    reservation: KvReservation | None = None


@dataclass
class EngineRequest:
    """A generation request in token space."""

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    lora: str | None = None
    #: keep the prompt's KV blocks pinned under a lease when the request finishes (a prefill worker)
    hold_kv: bool = False
    #: output tokens already generated elsewhere (the prefill worker's first token): generation continues after them
    prefilled: list[int] = field(default_factory=list)
    #: the prompt's KV, pulled from a prefill worker
    kv_import: KvImport | None = None


@dataclass
class LeaseInfo:
    """What a finished ``hold_kv`` request leaves: a lease on its prompt's blocks (see engines/core/leases.py)."""

    lease_id: str
    num_tokens: int
    block_hashes: list[int]
    expiry_unix_ms: int


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int = 0  # of the sampled token, 1 = most likely; 0 = not computed


@dataclass
class EngineOutput:
    """One step's new tokens for a request. ``finish_reason`` is set on the last one.

    finish_reason is one of "stop" (EOS or stop token), "length" (max_tokens or context),
    "cancelled", or None while generating.
    """

    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    logprobs: list[TokenLogprob] | None = None
    #: on the last output of a ``hold_kv`` request: the lease on its blocks
    lease: LeaseInfo | None = None


def check_token_ids(token_ids: Sequence[int], vocab_size: int) -> None:
    """Every engine's first check: a non-empty prompt of ids inside the vocabulary."""
    if not token_ids:
        raise errors.InvalidArgument("token_ids is empty")
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise errors.InvalidArgument(f"token id {bad} is outside the vocabulary (size {vocab_size})")


def check_prompt_fits(n: int, context_length: int, num_blocks: int, block_size: int) -> None:
    """A prompt of ``n`` tokens that can never run here (context or whole KV cache too small): PromptTooLong."""
    if n >= context_length:
        raise PromptTooLong(
            f"prompt has {n} tokens; the context length is {context_length} "
            "(prompt + at least 1 generated token must fit)"
        )
    cache_tokens = num_blocks * block_size
    if n + 1 > cache_tokens:
        raise PromptTooLong(
            f"prompt has {n} tokens; the KV cache holds {cache_tokens} ({num_blocks} blocks of {block_size})"
        )


class Engine(abc.ABC):
    """An LLM engine: continuous batching over a paged KV cache with prefix caching."""

    #: tokens per KV block (part of the model card)
    block_size: int
    #: KV blocks in the cache
    num_blocks: int
    #: longest prompt + output the engine accepts
    context_length: int

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the engine loop (call once, from the asyncio loop that will call generate)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop the loop; in-flight generate() iterators end with finish_reason "cancelled"."""

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Stream outputs for ``request`` (an async generator: creating it never raises).

        Errors are ``errors.py`` classes raised from inside it, at the first ``__anext__``
        (InvalidArgument, UnsupportedOption, PromptTooLong, Overloaded, FailedPrecondition) or
        later (EngineDead when the engine itself fails). Closing the iterator (or cancelling the
        task consuming it) aborts the request and frees its KV blocks.
        """

    @abc.abstractmethod
    def set_event_sink(self, sink: KvEventSink | None) -> None:
        """Where KV events go; called from the engine loop's thread in batches."""

    @abc.abstractmethod
    def load_metrics(self) -> LoadMetrics:
        """Current load."""

    @abc.abstractmethod
    def cached_blocks(self) -> list[KvStored]:
        """Every block the prefix cache holds now, as Stored events in chain order.

        Used for KvEvents.Replay when a subscriber's sequence is older than the ring
        buffer: a full dump of what this worker holds.
        """
