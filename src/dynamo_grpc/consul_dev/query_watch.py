"""Blocked readers of one query share one re-check per write, instead of each waking on every write.

`Store.block` wakes every blocked reader on every commit so that each re-checks its own index. With many
watchers of many queries that is most of consul-dev's work per change: 50 watchers x 17 sharded health
queries are 850 coroutines woken per write (~5 ms of CPU on the 2-vCPU VM), nearly all going back to sleep
because their answer did not change, and all before the first answer leaves (docs/scale-out.md, "Where the
tail comes from"). Here the readers of one query (the health cache's key: service, filters, ACL identity)
wait on that query's event, and one task per query with readers re-checks the answer once per write and
wakes them only when the query's index moved. Same blocking rule as `Store.block` (return on a different
index or after ``wait``); only who wakes changes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Hashable

from dynamo_grpc.consul_dev.state import Store


class _Watch:
    """One query's readers: the index they wait on changing, and the task that re-checks it per write."""

    __slots__ = ("current", "event", "last", "readers", "task")

    def __init__(self, current: Callable[[], int], last: int) -> None:
        self.current = current
        #: the index the readers were told about: set when the watch is made, not when its task first runs,
        #: so a write between a reader blocking and the task starting still wakes it
        self.last = last
        self.event = asyncio.Event()
        self.readers = 0
        self.task: asyncio.Task[None] | None = None


class QueryWatches:
    """Per-query wait lists over one store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._watches: dict[Hashable, _Watch] = {}
        #: re-checks done by watch tasks (one per query per write), for tests and benchmarks
        self.rechecks = 0

    def __len__(self) -> int:
        return len(self._watches)

    async def block(self, key: Hashable, current: Callable[[], int], min_index: int, wait: float) -> None:
        """Consul's blocking rule for the query ``key`` whose index is ``current()``: return once it differs
        from ``min_index`` (at once when it already does, e.g. after an agent restart) or after ``wait``."""
        if min_index <= 0 or current() != min_index:
            return
        w = self._watches.get(key)
        if w is None:
            w = self._watches[key] = _Watch(current, min_index)
            w.task = asyncio.get_running_loop().create_task(self._follow(w))
        w.readers += 1
        try:
            async with asyncio.timeout(wait):
                while w.current() == min_index:
                    await w.event.wait()
        except TimeoutError:
            return
        finally:
            w.readers -= 1
            if not w.readers and self._watches.get(key) is w:
                del self._watches[key]
                if w.task is not None:
                    w.task.cancel()

    async def _follow(self, w: _Watch) -> None:
        """Re-check the query once per write; wake its readers when its index moved."""
        while True:
            now = w.current()  # first at start: writes may have landed since the watch was made
            if now != w.last:
                w.last = now
                event, w.event = w.event, asyncio.Event()
                event.set()
            await self.store.next_commit()
            self.rechecks += 1

    async def close(self) -> None:
        tasks = [w.task for w in self._watches.values() if w.task is not None]
        self._watches.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
