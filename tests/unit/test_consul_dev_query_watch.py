"""consul_dev/query_watch.py: blocked readers of one query wake once its index moves, and only then.

Against the real Store (writes through its public methods): 40 readers of service "a" and 10 of service "b"
block; writes to "b" and to the KV store leave "a"'s readers asleep and cost one re-check per *query*, not per
reader; a write to "a" wakes all of its readers with the new index; the wait still ends on time; a reader that
leaves (a client that hangs up) takes its query's watch with it when it was the last.
"""

from __future__ import annotations

import asyncio

from dynamo_grpc.consul_dev.query_watch import QueryWatches
from dynamo_grpc.consul_dev.state import PASSING, Check, Service, Store


def _register(st: Store, sid: str, name: str) -> None:
    svc = Service(id=sid, name=name, tags=[], address="", port=1, meta={}, weights={"Passing": 1, "Warning": 1},
                  enable_tag_override=False)  # fmt: skip
    chk = Check(id=f"service:{sid}", name="c", service_id=sid, service_name="", status=PASSING, output="", notes="",
                ttl=30.0, deregister_after=None, definition={})  # fmt: skip
    st.register_service(svc, [chk], False)


async def test_readers_wake_only_when_their_query_changes() -> None:
    st = Store()
    _register(st, "a1", "a")
    _register(st, "b1", "b")
    watches = QueryWatches(st)
    idx_a, idx_b = st.service_index("a"), st.service_index("b")

    def reader(name: str, since: int) -> asyncio.Task[None]:
        return asyncio.create_task(watches.block(("health", name), lambda: st.service_index(name), since, 30.0))

    readers_a = [reader("a", idx_a) for _ in range(40)]
    readers_b = [reader("b", idx_b) for _ in range(10)]
    await asyncio.sleep(0.05)
    assert len(watches) == 2 and not any(t.done() for t in readers_a + readers_b)

    _register(st, "b2", "b")  # another service changes
    st.kv_put("some/key", b"v", flags=0, cas=None, acquire=None, release=None)  # so does the KV store
    await asyncio.wait_for(asyncio.gather(*readers_b), 5)
    await asyncio.sleep(0.05)
    assert not any(t.done() for t in readers_a)  # "a" did not change: its 40 readers sleep on
    assert watches.rechecks <= 2 * 2  # two writes, at most two queries re-checked each (not 50 readers)

    _register(st, "a2", "a")
    await asyncio.wait_for(asyncio.gather(*readers_a), 5)
    assert st.service_index("a") > idx_a
    await asyncio.sleep(0)
    assert len(watches) == 0  # the last reader took the watch (and its task) with it


async def test_wait_ends_on_time_and_a_stale_index_returns_at_once() -> None:
    st = Store()
    _register(st, "a1", "a")
    watches = QueryWatches(st)
    idx = st.service_index("a")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await watches.block("q", lambda: st.service_index("a"), idx, 0.2)
    assert loop.time() - t0 >= 0.19 and len(watches) == 0
    t0 = loop.time()
    await watches.block("q", lambda: st.service_index("a"), idx - 1, 30.0)  # behind: answer at once
    await watches.block("q", lambda: st.service_index("a"), idx + 5, 30.0)  # ahead (agent restarted): at once
    assert loop.time() - t0 < 0.1


async def test_a_reader_that_leaves_is_forgotten_and_the_others_still_wake() -> None:
    st = Store()
    _register(st, "a1", "a")
    watches = QueryWatches(st)
    idx = st.service_index("a")
    gone = asyncio.create_task(watches.block("q", lambda: st.service_index("a"), idx, 30.0))
    stays = asyncio.create_task(watches.block("q", lambda: st.service_index("a"), idx, 30.0))
    await asyncio.sleep(0.05)
    gone.cancel()  # the client hung up
    await asyncio.sleep(0.05)
    assert len(watches) == 1
    _register(st, "a2", "a")
    await asyncio.wait_for(stays, 5)
    await asyncio.sleep(0)
    assert len(watches) == 0
    await watches.close()


async def test_a_write_before_the_watch_task_first_runs_still_wakes_the_reader() -> None:
    """The reader blocks, and the service changes before the watch's task has run once: the reader must wake
    (it once slept until its wait ran out, and a frontend missed a worker that had just registered)."""
    st = Store()
    _register(st, "a1", "a")
    watches = QueryWatches(st)
    idx = st.service_index("a")
    reader = asyncio.create_task(watches.block("q", lambda: st.service_index("a"), idx, 30.0))
    await asyncio.sleep(0)  # the reader is blocked; the watch task is created but has not run yet
    _register(st, "a2", "a")
    await asyncio.wait_for(reader, 5)
    assert st.service_index("a") > idx
    await watches.close()
