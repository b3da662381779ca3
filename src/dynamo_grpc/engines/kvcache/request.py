"""Per-request pieces both engines share: the block-hash chain and the stop rules.

The engines keep their own request dataclasses (the torch one carries output ids and EOS ids, the
mocker's its block table); these functions are the logic that must agree between them, since the
hashes are the routing key (DESIGN.md) and the stop rules decide what a client sees.
"""

from __future__ import annotations

from collections.abc import Sequence

from dynamo_grpc.engines.base import SamplingParams
from dynamo_grpc.tokens.block_hash import chain_hashes, local_block_hashes


def extend_block_hashes(
    tokens: Sequence[int],
    block_size: int,
    lora: str | None,
    block_hashes: list[int],
    tokens_hashes: list[int],
) -> None:
    """Hash newly full blocks of ``tokens`` in place, continuing the chain from the last known hash."""
    if block_size <= 0:
        return
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
