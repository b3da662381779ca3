"""The mocker's view of one request: tokens, progress, block hashes and stop rules."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from dynamo_grpc.engines.base import SamplingParams
from dynamo_grpc.tokens.block_hash import chain_hashes, local_block_hashes

from .block_pool import Block


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
    blocks: list[Block] = field(default_factory=list)
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
        done = len(self.tokens_hashes)
        full = len(self.all_tokens) // block_size
        if full <= done:
            return
        local = local_block_hashes(self.all_tokens[done * block_size : full * block_size], block_size, self.lora)
        parent = self.block_hashes[-1] if self.block_hashes else None
        seq = chain_hashes(local, self.lora, parent)
        self.tokens_hashes.extend(int(x) for x in local.tolist())
        self.block_hashes.extend(int(x) for x in seq.tolist())

    def append_token(self, token_id: int, eos_token_ids: frozenset[int]) -> str | None:
        """Record a sampled token; returns the finish reason if it ends the request."""
        self.all_tokens.append(token_id)
        n_out = self.num_output
        sp = self.sampling
        if n_out >= sp.min_tokens:
            if not sp.ignore_eos and token_id in eos_token_ids:
                return "stop"
            if token_id in sp.stop_token_ids:
                return "stop"
        if n_out >= sp.max_tokens or len(self.all_tokens) >= self.max_total_tokens:
            return "length"
        return None
