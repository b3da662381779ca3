"""The pool of KV blocks: free queue in eviction (LRU) order, the prefix-cache map, KV events.

A block is *cached* once it is full and registered under its sequence hash. It stays cached after
its last user lets go, waiting in the free queue: a new request that hits it takes it back out
(prefix hit); a request that needs fresh blocks takes them from the front of the queue, evicting
whatever was cached there (a KvRemoved event). Every registration is a KvStored event whose parent
chains it to the block before it. Pure bookkeeping: no requests, no timing, no torch, no asyncio;
the engine core owns it, so it is tested on its own.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from dynamo_grpc.events.kv import KvCleared, KvEvent, KvRemoved, KvStored, StoredBlock


class NoFreeBlocks(RuntimeError):
    """More blocks were asked for than the free queue holds (callers check first)."""


@dataclass(eq=False)
class KvBlock:
    block_id: int
    ref_cnt: int = 0
    #: sequence (chained) hash while the block is registered in the prefix cache
    block_hash: int | None = None
    tokens_hash: int | None = None
    parent_hash: int | None = None


class BlockPool:
    """A fixed set of blocks. Events accumulate until :meth:`take_events`."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KvBlock(i) for i in range(num_blocks)]
        # block ids with ref_cnt 0; the first is evicted first (least recently freed)
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached: dict[int, KvBlock] = {}
        self._events: list[KvEvent] = []
        self.evictions = 0
        #: told about each cached block just before it is reused (the KV tiers offload it)
        self.on_evict: Callable[[KvBlock], None] | None = None

    # ------------------------------------------------------------------ queries

    @property
    def num_free(self) -> int:
        """Blocks with no user (some of them still cached, all of them reusable)."""
        return len(self._free)

    @property
    def num_active(self) -> int:
        """Blocks held by at least one request."""
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def lookup(self, block_hash: int) -> KvBlock | None:
        return self._cached.get(block_hash)

    def longest_prefix(self, block_hashes: Sequence[int]) -> list[KvBlock]:
        """Cached blocks for the leading run of ``block_hashes`` (stops at the first miss)."""
        hit: list[KvBlock] = []
        for h in block_hashes:
            b = self._cached.get(h)
            if b is None:
                break
            hit.append(b)
        return hit

    def eviction_order(self) -> list[int]:
        """Free block ids, first to be reused first (for tests and debugging)."""
        return list(self._free)

    # ------------------------------------------------------------------ lifecycle

    def touch(self, blocks: Iterable[KvBlock]) -> None:
        """Take a reference on cached blocks a request reuses; free ones leave the queue."""
        for b in blocks:
            if b.ref_cnt == 0:
                del self._free[b.block_id]
            b.ref_cnt += 1

    def allocate(self, n: int) -> list[KvBlock]:
        """``n`` blocks from the front of the free queue; cached ones among them are evicted."""
        if n > len(self._free):
            raise NoFreeBlocks(f"asked for {n} blocks, {len(self._free)} free")
        out: list[KvBlock] = []
        evicted: list[int] = []
        for _ in range(n):
            bid, _ = self._free.popitem(last=False)
            b = self.blocks[bid]
            if b.block_hash is not None:
                if self._cached.get(b.block_hash) is b:
                    del self._cached[b.block_hash]
                    evicted.append(b.block_hash)
                    if self.on_evict is not None:
                        self.on_evict(b)
                b.block_hash = b.tokens_hash = b.parent_hash = None
            b.ref_cnt = 1
            out.append(b)
        if evicted:
            self.evictions += len(evicted)
            self._events.append(KvRemoved(evicted))
        return out

    def free(self, blocks: Iterable[KvBlock]) -> None:
        """Drop one reference each; blocks reaching zero join the back of the queue in this order.

        Requests free their blocks tail first, so a chain's tail is evicted before its prefix,
        which other requests are likelier to share.
        """
        for b in blocks:
            if b.ref_cnt <= 0:
                raise RuntimeError(f"block {b.block_id} freed more often than taken")
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                self._free[b.block_id] = None

    def register(self, blocks: list[KvBlock], hashes: list[tuple[int, int]], parent: int | None) -> None:
        """Register full blocks under (sequence hash, tokens hash), in chain order after ``parent``.

        When another block already holds a hash (two requests computed the same prefix at once),
        this block stays unregistered and the chain is announced in contiguous runs.
        """
        run: list[StoredBlock] = []
        run_parent = prev = parent
        for b, (seq_hash, tok_hash) in zip(blocks, hashes, strict=True):
            if b.block_hash is not None or seq_hash in self._cached:
                if run:
                    self._events.append(KvStored(run_parent, run))
                    run = []
                run_parent = prev = seq_hash
                continue
            b.block_hash, b.tokens_hash, b.parent_hash = seq_hash, tok_hash, prev
            self._cached[seq_hash] = b
            run.append(StoredBlock(seq_hash, tok_hash))
            prev = seq_hash
        if run:
            self._events.append(KvStored(run_parent, run))

    def register_chain(
        self, table: Sequence[KvBlock], block_hashes: Sequence[int], tokens_hashes: Sequence[int], done: int, full: int
    ) -> None:
        """Register ``table[done:full]``, the next full blocks of a request whose first ``done`` are cached.

        ``block_hashes``/``tokens_hashes`` are the request's hash chain; the parent of the new run
        is the sequence hash of block ``done - 1``.
        """
        parent = block_hashes[done - 1] if done else None
        hashes = list(zip(block_hashes[done:full], tokens_hashes[done:full], strict=True))
        self.register(list(table[done:full]), hashes, parent)

    def uncache(self, blocks: Iterable[KvBlock]) -> None:
        """Withdraw blocks from the prefix cache (their contents cannot be trusted); a KvRemoved."""
        gone: list[int] = []
        for b in blocks:
            if b.block_hash is not None and self._cached.get(b.block_hash) is b:
                del self._cached[b.block_hash]
                gone.append(b.block_hash)
            b.block_hash = b.tokens_hash = b.parent_hash = None
        if gone:
            self._events.append(KvRemoved(gone))

    def clear(self) -> bool:
        """Forget every cached block; only possible while no block is in use. Emits KvCleared."""
        if self.num_active:
            return False
        for b in self._cached.values():
            b.block_hash = b.tokens_hash = b.parent_hash = None
        self._cached.clear()
        self._events.append(KvCleared())
        return True

    # ------------------------------------------------------------------ events

    def take_events(self) -> list[KvEvent]:
        events, self._events = self._events, []
        return events

    def dump(self) -> list[KvStored]:
        """Every cached block as Stored events, parents before children, one event per linear run."""
        children: dict[int | None, list[KvBlock]] = {}
        for b in self._cached.values():
            parent = b.parent_hash if b.parent_hash in self._cached else None
            children.setdefault(parent, []).append(b)
        out: list[KvStored] = []
        stack = list(reversed(children.get(None, [])))
        while stack:
            chain = [stack.pop()]
            while len(kids := children.get(chain[-1].block_hash, [])) == 1:
                chain.append(kids[0])
            out.append(
                KvStored(
                    chain[0].parent_hash,
                    [StoredBlock(int(c.block_hash or 0), int(c.tokens_hash or 0)) for c in chain],
                )
            )
            stack.extend(reversed(children.get(chain[-1].block_hash, [])))
        return out
