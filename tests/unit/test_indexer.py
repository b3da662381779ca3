"""KvIndexer against a brute-force reference (worker -> set of hashes) on random event streams."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dynamo_grpc.router.indexer import KvIndexer

WORKERS = [("w0", 0), ("w1", 0), ("w1", 1), ("w2", 0)]


class Reference:
    """The obvious implementation: a set per worker, overlap = leading blocks in the set."""

    def __init__(self) -> None:
        self.sets: dict[tuple[str, int], set[int]] = {}

    def store(self, w: tuple[str, int], hs: list[int]) -> None:
        self.sets.setdefault(w, set()).update(hs)

    def remove(self, w: tuple[str, int], hs: list[int]) -> None:
        if w in self.sets:
            self.sets[w].difference_update(hs)

    def drop(self, w: tuple[str, int]) -> None:
        self.sets.pop(w, None)

    def overlaps(self, chain: list[int]) -> dict[tuple[str, int], int]:
        out = {}
        for w, s in self.sets.items():
            n = 0
            while n < len(chain) and chain[n] in s:
                n += 1
            if n:
                out[w] = n
        return out


# Chains drawn from a small universe so that workers share prefixes and queries hit.
def chain_strategy() -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(1, 12), min_size=0, max_size=8).map(
        lambda xs: [hash(tuple(xs[: i + 1])) & (2**64 - 1) for i in range(len(xs))]
    )


op = st.one_of(
    st.tuples(st.just("store"), st.sampled_from(WORKERS), chain_strategy()),
    st.tuples(st.just("remove"), st.sampled_from(WORKERS), chain_strategy()),
    st.tuples(st.just("clear"), st.sampled_from(WORKERS), st.just([])),
    st.tuples(st.just("die"), st.sampled_from(["w0", "w1", "w2"]), st.just([])),
    st.tuples(st.just("sweep"), st.just(None), st.just([])),
    st.tuples(st.just("query"), st.just(None), chain_strategy()),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(op, max_size=60))
def test_matches_reference(ops: list[tuple[str, object, list[int]]]) -> None:
    idx = KvIndexer()
    ref = Reference()
    for kind, who, chain in ops:
        if kind == "store":
            idx.store(who, chain)
            ref.store(who, chain)  # type: ignore[arg-type]
        elif kind == "remove":
            idx.remove(who, chain)
            ref.remove(who, chain)  # type: ignore[arg-type]
        elif kind == "clear":
            idx.clear_worker(who)
            ref.drop(who)  # type: ignore[arg-type]
        elif kind == "die":
            for w in [w for w in WORKERS if w[0] == who]:
                idx.remove_worker(w)
                ref.drop(w)
        elif kind == "sweep":
            idx.sweep()
        else:
            assert idx.overlaps(chain) == ref.overlaps(chain)
    for _, _, chain in ops:
        assert idx.overlaps(chain) == ref.overlaps(chain)
    dump = {w: set(hs) for w, hs in idx.dump().items() if hs}
    assert dump == {w: s for w, s in ref.sets.items() if s}
    idx.sweep()
    assert {w: set(hs) for w, hs in idx.dump().items() if hs} == dump
    assert len(idx) == len(set().union(*ref.sets.values())) if ref.sets else len(idx) == 0


def test_overlap_depth_is_prefix_only() -> None:
    idx = KvIndexer()
    idx.store("a", [1, 2, 3])
    idx.store("b", [1, 3])  # holds 3 without 2: not a prefix match past 1
    assert idx.overlaps([1, 2, 3]) == {"a": 3, "b": 1}
    assert idx.overlaps([2, 3]) == {"a": 2}
    assert idx.overlaps([]) == {}
    assert idx.overlaps([9]) == {}


def test_orphan_store_is_counted_but_indexed() -> None:
    idx = KvIndexer()
    idx.store("a", [5, 6], parent_hash=4)
    assert idx.stats.orphan_stores == 1
    idx.store("a", [7], parent_hash=6)
    assert idx.stats.orphan_stores == 1
    assert idx.overlaps([5, 6, 7]) == {"a": 3}


def test_bounded_memory_prunes_least_recently_used_to_80_percent() -> None:
    idx = KvIndexer(max_blocks=100)
    idx.store("a", range(1, 101))
    assert len(idx) == 100
    idx.overlaps([1, 2, 3])  # touch the chain's first blocks: now most recent
    idx.store("b", [1000])
    assert len(idx) == 80
    assert idx.stats.pruned_blocks == 21
    assert idx.overlaps([1, 2, 3], touch=False) == {"a": 3}
    assert idx.workers_of(4) == []  # oldest untouched blocks went first
    assert idx.workers_of(100) == ["a"]
    assert idx.workers_of(1000) == ["b"]


def test_retired_slot_is_reused_only_after_sweep() -> None:
    idx = KvIndexer()
    idx.store("a", [1, 2])
    idx.remove_worker("a")
    idx.store("b", [3])
    assert idx.overlaps([1]) == {}
    assert idx.needs_sweep()
    idx.sweep()
    assert not idx.needs_sweep() and len(idx) == 1
    idx.store("c", [4])  # reuses a's slot; a's blocks must not show up as c's
    assert idx.overlaps([1, 2]) == {}
    assert idx.overlaps([4]) == {"c": 1}


def test_remove_unknown_worker_or_block_is_noop() -> None:
    idx = KvIndexer()
    idx.remove("nobody", [1])
    idx.store("a", [1])
    idx.remove("a", [2])
    assert idx.overlaps([1]) == {"a": 1}
