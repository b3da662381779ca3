"""Mocker block pool and KV manager: LRU eviction order, events with hashes and parents, dumps."""

from __future__ import annotations

import pytest

from dynamo_grpc.engines.base import KvCleared, KvRemoved, KvStored, SamplingParams, StoredBlock
from dynamo_grpc.engines.mocker.block_pool import BlockPool, NoFreeBlocks
from dynamo_grpc.engines.mocker.kv_manager import KvManager
from dynamo_grpc.engines.mocker.request import MockRequest
from dynamo_grpc.tokens.block_hash import block_hash_list, local_block_hashes

BS = 4


def _req(rid: str, tokens: list[int]) -> MockRequest:
    return MockRequest(rid, list(tokens), SamplingParams(max_tokens=8))


def _admit(kv: KvManager, req: MockRequest) -> int:
    """Admit a whole prompt, mark it computed and register its full blocks; returns hit tokens."""
    prefix = kv.find_prefix(req)
    hit = len(prefix) * BS
    assert kv.allocate(req, req.num_tokens - hit, prefix)
    req.num_computed = req.num_tokens
    kv.register_full_blocks(req)
    return hit


def test_free_blocks_are_evicted_least_recently_freed_first_tail_first() -> None:
    kv = KvManager(num_blocks=6, block_size=BS)
    a = _req("a", list(range(8)))  # 2 full blocks
    b = _req("b", list(range(100, 108)))
    _admit(kv, a)
    _admit(kv, b)
    kv.take_events()
    kv.free(a)  # a freed first: its blocks are evicted first, tail (block 1) before head (block 0)
    kv.free(b)
    a_hashes = block_hash_list(a.all_tokens, BS)
    b_hashes = block_hash_list(b.all_tokens, BS)
    order = [kv.pool.blocks[i].block_hash for i in kv.pool.eviction_order() if kv.pool.blocks[i].block_hash]
    assert order == [a_hashes[1], a_hashes[0], b_hashes[1], b_hashes[0]]

    c = _req("c", list(range(200, 216)))  # needs 4 blocks: 2 never-used, then a's tail and head
    _admit(kv, c)
    events = kv.take_events()
    removed = [h for e in events if isinstance(e, KvRemoved) for h in e.block_hashes]
    assert removed == [a_hashes[1], a_hashes[0]]
    assert kv.pool.lookup(b_hashes[0]) is not None and kv.pool.lookup(a_hashes[0]) is None


def test_stored_events_carry_the_shared_block_hash_and_chain_parents() -> None:
    kv = KvManager(num_blocks=8, block_size=BS)
    tokens = list(range(10))  # 2 full blocks + 2 tokens
    req = _req("r", tokens)
    _admit(kv, req)
    (ev,) = kv.take_events()
    seq = block_hash_list(tokens, BS)
    loc = [int(x) for x in local_block_hashes(tokens, BS)]
    assert ev == KvStored(None, [StoredBlock(seq[0], loc[0]), StoredBlock(seq[1], loc[1])])

    # two more tokens complete block 2: a Stored event whose parent is block 1
    req.all_tokens += [10, 11]
    assert kv.allocate(req, 2)
    req.num_computed = 12
    kv.register_full_blocks(req)
    (ev2,) = kv.take_events()
    seq12 = block_hash_list(list(range(12)), BS)
    assert ev2 == KvStored(seq12[1], [StoredBlock(seq12[2], int(local_block_hashes(list(range(12)), BS)[2]))])


def test_prefix_hit_reuses_blocks_and_leaves_one_token_to_compute() -> None:
    kv = KvManager(num_blocks=8, block_size=BS)
    first = _req("a", list(range(9)))
    _admit(kv, first)
    kv.free(first)
    again = _req("b", list(range(9)))
    assert _admit(kv, again) == 8
    exact = _req("c", list(range(8)))  # fully cached prompt: the last block is recomputed
    assert len(kv.find_prefix(exact)) == 1
    assert kv.pool.num_active == 3  # b holds 3 blocks, 2 of them shared from a's cache


def test_duplicate_prefix_computed_twice_is_registered_once() -> None:
    kv = KvManager(num_blocks=8, block_size=BS)
    a, b = _req("a", list(range(8))), _req("b", list(range(8)))
    for r in (a, b):  # both admitted before either registered (same step)
        assert kv.allocate(r, 8, [])
    for r in (a, b):
        r.num_computed = 8
        kv.register_full_blocks(r)
    stored = [e for e in kv.take_events() if isinstance(e, KvStored)]
    assert len(stored) == 1 and len(stored[0].blocks) == 2
    kv.free(a)
    kv.free(b)
    assert kv.pool.num_active == 0 and kv.pool.num_cached == 2


def test_dump_rebuilds_what_the_events_say() -> None:
    kv = KvManager(num_blocks=16, block_size=BS)
    shared = list(range(8))
    for i, tail in enumerate([[50, 51, 52, 53], [60, 61, 62, 63, 64, 65, 66, 67], []]):
        r = _req(f"r{i}", shared + tail + [99])
        _admit(kv, r)
        kv.free(r)
    live: dict[int, int | None] = {}
    for e in kv.take_events():
        if isinstance(e, KvStored):
            parent = e.parent_hash
            for b in e.blocks:
                live[b.block_hash] = parent
                parent = b.block_hash
        elif isinstance(e, KvRemoved):
            for h in e.block_hashes:
                live.pop(h, None)
    dumped: dict[int, int | None] = {}
    for e in kv.dump():
        parent = e.parent_hash
        for b in e.blocks:
            assert parent is None or parent in dumped  # parents come before children
            dumped[b.block_hash] = parent
            parent = b.block_hash
    assert dumped == live


def test_pool_refuses_overdraw_double_free_and_clear_while_used() -> None:
    pool = BlockPool(2)
    blocks = pool.allocate(2)
    with pytest.raises(NoFreeBlocks):
        pool.allocate(1)
    assert pool.clear() is False
    pool.free(blocks)
    with pytest.raises(RuntimeError):
        pool.free(blocks[:1])
    assert pool.clear() is True
    assert pool.take_events() == [KvCleared()]
    with pytest.raises(ValueError):
        BlockPool(0)
