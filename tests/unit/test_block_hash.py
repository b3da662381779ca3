"""Golden vectors and properties of the block hash every component routes by (DESIGN.md).

The literals were computed once from the specification (xxh3_64, seed 1337, u32 LE tokens,
chained over le64 pairs) and are checked in so that a change to hashing anywhere shows up here.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_grpc.tokens.block_hash import (
    BASE_SEED,
    block_hash_list,
    block_hashes,
    chain_hashes,
    local_block_hashes,
    seed_for,
)

GOLDEN = [
    # (tokens, block_size, lora, sequence hashes)
    (list(range(8)), 4, None, [9143094415614847814, 9510318385840434533]),
    (list(range(1000, 1010)), 4, "my-adapter", [1481518210536430242, 4085349414761489406]),
    ([0xFFFFFFFF] * 16 + [0] * 16, 16, None, [9046446989928805549, 14639714285430858573]),
    (
        (np.arange(64 * 3, dtype=np.int64) * 7919 % 50000).tolist(),
        64,
        None,
        [6003808864672963698, 7825810989858262624, 7992636989253461403],
    ),
]


@pytest.mark.parametrize(("tokens", "block_size", "lora", "want"), GOLDEN)
def test_golden_vectors(tokens: list[int], block_size: int, lora: str | None, want: list[int]) -> None:
    assert block_hash_list(tokens, block_size, lora) == want
    assert block_hash_list(np.array(tokens, dtype=np.int64), block_size, lora) == want
    assert block_hash_list(np.array(tokens, dtype=np.uint32), block_size, lora) == want
    assert block_hashes(tokens, block_size, lora).tolist() == want
    assert block_hashes(tokens, block_size, lora).dtype == np.uint64


def test_golden_local_hashes_and_seed() -> None:
    assert local_block_hashes(list(range(8)), 4).tolist() == [9143094415614847814, 12124091508212882195]
    assert seed_for(None) == seed_for("") == BASE_SEED == 1337
    assert seed_for("my-adapter") == 107349570576321665


def test_matches_the_written_specification() -> None:
    tokens = list(range(100, 112))
    local = [xxhash.xxh3_64_intdigest(struct.pack("<4I", *tokens[i : i + 4]), seed=1337) for i in (0, 4, 8)]
    seq = [local[0]]
    for loc in local[1:]:
        seq.append(xxhash.xxh3_64_intdigest(struct.pack("<QQ", seq[-1], loc), seed=1337))
    assert block_hash_list(tokens, 4) == seq
    assert chain_hashes(np.array(local, dtype=np.uint64)).tolist() == seq


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=80), st.integers(1, 9), st.integers(0, 20))
def test_prefix_stability_and_full_blocks_only(tokens: list[int], bs: int, extra: int) -> None:
    h = block_hash_list(tokens, bs)
    assert len(h) == len(tokens) // bs
    longer = block_hash_list([*tokens, *range(extra)], bs)
    assert longer[: len(h)] == h  # appending never changes earlier blocks
    # a chain continued from its parent equals the chain over the whole prompt
    if len(h) >= 2:
        local = local_block_hashes(tokens, bs)
        assert chain_hashes(local[1:], parent=h[0]).tolist() == h[1:]


def test_partial_block_is_not_hashed() -> None:
    assert block_hash_list(list(range(7)), 8) == []
    assert block_hash_list([], 8) == []
    assert block_hashes([], 8).dtype == np.uint64


def test_lora_changes_every_hash() -> None:
    tokens = list(range(64))
    base = block_hash_list(tokens, 16)
    a = block_hash_list(tokens, 16, "a")
    b = block_hash_list(tokens, 16, "b")
    assert not set(base) & set(a) and not set(a) & set(b)
    assert block_hash_list(tokens, 16, "") == base


def test_different_content_different_chain() -> None:
    assert block_hash_list([1, 2, 3, 4, 5, 6, 7, 8], 4)[1] != block_hash_list([9, 2, 3, 4, 5, 6, 7, 8], 4)[1]


@pytest.mark.parametrize("bad", [[-1, 2], [2**32, 0], np.array([-5, 1]), np.array([2**33])])
def test_out_of_range_tokens_rejected(bad: object) -> None:
    with pytest.raises(ValueError):
        block_hash_list(bad, 1)  # type: ignore[arg-type]


def test_bad_block_size() -> None:
    for fn in (block_hash_list, block_hashes, local_block_hashes):
        with pytest.raises(ValueError):
            fn([1, 2], 0)
