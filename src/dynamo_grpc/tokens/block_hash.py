"""The KV block hash every component agrees on (DESIGN.md, "KV blocks and routing").

Token ids are laid out as u32 little-endian; only full blocks are hashed.
``local[i] = xxh3_64(block_i_bytes, seed)`` and the sequence hash chains them:
``seq[0] = local[0]``, ``seq[i] = xxh3_64(le64(seq[i-1]) || le64(local[i]), seed)``.
The seed is Dynamo's 1337, or, for a LoRA adapter, ``xxh3_64(name, seed=1337)`` so
that an adapter's blocks never collide with the base model's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash

BASE_SEED = 1337

_U64 = np.dtype("<u8")


def seed_for(lora: str | None = None) -> int:
    """The hash seed for the base model (``None`` or ``""``) or a LoRA adapter."""
    if not lora:
        return BASE_SEED
    return xxhash.xxh3_64_intdigest(lora.encode("utf-8"), seed=BASE_SEED)


def _token_bytes(token_ids: Sequence[int] | np.ndarray) -> bytes:
    arr = np.asarray(token_ids)
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise ValueError("token ids must fit in u32")
    return arr.astype("<u4", copy=False).tobytes()


def local_block_hashes(
    token_ids: Sequence[int] | np.ndarray, block_size: int, lora: str | None = None
) -> np.ndarray:
    """Per-block content hashes (``tokens_hash``) of the full blocks of ``token_ids``."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    n_full = len(token_ids) // block_size
    out = np.empty(n_full, dtype=np.uint64)
    if n_full == 0:
        return out
    seed = seed_for(lora)
    raw = memoryview(_token_bytes(token_ids[: n_full * block_size]))
    step = block_size * 4
    h = xxhash.xxh3_64_intdigest
    for i in range(n_full):
        out[i] = h(raw[i * step : (i + 1) * step], seed=seed)
    return out


def chain_hashes(local: np.ndarray, lora: str | None = None, parent: int | None = None) -> np.ndarray:
    """Sequence hashes from local hashes; ``parent`` continues an existing chain."""
    out = np.empty(len(local), dtype=np.uint64)
    if len(local) == 0:
        return out
    seed = seed_for(lora)
    h = xxhash.xxh3_64_intdigest
    pair = np.empty(2, dtype=_U64)
    prev = parent
    for i, loc in enumerate(local.tolist()):
        if prev is None:
            cur = int(loc)
        else:
            pair[0] = prev
            pair[1] = loc
            cur = h(pair.tobytes(), seed=seed)
        out[i] = cur
        prev = cur
    return out


def block_hashes(
    token_ids: Sequence[int] | np.ndarray, block_size: int, lora: str | None = None
) -> np.ndarray:
    """Sequence hashes (the routing key) of every full block of ``token_ids``."""
    return chain_hashes(local_block_hashes(token_ids, block_size, lora), lora)


def block_hash_list(token_ids: Sequence[int] | np.ndarray, block_size: int, lora: str | None = None) -> list[int]:
    """Like :func:`block_hashes` but as Python ints (handy for dict keys and protobuf)."""
    return [int(x) for x in block_hashes(token_ids, block_size, lora).tolist()]
