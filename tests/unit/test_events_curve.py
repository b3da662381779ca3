"""ZeroMQ CURVE on the event plane, over real sockets on 127.0.0.1.

A publisher with CURVE delivers only to subscribers whose public key is on its allow-list and
who know its public key; key material comes from files, Z85 strings, flags or the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from dynamo_grpc.events.kv import KvStored, LoadMetrics, StoredBlock
from dynamo_grpc.events import KvEventPublisher
from dynamo_grpc.events.curve import (
    ENV_ALLOW,
    ENV_SECRET_KEY,
    ZMQ_PUBLIC_KEY_META,
    CurveConfig,
    CurveError,
    add_curve_flags,
    generate_keypair,
    load_allowed,
    load_keypair,
    main,
)
from dynamo_grpc.events.sockets import MAX_TOPIC_BYTES, connect_sub, open_sub
from dynamo_grpc.events.subscriber import KvEventSubscriber
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.replicas import ActiveSync
from dynamo_grpc.router.router import ActiveChange, Router
from dynamo_grpc.v1 import events_pb2


class Keys:
    """Key pairs in a directory: a publisher, an allowed subscriber, a stranger."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.allow_dir = root / "allow"
        self.allow_dir.mkdir()
        self.secrets: dict[str, Path] = {}
        for name in ("server", "client", "stranger", "other_server"):
            public, secret = generate_keypair(root / "keys", name)
            self.secrets[name] = secret
            if name == "client":
                (self.allow_dir / public.name).write_bytes(public.read_bytes())

    def config(self, name: str, allow: bool = True) -> CurveConfig:
        cfg = CurveConfig.load(str(self.secrets[name]), str(self.allow_dir) if allow else None)
        assert cfg is not None
        return cfg


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


def stored(*hashes: int) -> KvStored:
    return KvStored(None, [StoredBlock(h, h + 1) for h in hashes])


def test_keypair_files_z85_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    public_file, secret_file = generate_keypair(tmp_path, "w")
    assert public_file.name == "w.key" and secret_file.name == "w.key_secret"
    assert secret_file.stat().st_mode & 0o077 == 0  # the secret is private to its owner
    public, secret = load_keypair(str(secret_file))
    assert len(public) == 40 and zmq.curve_public(secret) == public
    # a bare Z85 secret, in a file or as the value itself (e.g. from a Kubernetes secret in the env)
    (tmp_path / "bare").write_text(secret.decode() + "\n")
    assert load_keypair(str(tmp_path / "bare")) == (public, secret)
    assert load_keypair(secret.decode()) == (public, secret)
    # allow-lists: a directory of .key files, one cert file, or Z85 lines with comments
    assert load_allowed(str(tmp_path)) == {public}
    assert load_allowed(str(public_file)) == {public}
    other, _ = zmq.curve_keypair()
    (tmp_path / "list.txt").write_text(f"# routers\n{public.decode()}\n\n{other.decode()}  # replica 2\n")
    assert load_allowed(str(tmp_path / "list.txt")) == {public, other}

    assert main(["gen", str(tmp_path / "cli"), "--name", "router"]) == 0
    out = capsys.readouterr().out
    cli_public, _ = load_keypair(str(tmp_path / "cli" / "router.key_secret"))
    assert cli_public.decode() in out


def test_bad_key_material_is_refused_naming_the_flag(tmp_path: Path) -> None:
    public_file, _ = generate_keypair(tmp_path, "w")
    with pytest.raises(CurveError, match=r"--zmq-curve-secret-key .*no secret-key"):
        load_keypair(str(public_file))
    with pytest.raises(CurveError, match="--zmq-curve-secret-key"):
        load_keypair("not-a-key")
    (tmp_path / "junk").write_text("hello\n")
    with pytest.raises(CurveError, match="--zmq-curve-secret-key"):
        load_keypair(str(tmp_path / "junk"))
    with pytest.raises(CurveError, match=r"--zmq-curve-allow .*no such"):
        load_allowed(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurveError, match=r"--zmq-curve-allow .*no public keys"):
        load_allowed(str(tmp_path / "empty"))
    with pytest.raises(CurveError, match="--zmq-curve-allow"):
        load_allowed(str(tmp_path / "junk"))
    with pytest.raises(CurveError, match="needs --zmq-curve-secret-key"):
        CurveConfig.load(None, str(tmp_path))


def test_flags_and_env(keys: Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    def parse(argv: list[str]) -> CurveConfig | None:
        p = argparse.ArgumentParser()
        add_curve_flags(p)
        return CurveConfig.from_args(p.parse_args(argv))

    monkeypatch.delenv(ENV_SECRET_KEY, raising=False)
    monkeypatch.delenv(ENV_ALLOW, raising=False)
    assert parse([]) is None  # off by default
    cfg = parse(["--zmq-curve-secret-key", str(keys.secrets["server"]), "--zmq-curve-allow", str(keys.allow_dir)])
    assert cfg is not None and cfg.allowed == {keys.config("client").public_key}
    monkeypatch.setenv(ENV_SECRET_KEY, str(keys.secrets["client"]))
    env_cfg = parse([])
    assert env_cfg is not None and env_cfg.public_key == keys.config("client").public_key
    assert env_cfg.allowed is None  # may subscribe, may not publish
    assert CurveConfig.from_env() == env_cfg
    monkeypatch.setenv(ENV_ALLOW, str(keys.allow_dir))
    assert parse([]) == keys.config("client")


def test_publishing_needs_an_allow_list(keys: Keys) -> None:
    with pytest.raises(CurveError, match="--zmq-curve-allow"):
        KvEventPublisher("w", "m", 16, curve=keys.config("server", allow=False))


def test_topics_beyond_the_subscription_bound_are_refused() -> None:
    with pytest.raises(ValueError, match="topic"):
        KvEventPublisher("w", "m" * MAX_TOPIC_BYTES, 16)


def test_only_the_allowed_subscriber_with_the_right_server_key_receives(
    keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "dynamo_grpc.events.curve")
    pub = KvEventPublisher("w-1", "m", 16, curve=keys.config("server"))
    assert pub.meta() == {"zmq_endpoint": pub.endpoint, ZMQ_PUBLIC_KEY_META: pub.public_key}
    ctx = zmq.Context.instance()
    socks = {name: open_sub(ctx, [b"kv.m"]) for name in ("allowed", "stranger", "wrong_server_key", "plain")}
    try:
        connect_sub(socks["allowed"], pub.endpoint, keys.config("client"), pub.public_key)
        connect_sub(socks["stranger"], pub.endpoint, keys.config("stranger"), pub.public_key)
        wrong = keys.config("other_server").public_key.decode()
        connect_sub(socks["wrong_server_key"], pub.endpoint, keys.config("client"), wrong)
        socks["plain"].connect(pub.endpoint)  # what connect_sub refuses to do; a peer could still try

        got: events_pb2.KvEventBatch | None = None
        deadline = time.monotonic() + 10
        sent = 0
        while got is None and time.monotonic() < deadline:
            sent = pub.publish_kv([stored(sent + 1)])
            if socks["allowed"].poll(50):
                _topic, _seq, payload = socks["allowed"].recv_multipart()
                got = events_pb2.KvEventBatch.FromString(payload)
        assert got is not None, "the allowed subscriber never received"
        assert got.instance_id == "w-1" and got.epoch == pub.epoch
        assert got.events[0].stored.blocks[0].block_hash == got.seq
        # keep publishing: the allowed one keeps receiving, nobody else ever does
        for _ in range(20):
            pub.publish_kv([stored(7)])
            time.sleep(0.02)
        assert socks["allowed"].poll(1000)
        for name in ("stranger", "wrong_server_key", "plain"):
            assert socks[name].poll(200) == 0, f"{name} received an event"
        # the publisher says who it refused, once per key (the stranger retries every 100 ms)
        stranger_key = keys.config("stranger").public_key.decode()
        assert sum(stranger_key in r.getMessage() for r in caplog.records) == 1
    finally:
        for s in socks.values():
            s.close(linger=0)
        pub.close_sync()


def test_connect_refuses_mismatched_curve_settings(keys: Keys) -> None:
    sock = open_sub(zmq.Context.instance(), [b"kv.m"])
    try:
        with pytest.raises(CurveError, match="requires ZeroMQ CURVE"):
            connect_sub(sock, "tcp://127.0.0.1:1", None, keys.config("server").public_key.decode())
        with pytest.raises(CurveError, match="advertises no zmq_public_key"):
            connect_sub(sock, "tcp://127.0.0.1:1", keys.config("client"), "")
        with pytest.raises(CurveError, match="not a Z85"):
            connect_sub(sock, "tcp://127.0.0.1:1", keys.config("client"), "short")
    finally:
        sock.close(linger=0)


class _RingReplay:
    """Replay served straight from the publishers' rings (what KvEventsService does over gRPC)."""

    def __init__(self, pubs: dict[str, KvEventPublisher]) -> None:
        self.pubs = pubs

    async def replay(
        self, address: str, from_seq: int, full_dump: bool = False
    ) -> AsyncIterator[tuple[events_pb2.KvEventBatch, bool]]:
        for batch in self.pubs[address].replay_since(from_seq) or []:
            yield batch, False


class _Sink:
    def __init__(self) -> None:
        self.batches: list[events_pb2.KvEventBatch] = []

    def apply_batch(self, batch: events_pb2.KvEventBatch) -> None:
        self.batches.append(batch)

    def clear_worker(self, instance_id: str, dp_rank: int) -> None:
        pass

    def remove_worker(self, instance_id: str) -> None:
        pass

    def on_load(self, load: events_pb2.LoadMetrics) -> None:
        pass


async def test_subscriber_follows_publishers_with_different_keys_and_refuses_plain(keys: Keys) -> None:
    """One SUB socket, a server key per connect: both CURVE workers deliver; a plain one is refused."""
    a = KvEventPublisher("a", "m", 16, curve=keys.config("server"))
    b = KvEventPublisher("b", "m", 16, curve=keys.config("other_server"))
    plain = KvEventPublisher("p", "m", 16)
    sink = _Sink()
    replay = _RingReplay({"a:1": a, "b:2": b, "p:3": plain})
    sub = KvEventSubscriber("m", sink, replay, resync_interval_s=0, curve=keys.config("client"))
    sub.start()
    workers = [
        ("a", a.endpoint, "a:1", 1, a.public_key),
        ("b", b.endpoint, "b:2", 1, b.public_key),
        ("p", plain.endpoint, "p:3", 1, ""),
    ]
    try:
        sub.sync_workers(workers)
        assert sorted(sub.workers) == ["a", "b"] and sub.stats.refused_workers == 1
        sub.sync_workers(workers)  # the next discovery snapshot: the same refusal is not re-counted
        assert sub.stats.refused_workers == 1
        deadline = time.monotonic() + 10
        while {x.instance_id for x in sink.batches} != {"a", "b"} and time.monotonic() < deadline:
            for p in (a, b, plain):
                p.publish_kv([stored(1)])
                p.publish_load(LoadMetrics(0, 1, 0, 0))
            await asyncio.sleep(0.05)
        assert {x.instance_id for x in sink.batches} == {"a", "b"}
        assert sub.stats.bad_messages == 0
    finally:
        await sub.close()
        for p in (a, b, plain):
            p.close_sync()


async def test_router_replica_sync_over_curve(keys: Keys, tmp_path: Path) -> None:
    """Two replicas with allowed keys share active sequences; a replica with a stranger key hears nothing."""
    r1_pub, r1_sec = generate_keypair(tmp_path / "r", "r1")
    r2_pub, r2_sec = generate_keypair(tmp_path / "r", "r2")
    allow = tmp_path / "routers"
    allow.mkdir()
    for f in (r1_pub, r2_pub):
        (allow / f.name).write_bytes(f.read_bytes())
    cfg1 = CurveConfig.load(str(r1_sec), str(allow))
    cfg2 = CurveConfig.load(str(r2_sec), str(allow))
    cfg3 = CurveConfig.load(str(keys.secrets["stranger"]), str(allow))
    routers = [Router(RouterConfig(), f"r{i}") for i in (1, 2, 3)]
    syncs = [ActiveSync(r, "m", curve=c) for r, c in zip(routers, (cfg1, cfg2, cfg3), strict=True)]
    try:
        assert syncs[0].meta[ZMQ_PUBLIC_KEY_META] == cfg1.public_key.decode()  # type: ignore[union-attr]
        for s in syncs:
            s.start()
        for s in syncs[1:]:
            s.set_peers({syncs[0].endpoint: syncs[0].meta[ZMQ_PUBLIC_KEY_META]})
        deadline = time.monotonic() + 10
        i = 0
        while syncs[1].received == 0 and time.monotonic() < deadline:
            i += 1
            syncs[0].publish(ActiveChange("added", f"req{i}", "w", 0, 3, 1))
            await asyncio.sleep(0.05)
        assert syncs[1].received > 0
        for _ in range(10):
            i += 1
            syncs[0].publish(ActiveChange("added", f"req{i}", "w", 0, 3, 1))
            await asyncio.sleep(0.02)
        assert syncs[2].received == 0  # the stranger's key is not on r1's allow-list
        # a plain peer (no key advertised) is refused, not followed in vain
        syncs[1].set_peers({syncs[0].endpoint: syncs[0].meta[ZMQ_PUBLIC_KEY_META], "tcp://127.0.0.1:9": ""})
        assert set(syncs[1]._peers) == {syncs[0].endpoint}
    finally:
        for s in syncs:
            await s.close()
