"""The interface between a worker process and the engine it hosts.

Plain dataclasses cross this boundary; no protobuf, no grpc. The worker's servicers
translate protobuf to these types and back (STYLE.md), so every engine is testable
without a server.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from dynamo_grpc import errors
from dynamo_grpc.events.kv import KvEventSink, KvStored, LoadMetrics

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


@dataclass
class SamplingParams:
    """Per-request sampling, with vLLM's defaults and meanings."""

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


@dataclass
class EngineRequest:
    """A generation request in token space."""

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    lora: str | None = None


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
        """Stream outputs for ``request``.

        Raises PromptTooLong / EngineOverloaded before the first output. Closing the
        iterator (or cancelling the task consuming it) aborts the request and frees its
        KV blocks.
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
