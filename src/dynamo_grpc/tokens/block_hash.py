"""The KV block hash every component agrees on (DESIGN.md, "KV blocks and routing").

Token ids are laid out as u32 little-endian; only full blocks are hashed.
``local[i] = xxh3_64(block_i_bytes, seed)`` and the sequence hash chains them:
``seq[0] = local[0]``, ``seq[i] = xxh3_64(le64(seq[i-1]) || le64(local[i]), seed)``.
The seed is Dynamo's 1337, or, for a LoRA adapter, ``xxh3_64(name, seed=1337)`` so
that an adapter's blocks never collide with the base model's.
"""

from __future__ import annotations

import array
import struct
import sys
from collections.abc import Sequence

import numpy as np
import xxhash

BASE_SEED = 1337

_PAIR = struct.Struct("<QQ")  # le64(prev) || le64(local)


def seed_for(lora: str | None = None) -> int:
    """The hash seed for the base model (``None`` or ``""``) or a LoRA adapter."""
    if not lora:
        return BASE_SEED
    return xxhash.xxh3_64_intdigest(lora.encode("utf-8"), seed=BASE_SEED)


def _token_bytes(token_ids: Sequence[int] | np.ndarray) -> bytes:
    """Token ids as u32 little-endian bytes; ValueError when one does not fit in u32.

    Lists go through ``array('I')`` (C-speed conversion and range check), which is ~4x
    faster than building a numpy array from a list of Python ints.
    """
    if isinstance(token_ids, np.ndarray):
        arr = token_ids
        if arr.dtype != np.uint32 and arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
            raise ValueError("token ids must fit in u32")
        return arr.astype("<u4", copy=False).tobytes()
    try:
        packed = array.array("I", token_ids)
    except OverflowError as exc:
        raise ValueError("token ids must fit in u32") from exc
    except TypeError:
        return _token_bytes(np.asarray(token_ids))
    if packed.itemsize != 4:  # pragma: no cover - exotic ABI
        return _token_bytes(np.asarray(token_ids))
    if sys.byteorder != "little":  # pragma: no cover
        packed.byteswap()
    return packed.tobytes()


def _local_list(token_ids: Sequence[int] | np.ndarray, block_size: int, seed: int) -> list[int]:
    n_full = len(token_ids) // block_size
    if n_full == 0:
        return []
    raw = _token_bytes(token_ids[: n_full * block_size])
    step = block_size * 4
    h = xxhash.xxh3_64_intdigest
    return [h(raw[i : i + step], seed=seed) for i in range(0, n_full * step, step)]


def _chain_list(local: list[int], seed: int, parent: int | None) -> list[int]:
    out = [0] * len(local)
    h = xxhash.xxh3_64_intdigest
    pack = _PAIR.pack
    prev = parent
    for i, loc in enumerate(local):
        prev = loc if prev is None else h(pack(prev, loc), seed=seed)
        out[i] = prev
    return out


def local_block_hashes(token_ids: Sequence[int] | np.ndarray, block_size: int, lora: str | None = None) -> np.ndarray:
    """Per-block content hashes (``tokens_hash``) of the full blocks of ``token_ids``."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    return np.array(_local_list(token_ids, block_size, seed_for(lora)), dtype=np.uint64)


def chain_hashes(local: np.ndarray, lora: str | None = None, parent: int | None = None) -> np.ndarray:
    """Sequence hashes from local hashes; ``parent`` continues an existing chain."""
    return np.array(_chain_list([int(x) for x in np.asarray(local).tolist()], seed_for(lora), parent), dtype=np.uint64)


def block_hashes(token_ids: Sequence[int] | np.ndarray, block_size: int, lora: str | None = None) -> np.ndarray:
    """Sequence hashes (the routing key) of every full block of ``token_ids``."""
    return np.array(block_hash_list(token_ids, block_size, lora), dtype=np.uint64)


def block_hash_list(token_ids: Sequence[int] | np.ndarray, block_size: int, lora: str | None = None) -> list[int]:
    """Like :func:`block_hashes` but as Python ints (handy for dict keys and protobuf)."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    seed = seed_for(lora)
    return _chain_list(_local_list(token_ids, block_size, seed), seed, None)
