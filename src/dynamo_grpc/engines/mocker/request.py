"""The mocker's view of one request: tokens, progress, block hashes and stop rules."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from dynamo_grpc.engines.base import SamplingParams
from dynamo_grpc.engines.kvcache.block_pool import KvBlock
from dynamo_grpc.engines.kvcache.request import extend_block_hashes, stop_reason


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class MockRequest:
    """Mutable state shared by the scheduler and the KV manager.

    ``num_computed`` counts tokens whose KV is in the cache. Each step feeds
    ``all_tokens[num_computed:]`` (a prefill chunk, or the last sampled token while decoding),
    and once every token is computed a new one is sampled. A preempted request starts again at
    0 and recomputes (mostly from its own cached blocks).
    """

    request_id: str
    prompt: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    lora: str | None = None
    #: longest prompt + output (context length, capped by the cache size)
    max_total_tokens: int = 1 << 62
    status: Status = Status.WAITING
    all_tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    #: prompt tokens served from the prefix cache at first admission; -1 until admitted
    cached_tokens: int = -1
    num_preemptions: int = 0
    finish_reason: str | None = None
    blocks: list[KvBlock] = field(default_factory=list)
    #: leading blocks of ``blocks`` registered in the prefix cache
    num_registered: int = 0
    #: sequence and tokens hashes of every full block of all_tokens
    block_hashes: list[int] = field(default_factory=list)
    tokens_hashes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.all_tokens = list(self.prompt)

    @property
    def num_tokens(self) -> int:
        return len(self.all_tokens)

    @property
    def num_output(self) -> int:
        return len(self.all_tokens) - len(self.prompt)

    def hash_full_blocks(self, block_size: int) -> None:
        """Hash newly full blocks, continuing the chain from the last known hash."""
        extend_block_hashes(self.all_tokens, block_size, self.lora, self.block_hashes, self.tokens_hashes)

    def append_token(self, token_id: int, eos_token_ids: frozenset[int]) -> str | None:
        """Record a sampled token; returns the finish reason if it ends the request."""
        self.all_tokens.append(token_id)
        return stop_reason(
            self.sampling, token_id, self.num_output, len(self.all_tokens), self.max_total_tokens, eos_token_ids
        )
