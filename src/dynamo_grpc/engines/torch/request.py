"""The engine's view of one request: its tokens, progress, block hashes and stop rules."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from dynamo_grpc.engines.base import SamplingParams
from dynamo_grpc.engines.kvcache.request import extend_block_hashes, stop_reason


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """Mutable per-request state shared by the scheduler, KV manager and sampler.

    ``num_computed_tokens`` counts tokens whose K/V are in the cache; the next step
    feeds ``all_token_ids[num_computed_tokens:]`` (a prefill chunk, or the last
    sampled token while decoding).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: frozenset[int] = frozenset()
    lora: str | None = None
    max_total_tokens: int = 1 << 62
    status: Status = Status.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    #: prompt tokens served from the prefix cache on first admission
    num_cached_tokens: int = -1
    num_preemptions: int = 0
    finish_reason: str | None = None
    #: sequence and tokens hashes of every full block of all_token_ids
    block_hashes: list[int] = field(default_factory=list)
    tokens_hashes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)
        self.update_block_hashes(block_size=0)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def update_block_hashes(self, block_size: int) -> None:
        """Hash any newly full blocks (the chain continues from the last known hash)."""
        extend_block_hashes(self.all_token_ids, block_size, self.lora, self.block_hashes, self.tokens_hashes)

    def append_output(self, token_id: int) -> str | None:
        """Record a sampled token; returns the finish reason if it ends the request."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        return stop_reason(
            self.sampling,
            token_id,
            len(self.output_token_ids),
            len(self.all_token_ids),
            self.max_total_tokens,
            self.eos_token_ids,
        )
