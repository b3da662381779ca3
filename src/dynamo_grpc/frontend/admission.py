"""Frontend admission control: at most N requests run, at most M wait, the rest are refused at once.

Memory stays bounded under any load: a request beyond both bounds gets `errors.Overloaded`
(RESOURCE_EXHAUSTED / HTTP 429 + Retry-After). Admission is O(1) and awaits nothing while a slot is free
(the common case adds no task switch). Which waiting request goes next is a `QueuePolicy` (FCFS here;
a later change adds Dynamo's WSPT ordering by passing another policy).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

from dynamo_grpc import errors


class QueuePolicy(Protocol):
    """Orders waiting requests; `priority` is the policy's own key (FCFS ignores it)."""

    def push(self, waiter: asyncio.Future[None], priority: float) -> None: ...

    def pop(self) -> asyncio.Future[None]: ...

    def __len__(self) -> int: ...


class Fcfs:
    """First come, first served."""

    def __init__(self) -> None:
        self._q: collections.deque[asyncio.Future[None]] = collections.deque()

    def push(self, waiter: asyncio.Future[None], priority: float) -> None:
        self._q.append(waiter)

    def pop(self) -> asyncio.Future[None]:
        return self._q.popleft()

    def __len__(self) -> int:
        return len(self._q)


class Admission:
    """Bounded running and waiting counts for one frontend; `slot()` holds one running place."""

    def __init__(self, max_inflight: int, max_queued: int, policy: QueuePolicy | None = None) -> None:
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.policy: QueuePolicy = policy or Fcfs()
        self.inflight = 0
        self.waiting = 0  # live waiters (the policy may still hold cancelled ones, skipped on pop)
        self.rejected = 0

    @contextlib.asynccontextmanager
    async def slot(self, priority: float = 0.0) -> AsyncIterator[None]:
        await self.acquire(priority)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, priority: float = 0.0) -> None:
        if self.inflight < self.max_inflight and not self.waiting:
            self.inflight += 1
            return
        if self.waiting >= self.max_queued:
            self.rejected += 1
            raise errors.Overloaded(
                f"frontend overloaded: {self.inflight} requests running (--max-inflight-requests) and "
                f"{self.waiting} waiting (--max-queued-requests); retry later"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.policy.push(waiter, priority)
        self.waiting += 1
        try:
            await waiter  # `release` hands its running place over: `inflight` is unchanged
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a place just as the client left: pass it on
            else:
                self.waiting -= 1
                waiter.cancel()
            raise

    def release(self) -> None:
        while len(self.policy):
            waiter = self.policy.pop()
            if not waiter.done():
                self.waiting -= 1
                waiter.set_result(None)
                return
        self.inflight -= 1
