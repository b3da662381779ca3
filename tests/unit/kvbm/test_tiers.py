"""The tiers on their own: the host pool's LRU, the disk format (torn, corrupt, foreign = miss), restart reuse."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from dynamo_grpc.kvbm.config import KvbmConfig
from dynamo_grpc.kvbm.disk import SUFFIX, CorruptBlock, DiskTier, decode, encode
from dynamo_grpc.kvbm.tier import BlockMeta, HostTier

LAYOUT = "test-layout/v1 block=4"


def meta(h: int) -> BlockMeta:
    return BlockMeta(h, h + 1000, h - 1 if h > 1 else None)


def test_host_pool_evicts_least_recently_used_and_never_a_pinned_slot() -> None:
    host = HostTier(3)
    slots = {h: host.insert(meta(h)) for h in (1, 2, 3)}
    assert host.full and len(set(slots.values())) == 3
    host.touch(1)  # 2 is now the oldest
    slot, victim = host.pop_lru()
    assert victim.block_hash == 2 and slot == slots[2]
    host.insert(meta(4))
    slot, victim = host.pop_lru(skip={slots[3]})  # 3 is oldest but being onboarded
    assert victim.block_hash == 1
    with pytest.raises(LookupError):
        HostTier(1).pop_lru()


def test_block_file_round_trip_and_every_kind_of_damage() -> None:
    payload = bytes(range(256)) * 4
    data = encode(meta(7), LAYOUT, payload)
    assert decode(data, LAYOUT) == (meta(7), payload)
    with pytest.raises(CorruptBlock, match="torn"):
        decode(data[:-10], LAYOUT)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    with pytest.raises(CorruptBlock, match="checksum"):
        decode(bytes(flipped), LAYOUT)
    with pytest.raises(CorruptBlock, match="layout"):
        decode(data, "another-model")
    with pytest.raises(CorruptBlock):
        decode(b"junk", LAYOUT)


def _disk(path: Path, capacity: int = 1 << 20, **kw: int) -> DiskTier:
    return DiskTier(path, capacity, LAYOUT, **kw)


def test_disk_capacity_is_lru_and_announced(tmp_path: Path) -> None:
    size = len(encode(meta(1), LAYOUT, b"x" * 100))
    d = _disk(tmp_path, capacity=3 * size)
    for h in (1, 2, 3):
        assert d.put_async(meta(h), b"x" * 100)
    d.flush()
    assert d.read(1) == b"x" * 100  # 1 is now the most recent
    d.put_async(meta(4), b"x" * 100)
    d.flush()
    assert 2 not in d and {1, 3, 4} <= {m.block_hash for m in d.metas()}
    assert not (tmp_path / f"{2:016x}{SUFFIX}").exists()
    events = d.take_events()
    assert ("removed", [meta(2)]) in events
    assert [m.block_hash for kind, ms in events if kind == "stored" for m in ms] == [1, 2, 3, 4]
    d.close()


def test_a_torn_file_is_a_miss_and_is_deleted(tmp_path: Path) -> None:
    d = _disk(tmp_path)
    d.put_async(meta(5), b"y" * 64)
    d.flush()
    f = tmp_path / f"{5:016x}{SUFFIX}"
    f.write_bytes(f.read_bytes()[:-3])
    assert d.read(5) is None
    assert d.stats.corrupt == 1 and 5 not in d and not f.exists()
    assert ("removed", [meta(5)]) in d.take_events()
    d.close()


def test_restart_reuses_our_files_and_wipes_the_rest(tmp_path: Path) -> None:
    d = _disk(tmp_path)
    for h in (1, 2, 3):
        d.put_async(meta(h), b"z" * 32)
    d.close()
    old = time.time() - 100
    os.utime(tmp_path / f"{1:016x}{SUFFIX}", (old, old))  # 1 was written longest ago
    (tmp_path / f"{9:016x}{SUFFIX}").write_bytes(encode(meta(9), "another-model", b"z" * 32))
    (tmp_path / f"{8:016x}{SUFFIX}").write_bytes(b"garbage")
    (tmp_path / f"{3:016x}{SUFFIX}.tmp").write_bytes(b"half a write")
    (tmp_path / "notes.txt").write_text("not ours: left alone")
    again = _disk(tmp_path)
    assert {m.block_hash for m in again.metas()} == {1, 2, 3}
    assert next(iter(again.metas())).block_hash == 1  # oldest first in eviction order
    assert again.stats.reused == 3 and again.stats.wiped == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{h:016x}{SUFFIX}" for h in (1, 2, 3)] + ["notes.txt"]
    )
    assert again.read(2) == b"z" * 32
    again.close()


def test_a_full_writer_queue_skips_the_offload_instead_of_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = _disk(tmp_path, max_pending=1)
    gate = threading.Event()
    real = d._write

    def slow(m: BlockMeta, payload: bytes) -> None:
        gate.wait(10)
        real(m, payload)

    monkeypatch.setattr(d, "_write", slow)
    assert d.put_async(meta(1), b"a")  # taken by the writer, which now waits
    deadline = time.time() + 5
    while d.pending and time.time() < deadline:
        time.sleep(0.01)
    assert d.put_async(meta(2), b"b")  # fills the queue
    assert not d.put_async(meta(3), b"c")  # full: skipped (put_nowait), the writer is still stuck
    assert d.stats.skipped == 1
    gate.set()
    d.close()
    assert {m.block_hash for m in d.metas()} == {1, 2}


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"host_bytes": -1}, "host_bytes"),
        ({"disk_bytes": 10}, "disk_bytes"),
        ({"disk_dir": "/x"}, "disk_dir"),
        ({"host_gbps": 0.0}, "host_gbps"),
    ],
)
def test_config_names_what_is_wrong(kw: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        KvbmConfig(**kw).validate()  # type: ignore[arg-type]
