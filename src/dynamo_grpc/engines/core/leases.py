"""KV leases: the blocks of a finished prefill, pinned until a decode worker pulls them, releases them, or they expire.

A prefill request asks the core to hold its KV (``hold_kv``); when it finishes, its block table is
moved here instead of being freed, under a lease id. A lease is pulled once (``begin_pull`` → the
decoder streams the blocks → ``end_pull`` frees them); a second pull is a FailedPrecondition, an
unknown or expired lease a NotFound. ``release`` is idempotent. Expiry frees a lease nobody claimed
(a decoder that died, a frontend that gave up). Pure bookkeeping over the block pool, like the pool
itself: the engine core calls it under its lock, and the clock is injectable for tests.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from dynamo_grpc import errors

from .block_pool import BlockPool, KvBlock

#: pulled/expired lease ids remembered, so a late second pull says why (FAILED_PRECONDITION / NOT_FOUND)
_TOMBSTONES = 4096


@dataclass
class Lease:
    lease_id: str
    blocks: list[KvBlock]
    #: prompt tokens the blocks cover (the last block may be partial)
    num_tokens: int
    block_hashes: list[int]
    expires_at: float
    #: unix ms of expires_at, for the handle
    expiry_unix_ms: int
    pulling: bool = False

    @property
    def block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]


@dataclass
class LeaseStats:
    created: int = 0
    pulled: int = 0
    released: int = 0
    expired: int = 0
    #: pulls refused (twice, unknown, expired)
    refused: int = 0


@dataclass
class LeaseTable:
    pool: BlockPool
    lease_seconds: float = 30.0
    clock: Callable[[], float] = time.monotonic
    leases: dict[str, Lease] = field(default_factory=dict)
    stats: LeaseStats = field(default_factory=LeaseStats)
    _gone: OrderedDict[str, str] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if self.lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, got {self.lease_seconds}")

    @property
    def num_active(self) -> int:
        return len(self.leases)

    @property
    def num_blocks(self) -> int:
        """Blocks pinned by leases now."""
        return sum(len(lease.blocks) for lease in self.leases.values())

    def create(self, lease_id: str, blocks: list[KvBlock], num_tokens: int, block_hashes: list[int]) -> Lease:
        """Pin ``blocks`` (their references move from the request to the lease)."""
        now = self.clock()
        expiry_ms = int((time.time() + self.lease_seconds) * 1000)
        lease = Lease(lease_id, blocks, num_tokens, block_hashes, now + self.lease_seconds, expiry_ms)
        self.leases[lease_id] = lease
        self.stats.created += 1
        return lease

    def _refuse(self, lease_id: str) -> errors.DynamoError:
        self.stats.refused += 1
        why = self._gone.get(lease_id)
        if why == "pulled":
            return errors.FailedPrecondition(f"KV lease {lease_id!r} was already pulled")
        if why == "expired":
            return errors.NotFound(f"KV lease {lease_id!r} expired ({self.lease_seconds:g} s) and its blocks are freed")
        if why == "released":
            return errors.NotFound(f"KV lease {lease_id!r} was released")
        return errors.NotFound(f"no KV lease {lease_id!r} here")

    def begin_pull(self, lease_id: str) -> Lease:
        """Claim a lease for one pull; it no longer expires while the pull runs."""
        lease = self.leases.get(lease_id)
        if lease is None or (not lease.pulling and lease.expires_at <= self.clock()):
            if lease is not None:
                self._drop(lease, "expired")
                self.stats.expired += 1
            raise self._refuse(lease_id)
        if lease.pulling:
            self.stats.refused += 1
            raise errors.FailedPrecondition(f"KV lease {lease_id!r} is being pulled already")
        lease.pulling = True
        return lease

    def end_pull(self, lease_id: str) -> bool:
        """The pull finished (or failed): free the blocks either way (a decoder that failed prefills locally)."""
        lease = self.leases.get(lease_id)
        if lease is None:
            return False
        self._drop(lease, "pulled")
        self.stats.pulled += 1
        return True

    def release(self, lease_id: str) -> bool:
        """Free a lease early; False when it is not (or no longer) here."""
        lease = self.leases.get(lease_id)
        if lease is None:
            return False
        self._drop(lease, "released")
        self.stats.released += 1
        return True

    def expire(self) -> int:
        """Free every lease past its expiry that no pull holds; returns how many."""
        now = self.clock()
        old = [lease for lease in self.leases.values() if not lease.pulling and lease.expires_at <= now]
        for lease in old:
            self._drop(lease, "expired")
        self.stats.expired += len(old)
        return len(old)

    def release_all(self) -> int:
        n = len(self.leases)
        for lease in list(self.leases.values()):
            self._drop(lease, "released")
        self.stats.released += n
        return n

    def _drop(self, lease: Lease, why: str) -> None:
        self.leases.pop(lease.lease_id, None)
        blocks, lease.blocks = lease.blocks, []
        if blocks:
            self.pool.free(reversed(blocks))
        self._gone[lease.lease_id] = why
        while len(self._gone) > _TOMBSTONES:
            self._gone.popitem(last=False)
