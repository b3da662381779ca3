"""The engine core's block pool and KV manager, without a model or an executor.

LRU eviction order, Stored/Removed/Cleared events with the DESIGN.md block hash and chained
parents, prefix hits, failed allocations that change nothing, and dumps that match the events.
(Both engines run on this one manager, so these were once two copies of each test.)
"""

from __future__ import annotations

import pytest

from dynamo_grpc.engines.base import SamplingParams
from dynamo_grpc.engines.core.block_pool import BlockPool, NoFreeBlocks
from dynamo_grpc.engines.core.kv_manager import KvManager
from dynamo_grpc.engines.core.request import Request
from dynamo_grpc.events.kv import KvCleared, KvRemoved, KvStored, StoredBlock
from dynamo_grpc.tokens.block_hash import block_hash_list, local_block_hashes

BS = 4

# ---------------------------------------------------------------------- tables on the request


def _mock_req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=8))


def _mock_admit(kv: KvManager, req: Request) -> int:
    """Admit a whole prompt, mark it computed and register its full blocks; returns hit tokens."""
    prefix = kv.find_prefix(req)
    hit = len(prefix) * BS
    assert kv.allocate(req, req.num_tokens - hit, prefix)
    req.num_computed_tokens = req.num_tokens
    kv.register_full_blocks(req)
    return hit


def test_free_blocks_are_evicted_least_recently_freed_first_tail_first() -> None:
    kv = KvManager(num_blocks=6, block_size=BS)
    a = _mock_req("a", list(range(8)))  # 2 full blocks
    b = _mock_req("b", list(range(100, 108)))
    _mock_admit(kv, a)
    _mock_admit(kv, b)
    kv.take_events()
    kv.free(a)  # a freed first: its blocks are evicted first, tail (block 1) before head (block 0)
    kv.free(b)
    a_hashes = block_hash_list(a.all_token_ids, BS)
    b_hashes = block_hash_list(b.all_token_ids, BS)
    order = [kv.pool.blocks[i].block_hash for i in kv.pool.eviction_order() if kv.pool.blocks[i].block_hash]
    assert order == [a_hashes[1], a_hashes[0], b_hashes[1], b_hashes[0]]

    c = _mock_req("c", list(range(200, 216)))  # needs 4 blocks: 2 never-used, then a's tail and head
    _mock_admit(kv, c)
    events = kv.take_events()
    removed = [h for e in events if isinstance(e, KvRemoved) for h in e.block_hashes]
    assert removed == [a_hashes[1], a_hashes[0]]
    assert kv.pool.lookup(b_hashes[0]) is not None and kv.pool.lookup(a_hashes[0]) is None


def test_stored_events_carry_the_shared_block_hash_and_chain_parents() -> None:
    kv = KvManager(num_blocks=8, block_size=BS)
    tokens = list(range(10))  # 2 full blocks + 2 tokens
    req = _mock_req("r", tokens)
    _mock_admit(kv, req)
    (ev,) = kv.take_events()
    seq = block_hash_list(tokens, BS)
    loc = [int(x) for x in local_block_hashes(tokens, BS)]
    assert ev == KvStored(None, [StoredBlock(seq[0], loc[0]), StoredBlock(seq[1], loc[1])])

    # two more tokens complete block 2: a Stored event whose parent is block 1
    req.all_token_ids += [10, 11]
    assert kv.allocate(req, 2)
    req.num_computed_tokens = 12
    kv.register_full_blocks(req)
    (ev2,) = kv.take_events()
    seq12 = block_hash_list(list(range(12)), BS)
    assert ev2 == KvStored(seq12[1], [StoredBlock(seq12[2], int(local_block_hashes(list(range(12)), BS)[2]))])


def test_prefix_hit_reuses_blocks_and_leaves_one_token_to_compute() -> None:
    kv = KvManager(num_blocks=8, block_size=BS)
    first = _mock_req("a", list(range(9)))
    _mock_admit(kv, first)
    kv.free(first)
    again = _mock_req("b", list(range(9)))
    assert _mock_admit(kv, again) == 8
    exact = _mock_req("c", list(range(8)))  # fully cached prompt: the last block is recomputed
    assert len(kv.find_prefix(exact)) == 1
    assert kv.pool.num_active == 3  # b holds 3 blocks, 2 of them shared from a's cache


def test_duplicate_prefix_computed_twice_is_registered_once() -> None:
    kv = KvManager(num_blocks=8, block_size=BS)
    a, b = _mock_req("a", list(range(8))), _mock_req("b", list(range(8)))
    for r in (a, b):  # both admitted before either registered (same step)
        assert kv.allocate(r, 8, [])
    for r in (a, b):
        r.num_computed_tokens = 8
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
        r = _mock_req(f"r{i}", shared + tail + [99])
        _mock_admit(kv, r)
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


# ---------------------------------------------------------------------- prefix hits, eviction, failures


def _torch_req(rid: str, tokens: list[int]) -> Request:
    r = Request(rid, tokens, SamplingParams(max_tokens=4))
    r.update_block_hashes(BS)
    return r


def _ids(req: Request) -> list[int]:
    return [b.block_id for b in req.blocks]


def _torch_compute(mgr: KvManager, req: Request) -> list[int]:
    """Admit ``req`` with its prefix hit, compute its whole prompt, cache full blocks."""
    prefix = mgr.find_prefix(req)
    assert mgr.allocate(req, req.num_tokens - len(prefix) * BS, prefix)
    req.num_computed_tokens = req.num_tokens
    mgr.register_full_blocks(req)
    return [b.block_id for b in prefix]


def test_pool_allocate_and_free_count_blocks() -> None:
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert pool.num_free == 1 and pool.num_active == 3
    with pytest.raises(NoFreeBlocks):
        pool.allocate(2)
    pool.free(reversed(a))
    assert pool.num_free == 4
    assert pool.eviction_order()[-3:] == [a[2].block_id, a[1].block_id, a[0].block_id]
    with pytest.raises(RuntimeError):
        pool.free([a[0]])


def test_stored_events_carry_the_shared_block_hash() -> None:
    mgr = KvManager(8, BS)
    toks = list(range(10))  # 2 full blocks + 2 tokens
    req = _torch_req("a", toks)
    _torch_compute(mgr, req)
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
        mgr.register_full_blocks(req)
    h3 = block_hash_list(list(range(12)), BS)[2]
    l3 = int(local_block_hashes(list(range(12)), BS)[2])
    assert mgr.take_events() == [KvStored(hashes[1], [StoredBlock(h3, l3)])]


def test_prefix_hit_reuses_blocks_and_leaves_one_token() -> None:
    mgr = KvManager(8, BS)
    a = _torch_req("a", list(range(12)))
    _torch_compute(mgr, a)
    a_blocks = _ids(a)
    mgr.free(a)
    assert mgr.pool.num_active == 0 and mgr.pool.num_cached == 3
    # same 12 tokens: the last block is not reused (a token must be computed for logits)
    b = _torch_req("b", list(range(12)))
    assert [x.block_id for x in mgr.find_prefix(b)] == a_blocks[:2]
    # longer prompt sharing 3 blocks reuses all of them and only allocates the tail
    c = _torch_req("c", list(range(12)) + [99, 98])
    hit = _torch_compute(mgr, c)
    assert hit == a_blocks
    assert _ids(c)[:3] == a_blocks
    assert len(_ids(c)) == 4
    # different first block: no hit at all
    d = _torch_req("d", [7, 7, 7, 7] + list(range(4, 12)))
    assert mgr.find_prefix(d) == []


def test_lru_eviction_order_and_removed_events() -> None:
    mgr = KvManager(6, BS)
    a = _torch_req("a", list(range(8)) + [0])  # 2 full blocks + 1
    b = _torch_req("b", list(range(100, 108)) + [0])
    _torch_compute(mgr, a)
    _torch_compute(mgr, b)
    a_ids, b_ids = _ids(a), _ids(b)
    mgr.free(a)  # freed first: evicted first, tail block before its prefix
    mgr.free(b)
    mgr.take_events()
    assert mgr.pool.eviction_order() == [a_ids[2], a_ids[1], a_ids[0], b_ids[2], b_ids[1], b_ids[0]]
    ha, hb = block_hash_list(list(range(8)), BS), block_hash_list(list(range(100, 108)), BS)
    # a new 3-block request takes a's blocks, evicting a's cached blocks tail-first
    c = _torch_req("c", list(range(200, 211)))
    assert mgr.allocate(c, c.num_tokens)
    assert mgr.take_events() == [KvRemoved([ha[1], ha[0]])]
    assert mgr.pool.lookup(hb[0]) is not None and mgr.pool.lookup(ha[0]) is None
    # touching b's prefix moves it out of the eviction queue
    e = _torch_req("e", list(range(100, 108)) + [5])
    prefix = mgr.find_prefix(e)
    assert [p.block_id for p in prefix] == b_ids[:2]
    assert mgr.allocate(e, 1, prefix)
    assert b_ids[0] not in mgr.pool.eviction_order()


def test_allocation_failure_changes_nothing() -> None:
    mgr = KvManager(3, BS)
    a = _torch_req("a", list(range(8)) + [1])
    _torch_compute(mgr, a)
    mgr.free(a)
    mgr.take_events()
    before = mgr.pool.eviction_order()
    big = _torch_req("big", list(range(8)) + list(range(50, 58)))  # hits 2 blocks, needs 2 more: 4 > 3
    prefix = mgr.find_prefix(big)
    assert len(prefix) == 2
    assert not mgr.allocate(big, big.num_tokens - 8, prefix)
    assert mgr.pool.eviction_order() == before
    assert big.blocks == []
    assert mgr.take_events() == []


def test_every_store_and_evict_is_announced() -> None:
    """Replaying the event stream reproduces exactly the pool's cached set."""
    mgr = KvManager(5, BS)
    view: set[int] = set()
    for i in range(12):
        req = _torch_req(f"r{i}", [i % 4] * 4 + [i] * 6)
        _torch_compute(mgr, req)
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
    mgr = KvManager(8, BS)
    a, b = _torch_req("a", list(range(9))), _torch_req("b", list(range(9)))
    assert mgr.allocate(a, 9) and mgr.allocate(b, 9)  # computed concurrently: no hit for b
    for r in (a, b):
        r.num_computed_tokens = 9
        mgr.register_full_blocks(r)
    stored = [ev for ev in mgr.take_events() if isinstance(ev, KvStored)]
    assert len(stored) == 1 and len(stored[0].blocks) == 2
    mgr.free(a)
    mgr.free(b)
    assert mgr.pool.num_cached == 2


def test_dump_orders_parents_before_children() -> None:
    mgr = KvManager(10, BS)
    base = list(range(8))
    for i, tail in enumerate(([1, 2, 3, 4], [5, 6, 7, 8])):
        r = _torch_req(f"r{i}", base + tail + [0])
        _torch_compute(mgr, r)
    dump = mgr.dump()
    seen: set[int] = set()
    for st in dump:
        assert st.parent_hash is None or st.parent_hash in seen
        seen.update(b.block_hash for b in st.blocks)
    assert len(seen) == 4
    assert dump[0].parent_hash is None and len(dump[0].blocks) == 2
