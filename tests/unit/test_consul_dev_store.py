"""consul-dev's Store directly (no HTTP): indexes, TTL timers, sessions and reaping."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st_

from dynamo_grpc.consul_dev.state import CRITICAL, PASSING, Check, ConsulError, Service, Store


def _svc(sid: str, name: str = "web") -> Service:
    return Service(
        id=sid,
        name=name,
        tags=[],
        address="",
        port=1,
        meta={},
        weights={"Passing": 1, "Warning": 1},
        enable_tag_override=False,
    )


def _chk(sid: str, status: str = PASSING, ttl: float = 30.0, dereg: float | None = None) -> Check:
    return Check(
        id=f"service:{sid}",
        name="c",
        service_id=sid,
        service_name="",
        status=status,
        output="",
        notes="",
        ttl=ttl,
        deregister_after=dereg,
        definition={},
    )


async def test_indexes_are_per_service_and_monotonic() -> None:
    st = Store()
    st.register_service(_svc("a1", "a"), [_chk("a1")], False)
    a_idx = st.service_index("a")
    st.register_service(_svc("b1", "b"), [_chk("b1")], False)
    assert st.service_index("a") == a_idx < st.service_index("b")
    st.register_service(_svc("a1", "a"), [_chk("a1")], False)  # identical: no write
    assert st.service_index("a") == a_idx
    st.deregister_service("a1")
    assert st.service_index("a") > a_idx  # an extinct service keeps a (higher) index
    with pytest.raises(ConsulError) as err:
        st.deregister_service("a1")
    assert err.value.status == 404
    await st.close()


async def test_ttl_expiry_invalidates_bound_session_and_deletes_keys() -> None:
    st = Store()
    st.register_service(_svc("w"), [_chk("w", ttl=0.1)], False)
    sess = st.create_session(
        name="",
        node=st.node,
        node_checks=["serfHealth"],
        service_checks=["service:w"],
        behavior="delete",
        ttl="",
        ttl_seconds=0,
        lock_delay=0,
    )
    assert st.kv_put("card", b"{}", flags=0, cas=None, acquire=sess.id, release=None)
    before = st.prefix_index("card")
    await asyncio.sleep(0.25)
    assert st.checks["service:w"].status == CRITICAL
    assert "card" not in st.kv and sess.id not in st.sessions
    assert st.prefix_index("card") > before  # the tombstone keeps the index moving forward
    await st.close()


async def test_blocking_wait_returns_on_change_or_timeout() -> None:
    st = Store()
    idx = st.service_index("web")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await st.block(lambda: st.service_index("web"), idx, 0.2)
    assert loop.time() - t0 >= 0.19
    loop.call_later(0.05, lambda: st.register_service(_svc("x"), [], False))
    t0 = loop.time()
    await st.block(lambda: st.service_index("web"), st.service_index("web"), 5.0)
    assert loop.time() - t0 < 1.0
    await st.close()


async def test_reaper_uses_the_clamped_deadline() -> None:
    st = Store(time_scale=0.001)
    st.register_service(_svc("dead"), [_chk("dead", status=CRITICAL, dereg=60.0 * 0.001)], False)
    st.register_service(_svc("ok"), [_chk("ok", dereg=60.0 * 0.001)], False)
    await asyncio.sleep(0.08)
    assert st.reap() == ["dead"]
    assert "dead" not in st.services and "ok" in st.services
    await st.close()


@settings(max_examples=60, deadline=None)
@given(
    ops=st_.lists(
        st_.tuples(
            st_.sampled_from(["put", "delete", "delete_tree", "cas0"]),
            st_.sampled_from(["a/x", "a/y", "a/b/z", "b/x", "a"]),
        ),
        max_size=40,
    )
)
def test_kv_indexes_never_go_backwards(ops: list[tuple[str, str]]) -> None:
    async def run() -> None:
        store = Store()
        seen = {p: store.prefix_index(p) for p in ("", "a/", "a/b/", "b/")}
        table = store.kvs_index
        for op, key in ops:
            if op == "put":
                store.kv_put(key, b"v", flags=0, cas=None, acquire=None, release=None)
            elif op == "cas0":
                store.kv_put(key, b"w", flags=0, cas=0, acquire=None, release=None)
            elif op == "delete":
                store.kv_delete(key, recurse=False, cas=None)
            else:
                store.kv_delete(key.rsplit("/", 1)[0], recurse=True, cas=None)
            for prefix, before in seen.items():
                now = store.prefix_index(prefix)
                assert now >= before >= 1
                seen[prefix] = now
            assert store.kvs_index >= table
            table = store.kvs_index
        await store.close()

    asyncio.run(run())
