"""The router's per-tier index: events with a medium, weighted overlap, and a replayed view that agrees.

Events go through the real codec (engine dataclasses -> events.proto -> the router's sink), as a
worker's publisher and a router's subscriber would move them.
"""

from __future__ import annotations

import pytest

from dynamo_grpc.events.codec import event_to_pb, make_batch
from dynamo_grpc.events.kv import KvEvent, KvRemoved, KvStored, StoredBlock
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.flags import add_router_flags, router_config_from_args
from dynamo_grpc.router.router import RouteInput, Router, WorkerInfo
from dynamo_grpc.router.sync import IndexSink
from dynamo_grpc.v1 import events_pb2

CHAIN = [101, 102, 103, 104]


def _stored(hashes: list[int], medium: str = "device") -> KvStored:
    return KvStored(None, [StoredBlock(h, h) for h in hashes], medium)


def _router(**kw: object) -> tuple[Router, IndexSink]:
    r = Router(RouterConfig(block_size=4, seed=1, **kw))  # type: ignore[arg-type]
    r.set_workers([WorkerInfo(f"w{i}", f"127.0.0.1:{9000 + i}", block_size=4) for i in range(3)])
    r.ready = True
    return r, IndexSink(r)


def _feed(sink: IndexSink, worker: str, events: list[KvEvent], seq: int = 1) -> None:
    sink.apply_batch(make_batch(worker, 0, seq, 7, 4, events, 0.0))


def test_overlap_credit_by_tier() -> None:
    r, sink = _router()
    _feed(sink, "w0", [_stored(CHAIN)])
    _feed(sink, "w1", [_stored(CHAIN[:2]), _stored(CHAIN[2:], "host")])
    _feed(sink, "w2", [_stored(CHAIN, "disk")])
    got = r.tiers.overlaps(CHAIN)
    assert got[("w0", 0)] == 4.0
    assert got[("w1", 0)] == pytest.approx(2 + 2 * 0.75)
    assert got[("w2", 0)] == pytest.approx(4 * 0.25)


def test_a_host_hit_beats_recompute_and_loses_to_a_device_hit() -> None:
    r, sink = _router()
    _feed(sink, "w1", [_stored(CHAIN, "host")])  # only w1 holds the prefix, in host memory
    assert r.route(RouteInput(request_id="a", block_hashes=CHAIN, dry_run=True)).instance_id == "w1"
    _feed(sink, "w2", [_stored(CHAIN)], seq=1)
    assert r.route(RouteInput(request_id="b", block_hashes=CHAIN, dry_run=True)).instance_id == "w2"


def test_offload_moves_a_block_between_tiers_and_removal_per_tier() -> None:
    r, sink = _router()
    _feed(sink, "w0", [_stored(CHAIN)])
    # the engine evicts the tail two blocks into host memory: removed from device + stored in host
    _feed(sink, "w0", [KvRemoved(CHAIN[2:]), _stored(CHAIN[2:], "host")], seq=2)
    assert r.tiers.overlaps(CHAIN)[("w0", 0)] == pytest.approx(2 + 2 * 0.75)
    _feed(sink, "w0", [KvRemoved(CHAIN[3:], "host"), _stored(CHAIN[3:], "disk")], seq=3)
    assert r.tiers.overlaps(CHAIN)[("w0", 0)] == pytest.approx(2 + 0.75 + 0.25)
    _feed(sink, "w0", [KvRemoved(CHAIN[3:], "disk")], seq=4)
    assert r.tiers.overlaps(CHAIN)[("w0", 0)] == pytest.approx(2.75)
    sink.clear_worker("w0", 0)
    assert r.tiers.overlaps(CHAIN) == {}


def test_a_full_dump_rebuilds_the_same_per_tier_view() -> None:
    live, sink = _router()
    history: list[list[KvEvent]] = [
        [_stored(CHAIN)],
        [KvRemoved(CHAIN[1:]), KvStored(CHAIN[0], [StoredBlock(h, h) for h in CHAIN[1:]], "host")],
        [KvRemoved(CHAIN[2:], "host"), KvStored(CHAIN[1], [StoredBlock(h, h) for h in CHAIN[2:]], "disk")],
    ]
    for seq, events in enumerate(history, 1):
        _feed(sink, "w0", events, seq)
    # the worker's dump: what each tier holds now, one Stored per medium
    dump = [_stored(CHAIN[:1]), _stored(CHAIN[1:2], "host"), _stored(CHAIN[2:], "disk")]
    replayed, rsink = _router()
    rsink.clear_worker("w0", 0)
    _feed(rsink, "w0", dump, 1)
    assert replayed.tiers.overlaps(CHAIN) == live.tiers.overlaps(CHAIN)
    for t in ("device", "host", "disk"):
        assert replayed.tiers.tiers_of(("w0", 0))[t] == live.tiers.tiers_of(("w0", 0))[t]


def test_medium_is_additive_on_the_wire() -> None:
    old = events_pb2.KvEvent(stored=events_pb2.BlockStored(blocks=[events_pb2.StoredBlock(block_hash=1)]))
    assert not old.stored.medium  # an old publisher's event reads as device
    pb = event_to_pb(_stored([1], "disk"))
    assert pb.stored.medium == events_pb2.KV_MEDIUM_DISK
    assert event_to_pb(_stored([1])).stored.medium == events_pb2.KV_MEDIUM_UNSPECIFIED


def test_weights_are_flags_with_env_and_checked() -> None:
    import argparse

    p = argparse.ArgumentParser()
    add_router_flags(p)
    cfg = router_config_from_args(p.parse_args(["--router-host-overlap-weight", "0.5"]))
    assert cfg.host_overlap_weight == 0.5 and cfg.disk_overlap_weight == 0.25
    with pytest.raises(ValueError, match="--router-disk-overlap-weight"):
        router_config_from_args(p.parse_args(["--router-disk-overlap-weight", "1.5"]))
