"""Block pool and KV manager of the torch engine, without a model."""

from __future__ import annotations

import pytest

from dynamo_grpc.engines.base import KvRemoved, KvStored, SamplingParams, StoredBlock
from dynamo_grpc.engines.torch.block_pool import BlockPool, NoFreeBlocks
from dynamo_grpc.engines.torch.kv_manager import KvCacheManager
from dynamo_grpc.engines.torch.request import Request
from dynamo_grpc.tokens.block_hash import block_hash_list, local_block_hashes

BS = 4


def _req(rid: str, tokens: list[int]) -> Request:
    r = Request(rid, tokens, SamplingParams(max_tokens=4))
    r.update_block_hashes(BS)
    return r


def _compute(mgr: KvCacheManager, req: Request) -> list[int]:
    """Admit ``req`` with its prefix hit, compute its whole prompt, cache full blocks."""
    prefix = mgr.find_prefix(req)
    assert mgr.allocate(req, req.num_tokens - len(prefix) * BS, prefix)
    req.num_computed_tokens = req.num_tokens
    mgr.cache_full_blocks(req)
    return [b.block_id for b in prefix]


def test_allocate_and_free_count_blocks() -> None:
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.num_free == 1 and pool.num_used == 3
    with pytest.raises(NoFreeBlocks):
        pool.allocate(2)
    pool.free(reversed(a))
    assert pool.num_free == 4
    assert pool.free_order()[-3:] == [a[2].block_id, a[1].block_id, a[0].block_id]
    with pytest.raises(RuntimeError):
        pool.free([a[0]])


def test_stored_events_carry_the_shared_block_hash() -> None:
    mgr = KvCacheManager(8, BS)
    toks = list(range(10))  # 2 full blocks + 2 tokens
    req = _req("a", toks)
    _compute(mgr, req)
    events = mgr.take_events()
    hashes = block_hash_list(toks, BS)
    local = [int(x) for x in local_block_hashes(toks, BS)]
    assert events == [KvStored(None, [StoredBlock(hashes[0], local[0]), StoredBlock(hashes[1], local[1])])]
    assert mgr.pool.num_cached == 2
    # decoding fills the third block: one more Stored whose parent is the second block
    for t in (10, 11):
        req.append_output(t)
        assert mgr.allocate(req, 1)
        req.num_computed_tokens += 1
        mgr.cache_full_blocks(req)
    h3 = block_hash_list(list(range(12)), BS)[2]
    l3 = int(local_block_hashes(list(range(12)), BS)[2])
    assert mgr.take_events() == [KvStored(hashes[1], [StoredBlock(h3, l3)])]


def test_prefix_hit_reuses_blocks_and_leaves_one_token() -> None:
    mgr = KvCacheManager(8, BS)
    a = _req("a", list(range(12)))
    _compute(mgr, a)
    a_blocks = mgr.block_ids("a")
    mgr.free(a)
    assert mgr.pool.num_used == 0 and mgr.pool.num_cached == 3
    # same 12 tokens: the last block is not reused (a token must be computed for logits)
    b = _req("b", list(range(12)))
    assert [x.block_id for x in mgr.find_prefix(b)] == a_blocks[:2]
    # longer prompt sharing 3 blocks reuses all of them and only allocates the tail
    c = _req("c", list(range(12)) + [99, 98])
    hit = _compute(mgr, c)
    assert hit == a_blocks
    assert mgr.block_ids("c")[:3] == a_blocks
    assert len(mgr.block_ids("c")) == 4
    # different first block: no hit at all
    d = _req("d", [7, 7, 7, 7] + list(range(4, 12)))
    assert mgr.find_prefix(d) == []


def test_lru_eviction_order_and_removed_events() -> None:
    mgr = KvCacheManager(6, BS)
    a = _req("a", list(range(8)) + [0])  # 2 full blocks + 1
    b = _req("b", list(range(100, 108)) + [0])
    _compute(mgr, a)
    _compute(mgr, b)
    a_ids, b_ids = mgr.block_ids("a"), mgr.block_ids("b")
    mgr.free(a)  # freed first: evicted first, tail block before its prefix
    mgr.free(b)
    mgr.take_events()
    assert mgr.pool.free_order() == [a_ids[2], a_ids[1], a_ids[0], b_ids[2], b_ids[1], b_ids[0]]
    ha, hb = block_hash_list(list(range(8)), BS), block_hash_list(list(range(100, 108)), BS)
    # a new 3-block request takes a's blocks, evicting a's cached blocks tail-first
    c = _req("c", list(range(200, 211)))
    assert mgr.allocate(c, c.num_tokens)
    assert mgr.take_events() == [KvRemoved([ha[1], ha[0]])]
    assert mgr.pool.lookup(hb[0]) is not None and mgr.pool.lookup(ha[0]) is None
    # touching b's prefix moves it out of the eviction queue
    e = _req("e", list(range(100, 108)) + [5])
    prefix = mgr.find_prefix(e)
    assert [p.block_id for p in prefix] == b_ids[:2]
    assert mgr.allocate(e, 1, prefix)
    assert b_ids[0] not in mgr.pool.free_order()


def test_allocation_failure_changes_nothing() -> None:
    mgr = KvCacheManager(3, BS)
    a = _req("a", list(range(8)) + [1])
    _compute(mgr, a)
    mgr.free(a)
    mgr.take_events()
    before = mgr.pool.free_order()
    big = _req("big", list(range(8)) + list(range(50, 58)))  # hits 2 blocks, needs 2 more: 4 > 3
    prefix = mgr.find_prefix(big)
    assert len(prefix) == 2
    assert not mgr.allocate(big, big.num_tokens - 8, prefix)
    assert mgr.pool.free_order() == before
    assert "big" not in mgr.tables
    assert mgr.take_events() == []


def test_every_store_and_evict_is_announced() -> None:
    """Replaying the event stream reproduces exactly the pool's cached set."""
    mgr = KvCacheManager(5, BS)
    view: set[int] = set()
    for i in range(12):
        req = _req(f"r{i}", [i % 4] * 4 + [i] * 6)
        _compute(mgr, req)
        mgr.free(req)
        for ev in mgr.take_events():
            if isinstance(ev, KvStored):
                view.update(b.block_hash for b in ev.blocks)
            elif isinstance(ev, KvRemoved):
                assert set(ev.block_hashes) <= view
                view.difference_update(ev.block_hashes)
        dumped = {b.block_hash for st in mgr.dump() for b in st.blocks}
        assert view == dumped
        assert len(dumped) == mgr.pool.num_cached


def test_duplicate_block_is_not_announced_twice() -> None:
    mgr = KvCacheManager(8, BS)
    a, b = _req("a", list(range(9))), _req("b", list(range(9)))
    assert mgr.allocate(a, 9) and mgr.allocate(b, 9)  # computed concurrently: no hit for b
    for r in (a, b):
        r.num_computed_tokens = 9
        mgr.cache_full_blocks(r)
    stored = [ev for ev in mgr.take_events() if isinstance(ev, KvStored)]
    assert len(stored) == 1 and len(stored[0].blocks) == 2
    mgr.free(a)
    mgr.free(b)
    assert mgr.pool.num_cached == 2


def test_dump_orders_parents_before_children() -> None:
    mgr = KvCacheManager(10, BS)
    base = list(range(8))
    for i, tail in enumerate(([1, 2, 3, 4], [5, 6, 7, 8])):
        r = _req(f"r{i}", base + tail + [0])
        _compute(mgr, r)
    dump = mgr.dump()
    seen: set[int] = set()
    for st in dump:
        assert st.parent_hash is None or st.parent_hash in seen
        seen.update(b.block_hash for b in st.blocks)
    assert len(seen) == 4
    assert dump[0].parent_hash is None and len(dump[0].blocks) == 2
