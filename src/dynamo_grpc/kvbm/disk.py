"""G3: KV blocks as files on a local disk, written off the engine's step by one writer thread.

One file per block, named by its sequence hash. The header carries the layout (what the bytes
mean: model, dtype, geometry — a file of another layout is never loaded), the block's hashes and
an xxh3 checksum over header and payload, so a torn or corrupt file reads as a miss (and is
deleted), never as wrong KV data. Files are written to a temporary name and renamed into place.

On start the directory is reused: every file whose header parses and whose layout matches is
indexed (least recently modified evicted first) and announced by the worker's KV dump; other
files (another model, a torn write, junk) are deleted. Payload checksums are checked on read.
"""

from __future__ import annotations

import logging
import os
import queue
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import xxhash

from .tier import BlockMeta, Medium

log = logging.getLogger(__name__)

MAGIC = b"DGKV"
VERSION = 1
SUFFIX = ".kvb"
#: magic, version, has_parent, layout length, payload length, block hash, tokens hash, parent hash
_HEAD = struct.Struct("<4sHHIQQQQ")
_SUM = struct.Struct("<Q")


def encode(meta: BlockMeta, layout: str, payload: bytes) -> bytes:
    """A block file's bytes: header, layout, payload, then the checksum of all of them."""
    lay = layout.encode()
    head = _HEAD.pack(
        MAGIC,
        VERSION,
        meta.parent_hash is not None,
        len(lay),
        len(payload),
        meta.block_hash,
        meta.tokens_hash,
        meta.parent_hash or 0,
    )
    h = xxhash.xxh3_64()
    for part in (head, lay, payload):
        h.update(part)
    return b"".join((head, lay, payload, _SUM.pack(h.intdigest())))


class CorruptBlock(ValueError):
    """The file is torn, corrupt, or of another layout."""


def decode_header(data: bytes, layout: str) -> tuple[BlockMeta, int, int]:
    """(metadata, payload offset, payload length) from a file's first bytes; CorruptBlock if wrong."""
    if len(data) < _HEAD.size:
        raise CorruptBlock("short header")
    magic, version, has_parent, lay_len, pay_len, bh, th, ph = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise CorruptBlock("not a block file of this version")
    lay = data[_HEAD.size : _HEAD.size + lay_len]
    if lay != layout.encode():
        raise CorruptBlock(f"layout {lay[:80]!r} is not ours")
    return BlockMeta(bh, th, ph if has_parent else None), _HEAD.size + lay_len, pay_len


def decode(data: bytes, layout: str) -> tuple[BlockMeta, bytes]:
    """Metadata and payload of a whole file; CorruptBlock on a bad header, length or checksum."""
    meta, off, n = decode_header(data, layout)
    if len(data) != off + n + _SUM.size:
        raise CorruptBlock(f"size {len(data)} != {off + n + _SUM.size} (torn write?)")
    (want,) = _SUM.unpack_from(data, off + n)
    if xxhash.xxh3_64_intdigest(data[: off + n]) != want:
        raise CorruptBlock("checksum mismatch")
    return meta, data[off : off + n]


@dataclass
class DiskStats:
    writes: int = 0
    written_bytes: int = 0
    reads: int = 0
    read_bytes: int = 0
    #: files found corrupt or torn on read (served as a miss and deleted)
    corrupt: int = 0
    #: offloads dropped because the writer queue was full
    skipped: int = 0
    #: files reused from an earlier run / deleted at start
    reused: int = 0
    wiped: int = 0
    write_errors: int = 0


class DiskTier:
    """G3, bounded by bytes, LRU. Thread-safe: the writer thread and the engine thread share it."""

    medium = Medium.DISK

    def __init__(
        self, directory: str | Path, capacity_bytes: int, layout: str, max_pending: int = 256, block_bytes: int = 0
    ) -> None:
        """``block_bytes``: the least a file counts against the capacity (the mocker's files are
        headers only, yet stand for modelled blocks of that size)."""
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity_bytes
        self.layout = layout
        self.block_bytes = block_bytes
        self.stats = DiskStats()
        self._lock = threading.Lock()
        self._index: OrderedDict[int, tuple[BlockMeta, int]] = OrderedDict()
        self._used = 0
        #: (medium event kind, metas) produced by the writer thread, taken by the engine step
        self._events: list[tuple[str, list[BlockMeta]]] = []
        self._queue: queue.Queue[tuple[BlockMeta, bytes] | None] = queue.Queue(max_pending)
        self._scan()
        self._thread = threading.Thread(target=self._writer, name="kvbm-disk-writer", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- start-up

    def _path(self, block_hash: int) -> Path:
        return self.dir / f"{block_hash:016x}{SUFFIX}"

    def _scan(self) -> None:
        """Reuse files of our layout (oldest first in LRU order); delete everything else we own."""
        found: list[tuple[float, BlockMeta, int]] = []
        for p in self.dir.iterdir():
            if p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)  # a write interrupted by the last exit
                self.stats.wiped += 1
                continue
            if not p.name.endswith(SUFFIX):
                continue
            try:
                with p.open("rb") as f:
                    head = f.read(_HEAD.size + 4096)
                meta, off, n = decode_header(head, self.layout)
                size = p.stat().st_size
                if size != off + n + _SUM.size or p.name != self._path(meta.block_hash).name:
                    raise CorruptBlock("size or name does not match the header")
                found.append((p.stat().st_mtime, meta, max(size, self.block_bytes)))
            except (OSError, CorruptBlock) as e:
                log.info("kvbm: deleting %s from the G3 directory (%s)", p.name, e)
                p.unlink(missing_ok=True)
                self.stats.wiped += 1
        for _, meta, size in sorted(found, key=lambda x: x[0]):
            self._index[meta.block_hash] = (meta, size)
            self._used += size
        self.stats.reused = len(found)
        with self._lock:
            self._evict_to(self.capacity)
        self._events.clear()  # files dropped over capacity at start were never announced

    # ---------------------------------------------------------------- queries

    def __contains__(self, block_hash: object) -> bool:
        with self._lock:
            return block_hash in self._index

    def __len__(self) -> int:
        return len(self._index)

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def metas(self) -> Iterator[BlockMeta]:
        with self._lock:
            return iter([m for m, _ in self._index.values()])

    # ---------------------------------------------------------------- writes (off the step)

    def put_async(self, meta: BlockMeta, payload: bytes) -> bool:
        """Queue a block for the writer; False (counted as skipped) when the queue is full."""
        with self._lock:
            if meta.block_hash in self._index:
                self._index.move_to_end(meta.block_hash)
                return True
        try:
            self._queue.put_nowait((meta, payload))
        except queue.Full:
            self.stats.skipped += 1
            return False
        return True

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            finally:
                self._queue.task_done()

    def _write(self, meta: BlockMeta, payload: bytes) -> None:
        data = encode(meta, self.layout, payload)
        size = max(len(data), self.block_bytes)
        if size > self.capacity:
            self.stats.skipped += 1
            return
        path = self._path(meta.block_hash)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with tmp.open("wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            self.stats.write_errors += 1
            log.warning("kvbm: G3 write of %016x failed: %s", meta.block_hash, e)
            tmp.unlink(missing_ok=True)
            return
        with self._lock:
            old = self._index.pop(meta.block_hash, None)
            if old is not None:
                self._used -= old[1]
            self._evict_to(self.capacity - size)
            self._index[meta.block_hash] = (meta, size)
            self._used += size
            if old is None:
                self._events.append(("stored", [meta]))
            self.stats.writes += 1
            self.stats.written_bytes += len(payload)

    def _evict_to(self, limit: int) -> None:
        """Delete least recently used files until at most ``limit`` bytes are used (lock held)."""
        gone: list[BlockMeta] = []
        while self._index and self._used > limit:
            h, (meta, size) = self._index.popitem(last=False)
            self._used -= size
            self._path(h).unlink(missing_ok=True)
            gone.append(meta)
        if gone:
            self._events.append(("removed", gone))

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued write is on disk (tests, shutdown)."""
        self._queue.join()

    # ---------------------------------------------------------------- reads (onboard)

    def read(self, block_hash: int) -> bytes | None:
        """The block's payload, or None when absent, torn or corrupt (a corrupt file is deleted)."""
        with self._lock:
            entry = self._index.get(block_hash)
            if entry is None:
                return None
            self._index.move_to_end(block_hash)
        path = self._path(block_hash)
        try:
            data = path.read_bytes()
            meta, payload = decode(data, self.layout)
            if meta.block_hash != block_hash:
                raise CorruptBlock("header names another block")
        except (OSError, CorruptBlock) as e:
            log.warning("kvbm: G3 block %016x unreadable (%s): recomputing it", block_hash, e)
            self.stats.corrupt += 1
            with self._lock:
                if self._index.pop(block_hash, None) is not None:
                    self._used -= entry[1]
                    self._events.append(("removed", [entry[0]]))
            path.unlink(missing_ok=True)
            return None
        self.stats.reads += 1
        self.stats.read_bytes += len(payload)
        return payload

    def take_events(self) -> list[tuple[str, list[BlockMeta]]]:
        with self._lock:
            ev, self._events = self._events, []
        return ev

    def close(self) -> None:
        """Finish queued writes and stop the writer (the files stay for the next start)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
