"""One request's state inside the engine core: tokens, progress, block table, hash chain, stop rules.

The scheduler and the KV manager share this object; executors never see it (they get the plain
plan of ``output.py``). ``request_id`` is internal and unique per engine: a client's id may repeat
(retries, migrations, two frontends) and must never fail or mix up a request.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from dynamo_grpc.engines.base import KvImport, SamplingParams
from dynamo_grpc.kvbm.tier import Medium
from dynamo_grpc.tokens.block_hash import chain_hashes, local_block_hashes

from .block_pool import KvBlock


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


def extend_block_hashes(
    tokens: Sequence[int], block_size: int, lora: str | None, block_hashes: list[int], tokens_hashes: list[int]
) -> None:
    """Hash newly full blocks of ``tokens`` in place, continuing the chain from the last known hash."""
    done = len(tokens_hashes)
    full = len(tokens) // block_size
    if full <= done:
        return
    local = local_block_hashes(tokens[done * block_size : full * block_size], block_size, lora)
    parent = block_hashes[-1] if block_hashes else None
    seq = chain_hashes(local, lora, parent)
    tokens_hashes.extend(int(x) for x in local.tolist())
    block_hashes.extend(int(x) for x in seq.tolist())


def stop_reason(
    sampling: SamplingParams,
    token_id: int,
    num_output: int,
    num_tokens: int,
    max_total_tokens: int,
    eos_token_ids: frozenset[int],
) -> str | None:
    """Finish reason once ``token_id`` became output token number ``num_output``, else None."""
    if num_output >= sampling.min_tokens:
        if not sampling.ignore_eos and token_id in eos_token_ids:
            return "stop"
        if token_id in sampling.stop_token_ids:
            return "stop"
    if num_output >= sampling.max_tokens or num_tokens >= max_total_tokens:
        return "length"
    return None


@dataclass(eq=False)
class Request:
    """Mutable per-request state.

    ``num_computed_tokens`` counts tokens whose KV is in the cache; the next step feeds
    ``all_token_ids[num_computed_tokens:]`` (a prefill chunk, or the last sampled token while
    decoding), and once every token is computed a new one is sampled. A preempted request starts
    again at 0 and recomputes (mostly from its own cached blocks).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: frozenset[int] = frozenset()
    lora: str | None = None
    #: longest prompt + output (context length, capped by the cache size)
    max_total_tokens: int = 1 << 62
    #: the id the client sent (for logs); not unique
    external_id: str = ""
    status: Status = Status.WAITING
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    #: prompt tokens served from the prefix cache at first admission; -1 until admitted
    num_cached_tokens: int = -1
    num_preemptions: int = 0
    finish_reason: str | None = None
    #: the block table; its first ``num_registered`` blocks are registered in the prefix cache
    blocks: list[KvBlock] = field(default_factory=list)
    num_registered: int = 0
    #: leading blocks of the table the executor already knows (the plan sends only the rest)
    num_sent_blocks: int = 0
    #: whether the executor has seen this request (the plan sends its prompt and sampling once)
    sent: bool = False
    #: sequence and tokens hashes of every full block of all_token_ids
    block_hashes: list[int] = field(default_factory=list)
    tokens_hashes: list[int] = field(default_factory=list)
    #: tier ("host"/"disk") of each block after the device prefix found below the device at the
    #: last lookup; onboarded on admission (kvbm)
    lower_hits: list[Medium] = field(default_factory=list)
    #: pin the prompt's blocks under a lease at the finish (prefill for a decode worker)
    hold_kv: bool = False
    #: output tokens generated elsewhere before this request started here
    prefilled: list[int] = field(default_factory=list)
    #: the prompt's KV pulled from a prefill worker; consumed at admission (dropped if it cannot be used)
    kv_import: KvImport | None = None
    #: when the scheduler first queued it (its clock; the lpm policy's age cap); -1 until then
    arrival_s: float = -1.0

    def __post_init__(self) -> None:
        self.all_token_ids = [*self.prompt_token_ids, *self.prefilled]

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids) :]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def update_block_hashes(self, block_size: int) -> None:
        """Hash newly full blocks (the chain continues from the last known hash)."""
        extend_block_hashes(self.all_token_ids, block_size, self.lora, self.block_hashes, self.tokens_hashes)

    def append_output(self, token_id: int) -> str | None:
        """Record a sampled token; returns the finish reason if it ends the request."""
        self.all_token_ids.append(token_id)
        return stop_reason(
            self.sampling,
            token_id,
            len(self.all_token_ids) - len(self.prompt_token_ids),
            len(self.all_token_ids),
            self.max_total_tokens,
            self.eos_token_ids,
        )
