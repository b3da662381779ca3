"""Feeds the router from the event plane: KvEventBatch/LoadMetrics protobuf -> indexer calls."""

from __future__ import annotations

from dynamo_grpc.events.codec import medium_name
from dynamo_grpc.router.router import Router
from dynamo_grpc.v1 import events_pb2


class IndexSink:
    """The :class:`~dynamo_grpc.events.subscriber.EventSink` of a router."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def apply_batch(self, batch: events_pb2.KvEventBatch) -> None:
        r = self.router
        key = (batch.instance_id, batch.dp_rank)
        if batch.instance_id in r.refused or batch.instance_id not in r.workers:
            return
        if r.block_size and batch.block_size and batch.block_size != r.block_size:
            r.refuse_rank(key, batch.block_size)
            return
        idx = r.indexer
        tiers = r.tiers
        for ev in batch.events:
            kind = ev.WhichOneof("data")
            if kind == "stored":
                s = ev.stored
                parent = s.parent_hash if s.HasField("parent_hash") else None
                hashes = [b.block_hash for b in s.blocks]
                if s.medium <= events_pb2.KV_MEDIUM_DEVICE:
                    idx.store(key, hashes, parent)
                else:
                    tiers.store(medium_name(s.medium), key, hashes, parent)
            elif kind == "removed":
                rm = ev.removed
                if rm.medium <= events_pb2.KV_MEDIUM_DEVICE:
                    idx.remove(key, rm.block_hashes)
                else:
                    tiers.remove(medium_name(rm.medium), key, rm.block_hashes)
            elif kind == "cleared":
                tiers.clear_worker(key)

    def clear_worker(self, instance_id: str, dp_rank: int) -> None:
        self.router.tiers.clear_worker((instance_id, dp_rank))

    def remove_worker(self, instance_id: str) -> None:
        known = set(self.router.indexer.workers)
        for idx in self.router.tiers.lower.values():
            known.update(idx.workers)
        for key in [k for k in known if isinstance(k, tuple) and k[0] == instance_id]:
            self.router.tiers.remove_worker(key)

    def on_load(self, load: events_pb2.LoadMetrics) -> None:
        self.router.set_load(
            (load.instance_id, load.dp_rank), load.active_blocks, load.total_blocks, load.waiting, load.running
        )
