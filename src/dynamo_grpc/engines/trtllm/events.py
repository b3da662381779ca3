"""TensorRT-LLM's KV cache events as ours: its block hashes mapped to our hash spec.

``LLM.get_kv_cache_events_async()`` yields dicts ``{"event_id", "data", "window_size"}`` whose
``data["type"]`` is one of:

- ``created`` ``{num_blocks_per_cache_level}``: the pools exist; level 0 is the GPU pool (our total).
- ``stored`` ``{parent_hash, blocks: [{block_hash, tokens: [{token_id, token_extra_id}], lora_id,
  cache_level, priority}]}``: blocks that became reusable, in chain order.
- ``removed`` ``{block_hashes}``: evicted blocks, by its hash only.
- ``updated`` ``{block_hash, cache_level: {old_value, new_value}, priority}``: a block moved tier.

Its hashes are its own, so the router could never match them. We recompute ours from the tokens a
stored event carries (``tokens/block_hash.py``: xxh3 local hashes chained from the parent's *our*
hash) and keep a map from its hash to ours, which is the only way to translate ``removed`` events.
``cache_level`` (0 GPU, 1 host memory after offload) becomes the block's medium, kept in the map.
Several of its blocks may carry the same tokens under the same parent (ours dedupes them): ours is
announced when the first appears and removed when the last goes, so a subscriber never sees a block
stored twice or removed while still held.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dynamo_grpc.events.kv import KvEvent, KvRemoved, KvStored, StoredBlock
from dynamo_grpc.tokens.block_hash import chain_hashes, local_block_hashes

log = logging.getLogger(__name__)

#: its cache_level -> our medium name
MEDIUMS = {0: "gpu", 1: "cpu"}


def medium_of(cache_level: int) -> str:
    return MEDIUMS.get(cache_level, f"level{cache_level}")


@dataclass
class _Ours:
    """One of our blocks: its parent in our chain, local hash, medium, and its hashes holding it."""

    parent: int | None
    tokens_hash: int
    medium: str
    holders: set[int]


class EventTranslator:
    """Turns its KV event dicts into our :data:`KvEvent` list, keeping the hash map both ways."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._theirs: dict[int, int] = {}  # its block hash -> our sequence hash
        self._ours: dict[int, _Ours] = {}  # in the order announced (chain order)
        #: blocks per cache level from its ``created`` event (level 0: the GPU pool)
        self.blocks_per_level: list[int] = []
        #: stored blocks that could not be translated (partial block, unknown parent, LoRA)
        self.dropped = 0

    def ours(self, their_hash: int) -> int | None:
        return self._theirs.get(their_hash)

    def medium(self, our_hash: int) -> str | None:
        b = self._ours.get(our_hash)
        return None if b is None else b.medium

    def translate(self, event: Mapping[str, Any]) -> list[KvEvent]:
        data = event.get("data", event)
        kind = data.get("type")
        if kind == "stored":
            return self._stored(data)
        if kind == "removed":
            return self._removed(data.get("block_hashes", []))
        if kind == "created":
            self.blocks_per_level = [int(n) for n in data.get("num_blocks_per_cache_level", [])]
        elif kind == "updated":
            self._updated(data)
        else:
            log.warning("unknown TensorRT-LLM KV event type %r ignored", kind)
        return []

    def _stored(self, data: Mapping[str, Any]) -> list[KvEvent]:
        their_parent = data.get("parent_hash")
        parent = None if their_parent is None else self._theirs.get(int(their_parent))
        blocks = list(data.get("blocks", []))
        if their_parent is not None and parent is None:
            self.dropped += len(blocks)
            log.debug("stored event under an unknown parent %s: %d blocks not announced", their_parent, len(blocks))
            return []
        new: list[StoredBlock] = []
        first_parent = parent
        out: list[KvEvent] = []
        for i, blk in enumerate(blocks):
            tokens = [int(t["token_id"]) for t in blk.get("tokens", [])]
            if len(tokens) != self.block_size or blk.get("lora_id") is not None:
                self.dropped += len(blocks) - i  # a partial (or LoRA) block ends what we can chain
                break
            local = local_block_hashes(tokens, self.block_size)
            ours = int(chain_hashes(local, parent=parent)[0])
            their = int(blk["block_hash"])
            self._theirs[their] = ours
            known = self._ours.get(ours)
            if known is not None:
                known.holders.add(their)
                if new:  # keep each Stored a contiguous chain
                    out.append(KvStored(first_parent, new))
                    new = []
                first_parent = ours
            else:
                self._ours[ours] = _Ours(parent, int(local[0]), medium_of(int(blk.get("cache_level", 0))), {their})
                new.append(StoredBlock(block_hash=ours, tokens_hash=int(local[0])))
            parent = ours
        if new:
            out.append(KvStored(first_parent, new))
        return out

    def _removed(self, their_hashes: list[int]) -> list[KvEvent]:
        gone: list[int] = []
        for their in their_hashes:
            ours = self._theirs.pop(int(their), None)
            if ours is None:
                continue  # never announced (partial block, dropped chain)
            b = self._ours[ours]
            b.holders.discard(int(their))
            if not b.holders:
                del self._ours[ours]
                gone.append(ours)
        return [KvRemoved(gone)] if gone else []

    def _updated(self, data: Mapping[str, Any]) -> None:
        ours = self._theirs.get(int(data.get("block_hash", -1)))
        level = data.get("cache_level")
        if ours is not None and isinstance(level, Mapping) and "new_value" in level:
            self._ours[ours].medium = medium_of(int(level["new_value"]))

    def cached_blocks(self) -> list[KvStored]:
        """Every block announced and not removed, one Stored each, in the order announced."""
        return [
            KvStored(b.parent, [StoredBlock(block_hash=h, tokens_hash=b.tokens_hash)]) for h, b in self._ours.items()
        ]
