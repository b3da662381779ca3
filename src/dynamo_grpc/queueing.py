"""A bounded wait queue for admission: callers wait here while a resource says "busy", in a chosen order.

The router uses it (Dynamo's router queue, ``--router-queue-size``/``--router-queue-policy``): when every
worker is over its busy threshold a request waits in the router instead of piling onto one engine's
queue, and is placed when load drops, on whichever worker is then best (late binding). Nothing here knows
about routing: an entry is an ``attempt`` callable that either returns a result or raises the ``busy``
exception type, and :meth:`WaitQueue.poke` retries waiting entries in order whenever the owner says
something was freed.

Ordering: ``fcfs`` (arrival) or ``wspt`` (weighted shortest processing time with unit weights: the
smallest ``cost`` first, arrival breaking ties). Under ``wspt`` a large request can wait behind a steady
stream of small ones; the bound on the queue and the caller's deadline limit how long.

``cache-aware``: on a poke the owner's ``choose`` callback sees the ``info`` of the oldest ``lookahead``
waiters (in arrival order) and names the one to place now (for the router: the one with the most KV cached
on a worker that has room), or None when nothing can be placed. Unfairness is bounded by ``age_cap_s``:
once the oldest waiter has waited that long it goes first, ahead of any better-cached one, exactly as
under ``fcfs``; and a waiter beyond the lookahead window is never chosen ahead of the window.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

POLICIES = ("fcfs", "wspt", "cache-aware")

#: cache-aware: given the waiters' ``info`` (oldest first), the index of the one to place now, or None
Chooser = Callable[[Sequence[object]], "int | None"]


class QueueFull(Exception):
    """The wait queue holds its maximum: the caller is refused (RESOURCE_EXHAUSTED)."""


@dataclass(order=True)
class _Entry(Generic[T]):
    key: tuple[float, int]
    attempt: Callable[[], T] = field(compare=False)
    future: asyncio.Future[T] = field(compare=False)
    #: what the cache-aware chooser looks at (the router: the prompt's block hashes)
    info: object = field(default=None, compare=False)
    #: when it started waiting (the age cap)
    since: float = field(default=0.0, compare=False)


class WaitQueue(Generic[T]):
    """Bounded, ordered admission. ``busy`` is the exception an attempt raises when it must wait.

    A caller that goes away (cancelled, deadline) leaves the queue at once; its slot is freed.
    """

    def __init__(
        self,
        capacity: int,
        policy: str = "fcfs",
        busy: type[Exception] = Exception,
        choose: Chooser | None = None,
        age_cap_s: float = 0.0,
        lookahead: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if policy == "cache-aware" and choose is None:
            raise ValueError("the cache-aware policy needs a choose callback")
        if age_cap_s < 0 or lookahead < 1:
            raise ValueError(f"age_cap_s must be >= 0 and lookahead >= 1, got {age_cap_s}, {lookahead}")
        self.capacity = capacity
        self.policy = policy
        self.busy = busy
        self.choose = choose
        #: cache-aware: a waiter this old goes first whatever is cached (0: no cap)
        self.age_cap_s = age_cap_s
        self.lookahead = lookahead
        self.clock = clock
        self._heap: list[_Entry[T]] = []
        self._seq = itertools.count()
        self._poking = False
        #: totals for metrics and tests
        self.enqueued = 0
        self.refused = 0
        self.dispatched = 0
        #: cache-aware: placements that went ahead of an older waiter, and those the age cap forced
        self.overtaken = 0
        self.aged = 0

    def has_waiters(self) -> bool:
        """Cheap check for the owner's hot path (may count a just-cancelled entry until the next poke)."""
        return bool(self._heap)

    def __len__(self) -> int:
        return sum(1 for e in self._heap if not e.future.done())

    async def admit(
        self,
        attempt: Callable[[], T],
        cost: float = 0.0,
        release: Callable[[T], None] | None = None,
        info: object = None,
    ) -> T:
        """``attempt()`` now if nobody is waiting, else (or if it raises ``busy``) wait for a :meth:`poke`.

        Raises QueueFull when the queue is at capacity (a capacity of 0 means no waiting: ``busy`` propagates).
        ``release`` undoes a result the caller can no longer take (it was cancelled as it was placed).
        ``info`` is what the cache-aware chooser sees of this waiter.
        """
        if not len(self):
            try:
                return attempt()
            except self.busy:
                if self.capacity == 0:
                    raise
        elif self.capacity == 0:
            return attempt()
        if len(self) >= self.capacity:
            self.refused += 1
            raise QueueFull(
                f"router queue is full ({self.capacity} requests waiting for a worker under its busy threshold)"
            )
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        n = next(self._seq)
        key = (float(cost), n) if self.policy == "wspt" else (0.0, n)
        heapq.heappush(self._heap, _Entry(key, attempt, fut, info, self.clock()))
        self.enqueued += 1
        self.poke()  # something may have been freed between the attempt and now
        try:
            return await fut
        except BaseException:
            if not fut.done():
                fut.cancel()
            elif not fut.cancelled() and fut.exception() is None and release is not None:
                release(fut.result())  # placed in the same tick the caller went away: give it back
            self._heap = [e for e in self._heap if not e.future.done()]
            heapq.heapify(self._heap)
            raise

    def poke(self) -> int:
        """Retry waiting entries in order until one is still busy; returns how many were placed."""
        if self._poking:
            return 0
        self._poking = True
        placed = 0
        try:
            self._drop_done()
            while self._heap:
                how = "head"
                if self.policy == "cache-aware":
                    head, how = self._chosen()
                    if head is None:
                        break
                else:
                    head = self._heap[0]
                if head.future.done():
                    self._remove(head)
                    continue
                try:
                    result = head.attempt()
                except self.busy:
                    break
                except Exception as exc:  # this request's own failure (no worker, bad input): it alone fails
                    self._remove(head)
                    head.future.set_exception(exc)
                    continue
                self._remove(head)
                head.future.set_result(result)
                self.dispatched += 1
                self.aged += how == "aged"
                self.overtaken += how == "overtook"
                placed += 1
        finally:
            self._poking = False
        return placed

    def _chosen(self) -> tuple[_Entry[T] | None, str]:
        """cache-aware: the oldest waiter once it is past the age cap ("aged"), else the chooser's pick of
        the window ("head" when that is the oldest, "overtook" when not), or None: nothing to place now."""
        assert self.choose is not None
        self._drop_done()
        if not self._heap:
            return None, ""
        oldest = self._heap[0]  # keys are (0, arrival): the heap's head is the oldest
        if self.age_cap_s > 0 and self.clock() - oldest.since >= self.age_cap_s:
            return oldest, "aged"
        window = [e for e in heapq.nsmallest(self.lookahead, self._heap) if not e.future.done()]
        i = self.choose([e.info for e in window])
        if i is None:
            return None, ""
        return window[i], ("overtook" if i > 0 else "head")

    def _remove(self, entry: _Entry[T]) -> None:
        if self._heap and self._heap[0] is entry:
            heapq.heappop(self._heap)
        else:
            self._heap.remove(entry)
            heapq.heapify(self._heap)

    def _drop_done(self) -> None:
        while self._heap and self._heap[0].future.done():
            heapq.heappop(self._heap)

    def fail_all(self, exc: Exception) -> None:
        """Wake every waiter with ``exc`` (shutdown)."""
        for e in self._heap:
            if not e.future.done():
                e.future.set_exception(exc)
        self._heap.clear()
