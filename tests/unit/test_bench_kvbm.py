"""The kvbm benchmark's synthetic multi-turn trace: each turn extends the previous one, sizes follow from it."""

from __future__ import annotations

import itertools
from collections import defaultdict

from dynamo_grpc.bench.kvbm import HASH_BLOCK, conversations, unique_engine_blocks


def test_each_turn_extends_its_conversation_and_arrivals_are_ordered() -> None:
    trace = conversations(n_conv=5, turns=4, first_blocks=2, add_blocks=3, rate=2.0, seed=3)
    reqs = trace.requests
    assert len(reqs) == 20 and reqs[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(reqs))
    by_first: dict[int, list[tuple[int, ...]]] = defaultdict(list)
    for r in reqs:
        assert r.hash_ids is not None and r.input_length == len(r.hash_ids) * HASH_BLOCK
        by_first[r.hash_ids[0]].append(r.hash_ids)
    assert len(by_first) == 5
    for turns in by_first.values():
        turns.sort(key=len)
        assert [len(t) for t in turns] == [2, 5, 8, 11]
        for prev, nxt in itertools.pairwise(turns):
            assert nxt[: len(prev)] == prev  # the next turn shares the whole previous prompt
    assert unique_engine_blocks(trace) == 5 * 11 * (HASH_BLOCK // 64)
