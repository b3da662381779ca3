"""What crosses between the scheduler and an executor: plain data, never live scheduler objects.

Like vLLM v1's ``sched/output.py``: a request's prompt and sampling go to the executor once
(:class:`NewRequest`), then each step carries only what changed — the tokens to feed and the
block ids added to its table (the whole table again after a preemption, with ``reset_blocks``).
The executor answers with the tokens it sampled (:class:`ExecutorOutput`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dynamo_grpc.engines.base import SamplingParams, TokenLogprob


@dataclass(slots=True)
class NewRequest:
    """A request the executor has not seen: what sampling needs for its whole life."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: frozenset[int]
    lora: str | None = None
    #: output tokens generated elsewhere (a prefill worker's first token): sampling state continues after them
    output_token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class ScheduledChunk:
    """One request's work in a step: feed ``token_ids`` at positions ``start..``; maybe sample."""

    request_id: str
    #: tokens of this request already in the KV cache (the chunk's first position)
    start: int
    #: the tokens fed this step (a prefill chunk, or the last sampled token while decoding)
    token_ids: list[int]
    #: block ids appended to the request's table since the executor last saw it
    new_block_ids: list[int]
    #: the table starts over with ``new_block_ids`` (first schedule, or resumed after preemption)
    reset_blocks: bool
    #: the chunk reaches the end of the known tokens, so one token is sampled after it
    samples: bool

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) == 1 and self.start > 0


@dataclass
class SchedulerOutput:
    """One step's plan."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    new_requests: list[NewRequest] = field(default_factory=list)
    #: requests the executor can forget (finished or aborted since the last plan)
    finished_ids: list[str] = field(default_factory=list)
    #: requests preempted while scheduling this step (their blocks are gone; they recompute later)
    preempted_ids: list[str] = field(default_factory=list)
    num_prefill_tokens: int = 0
    num_decodes: int = 0
    #: fraction of KV blocks in use once this step's blocks are allocated
    kv_usage: float = 0.0

    @property
    def num_batched_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)


@dataclass
class ExecutorOutput:
    """What an executor did with a plan."""

    #: the token sampled for each chunk with ``samples`` set, by request id
    sampled: dict[str, int] = field(default_factory=dict)
    #: per request id, when its sampling asked for logprobs
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    #: how long the step takes in simulated time (the mocker); 0 for executors that really run
    step_seconds: float = 0.0
