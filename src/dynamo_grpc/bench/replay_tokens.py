"""Synthetic prompt token ids for a trace request.

Mooncake hash ids become 512 (the trace's block size) token ids each, derived only from the id and the
position inside the block, so two requests that share hash ids share exactly that token prefix and
therefore the same KV block hashes (``tokens.block_hash``) at any engine block size. A partial last
block is a prefix of the full block. Requests without prefix info get random ids seeded by their index,
so they share nothing. Ids lie in ``[low, vocab_size)``, skipping the special tokens at the bottom of
the vocabulary.
"""

from __future__ import annotations

import numpy as np

from dynamo_grpc.bench.replay_trace import TraceRequest

#: SmolLM2's vocabulary; the default model's.
DEFAULT_VOCAB_SIZE = 49152
#: ids below this are left alone (SmolLM2's special tokens are 0..16).
DEFAULT_LOW_ID = 32

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Vectorised splitmix64 finaliser: a cheap, well-mixed, deterministic u64 -> u64 map."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def hash_block_tokens(
    hash_ids: np.ndarray | list[int] | tuple[int, ...],
    block_size: int,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    low: int = DEFAULT_LOW_ID,
    salt: int = 0,
) -> np.ndarray:
    """Token ids of whole hash blocks, shape ``(len(hash_ids), block_size)``, dtype int32."""
    if not 0 <= low < vocab_size:
        raise ValueError("need 0 <= low < vocab_size")
    ids = np.asarray(hash_ids, dtype=np.uint64).reshape(-1, 1)
    pos = np.arange(block_size, dtype=np.uint64).reshape(1, -1)
    # Key = (salt, hash id, position); mixing the id first keeps neighbouring ids unrelated.
    key = _splitmix64(ids ^ np.uint64(salt & 0xFFFFFFFFFFFFFFFF)) + pos
    mixed = _splitmix64(key)
    span = np.uint64(vocab_size - low)
    return (mixed % span).astype(np.int64).astype(np.int32) + np.int32(low)


def prompt_tokens(
    req: TraceRequest,
    hash_block_size: int | None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    low: int = DEFAULT_LOW_ID,
    salt: int = 0,
) -> np.ndarray:
    """The ``input_length`` token ids (int32) the replay sends for ``req``."""
    if req.hash_ids is not None:
        if hash_block_size is None:
            raise ValueError("hash ids need a hash block size")
        blocks = hash_block_tokens(req.hash_ids, hash_block_size, vocab_size, low, salt)
        flat = blocks.reshape(-1)
        if flat.size < req.input_length:
            raise ValueError(f"request {req.index}: hash ids cover {flat.size} < {req.input_length} tokens")
        return flat[: req.input_length].copy()
    rng = np.random.default_rng([salt & 0xFFFFFFFF, req.index])
    return rng.integers(low, vocab_size, size=req.input_length, dtype=np.int32)
