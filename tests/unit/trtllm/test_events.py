"""Its KV events -> ours: the hashes we announce are our spec's for the tokens its event carries.

Event dicts have the shape of TensorRT-LLM 1.1's ``get_kv_cache_events_async`` (see standin/).
"""

from __future__ import annotations

import random

from dynamo_grpc.engines.trtllm.events import EventTranslator
from dynamo_grpc.events.kv import KvRemoved, KvStored
from dynamo_grpc.tokens.block_hash import block_hash_list, local_block_hashes

BS = 4


def _block(their: int, tokens: list[int], level: int = 0) -> dict[str, object]:
    toks = [{"type": "unique_token", "token_id": t, "token_extra_id": 0} for t in tokens]
    return {"type": "stored_block", "block_hash": their, "tokens": toks, "lora_id": None, "cache_level": level}


def _stored(parent: int | None, *blocks: dict[str, object]) -> dict[str, object]:
    return {"event_id": 1, "data": {"type": "stored", "parent_hash": parent, "blocks": list(blocks)}}


def _removed(*hashes: int) -> dict[str, object]:
    return {"event_id": 2, "data": {"type": "removed", "block_hashes": list(hashes)}}


def test_stored_blocks_get_our_chain_hashes_and_removed_maps_back() -> None:
    tr = EventTranslator(BS)
    tokens = [random.Random(3).randrange(1000) for _ in range(12)]
    theirs = [0xAAAA, 0xBBBB, 0xCCCC]  # its hashes: nothing like ours
    out = tr.translate(_stored(None, *(_block(h, tokens[i * BS : (i + 1) * BS]) for i, h in enumerate(theirs))))
    ours = block_hash_list(tokens, BS)
    assert len(out) == 1 and isinstance(out[0], KvStored) and out[0].parent_hash is None
    assert [b.block_hash for b in out[0].blocks] == ours
    assert [b.tokens_hash for b in out[0].blocks] == [int(h) for h in local_block_hashes(tokens, BS)]
    more = [7, 8, 9, 10]  # a later event continues the chain from its parent hash
    (cont,) = tr.translate(_stored(0xCCCC, _block(0xDDDD, more)))
    assert isinstance(cont, KvStored) and cont.parent_hash == ours[-1]
    assert cont.blocks[0].block_hash == block_hash_list(tokens + more, BS)[-1]
    assert tr.translate(_removed(0xBBBB, 0x1234)) == [KvRemoved([ours[1]])]  # unknown hashes: never announced
    assert {b.blocks[0].block_hash for b in tr.cached_blocks()} == {ours[0], ours[2], cont.blocks[0].block_hash}


def test_partial_blocks_and_unknown_parents_are_not_announced() -> None:
    tr = EventTranslator(BS)
    out = tr.translate(_stored(None, _block(1, [1, 2, 3, 4]), _block(2, [5, 6]), _block(3, [7, 8, 9, 10])))
    assert [len(e.blocks) for e in out if isinstance(e, KvStored)] == [1]  # the chain stops at the partial block
    assert tr.translate(_stored(0x999, _block(4, [1, 2, 3, 4]))) == []  # parent never seen: cannot chain
    assert tr.dropped == 3
    assert tr.translate(_removed(2, 3, 4)) == []


def test_same_tokens_under_two_of_its_hashes_are_one_block_of_ours() -> None:
    tr = EventTranslator(BS)
    first = tr.translate(_stored(None, _block(10, [1, 2, 3, 4])))
    assert tr.translate(_stored(None, _block(11, [1, 2, 3, 4]))) == []  # already announced
    assert tr.translate(_removed(10)) == []  # still held under 11
    (gone,) = tr.translate(_removed(11))
    assert isinstance(first[0], KvStored) and gone == KvRemoved([first[0].blocks[0].block_hash])


def test_cache_level_is_the_medium_and_created_sizes_the_pool() -> None:
    tr = EventTranslator(BS)
    tr.translate({"event_id": 0, "data": {"type": "created", "num_blocks_per_cache_level": [128, 512]}})
    assert tr.blocks_per_level == [128, 512]
    (st,) = tr.translate(_stored(None, _block(5, [1, 2, 3, 4])))
    ours = st.blocks[0].block_hash if isinstance(st, KvStored) else -1
    assert tr.medium(ours) == "gpu"
    diff = {"type": "event_diff", "old_value": 0, "new_value": 1}
    assert tr.translate({"event_id": 3, "data": {"type": "updated", "block_hash": 5, "cache_level": diff}}) == []
    assert tr.medium(ours) == "cpu"  # offloaded to host memory: still held, on another medium
