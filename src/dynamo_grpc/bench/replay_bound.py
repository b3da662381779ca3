"""The trace's infinite-cache prefix hit bound: what a router could reuse with unbounded KV memory.

A block reference is a hit when the same block (and, since Mooncake hash ids are prefix hashes, the
same whole prefix) appeared in an earlier request. Two granularities:

* at the trace's own block size (512): the figure the trace README and Dynamo's recipe quote
  (36.64 % block-weighted for the FAST'25 conversation trace);
* at the engine's block size (64 by default), token-weighted over whole prompts: the fair ceiling for
  ``sum(cached_tokens) / sum(prompt_tokens)`` measured by the replay. Engines only cache full blocks,
  so a partial tail never counts.

An engine block ending at token ``e`` is identified by the hash id covering token ``e - 1`` and that
token's offset inside its hash block; equal identity means equal token prefix (see replay_tokens).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from dynamo_grpc.bench.replay_trace import Trace
from dynamo_grpc.tokens.block_hash import block_hash_list


@dataclass(frozen=True, slots=True)
class CacheBound:
    """Infinite-cache hit ratios of a trace (fractions in [0, 1])."""

    requests: int
    block_refs: int  # hash-block references (trace block size)
    unique_blocks: int
    block_weighted: float  # hit refs / refs, trace block size
    token_weighted: float  # hit tokens / prompt tokens, trace block size (a partial block counts its tokens)
    engine_block_size: int
    engine_token_weighted: float  # hit tokens / prompt tokens counting only full engine blocks

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def infinite_cache_bound(trace: Trace, engine_block_size: int = 64) -> CacheBound:
    """Compute both bounds in one pass over the trace in arrival order."""
    if engine_block_size <= 0:
        raise ValueError("engine_block_size must be positive")
    bs = trace.hash_block_size
    total_tokens = sum(r.input_length for r in trace.requests)
    if bs is None or any(r.hash_ids is None for r in trace.requests):
        # No prefix information: random prompts share nothing.
        return CacheBound(len(trace.requests), 0, 0, 0.0, 0.0, engine_block_size, 0.0)
    seen: set[int] = set()
    refs = hits = hit_tokens = 0
    seen_engine: set[tuple[int, int]] = set()
    engine_hit_tokens = 0
    for r in trace.requests:
        assert r.hash_ids is not None
        for j, h in enumerate(r.hash_ids):
            refs += 1
            if h in seen:
                hits += 1
                hit_tokens += min(bs, r.input_length - j * bs)
        seen.update(r.hash_ids)
        n_full = r.input_length // engine_block_size
        if n_full:
            ends = np.arange(1, n_full + 1, dtype=np.int64) * engine_block_size - 1
            hid = np.asarray(r.hash_ids, dtype=np.int64)[ends // bs]
            keys = list(zip(hid.tolist(), (ends % bs).tolist(), strict=True))
            engine_hit_tokens += engine_block_size * sum(1 for k in keys if k in seen_engine)
            seen_engine.update(keys)
    return CacheBound(
        requests=len(trace.requests),
        block_refs=refs,
        unique_blocks=len(seen),
        block_weighted=hits / refs if refs else 0.0,
        token_weighted=hit_tokens / total_tokens if total_tokens else 0.0,
        engine_block_size=engine_block_size,
        engine_token_weighted=engine_hit_tokens / total_tokens if total_tokens else 0.0,
    )


def bound_from_prompts(prompts: Iterable[np.ndarray], block_size: int) -> float:
    """The same engine-level bound computed from real token ids through the real block hashing.

    Slow (hashes every block) but independent of the hash-id arithmetic above; tests check they agree.
    """
    seen: set[int] = set()
    total = hit = 0
    for toks in prompts:
        total += len(toks)
        hashes = block_hash_list(toks, block_size)
        hit += block_size * sum(1 for h in hashes if h in seen)
        seen.update(hashes)
    return hit / total if total else 0.0
