"""An outsider flooding a worker's event PUB with subscription frames: memory stays bounded.

The publisher runs in its own process (so its RSS is its own) and keeps publishing every 20 ms,
as a worker does; an outsider XSUB socket sends subscription frames to it. Before the fix 20 MB of
1 MB frames grew the publisher by ~950 MB (libzmq's subscription trie costs ~48 bytes per byte).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from dynamo_grpc.events.curve import CurveConfig, generate_keypair
from dynamo_grpc.events.sockets import connect_sub, open_sub
from dynamo_grpc.events.topics import unpack_seq

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'gen'}:{ROOT}"}
MB = 1024 * 1024

PUBLISHER = r"""
import sys, time
from dynamo_grpc.events.kv import KvStored, LoadMetrics, StoredBlock
from dynamo_grpc.events import KvEventPublisher
from dynamo_grpc.events.curve import CurveConfig
curve = CurveConfig.load(sys.argv[1], sys.argv[2]) if len(sys.argv) > 2 else None
pub = KvEventPublisher("w", "m", 16, curve=curve)
print(pub.endpoint, pub.public_key or "-", flush=True)
i = 0
while True:
    i += 1
    pub.publish_kv([KvStored(None, [StoredBlock(i, i)])])
    pub.publish_load(LoadMetrics(i % 7, 100, 0, 1))
    time.sleep(0.02)
"""


class Publisher:
    def __init__(self, *curve_args: str) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, *curve_args], stdout=subprocess.PIPE, text=True, env=ENV
        )
        assert self.p.stdout is not None
        endpoint, key = self.p.stdout.readline().split()
        self.endpoint, self.key = endpoint, "" if key == "-" else key

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.p.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def settled_rss_mb(self) -> float:
        """RSS once it stops moving (imports, first allocations)."""
        last = self.rss_mb()
        for _ in range(20):
            time.sleep(0.25)
            now = self.rss_mb()
            if abs(now - last) < 0.5:
                return now
            last = now
        return last


@pytest.fixture
def publishers() -> Iterator[list[Publisher]]:
    started: list[Publisher] = []
    yield started
    for p in started:
        p.p.kill()
        p.p.wait(10)


def last_seq(sub: zmq.Socket, timeout_s: float = 5.0) -> int:  # type: ignore[type-arg]
    """Seq of the newest KV batch that reaches ``sub`` within the timeout (AssertionError if none)."""
    deadline = time.monotonic() + timeout_s
    seq = 0
    while time.monotonic() < deadline:
        if sub.poll(100):
            while sub.poll(0):
                topic, seq_frame, _payload = sub.recv_multipart()
                if topic == b"kv.m":
                    seq = unpack_seq(seq_frame)
            if seq:
                return seq
    raise AssertionError("the subscriber received nothing")


OUTSIDER = r"""
import os, random, sys, time, zmq
endpoint, count, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
x = zmq.Context.instance().socket(zmq.XSUB)
x.setsockopt(zmq.SNDTIMEO, 5000)
if len(sys.argv) > 5:
    secret, server = sys.argv[5].encode(), sys.argv[6].encode()
    x.setsockopt(zmq.CURVE_SECRETKEY, secret)
    x.setsockopt(zmq.CURVE_PUBLICKEY, zmq.curve_public(secret))
    x.setsockopt(zmq.CURVE_SERVERKEY, server)
x.connect(endpoint)
rnd = random.Random(seed)
for _ in range(count):
    try:
        x.send(b"\x01" + rnd.randbytes(size))
    except zmq.Again:
        break  # the publisher stopped reading from us: the bound working
time.sleep(2.0)  # let the I/O threads deliver what they will
os._exit(0)  # skip teardown: libzmq's XSUB frees its copy of 1 MB subscriptions recursively
"""


def flood(endpoint: str, count: int, size: int, curve: CurveConfig | None = None, server_key: str = "") -> None:
    """An outsider process: an XSUB socket sending ``count`` random subscription frames of ``size`` bytes."""
    keys = [curve.secret_key.decode(), server_key] if curve is not None else []
    subprocess.run(
        [sys.executable, "-c", OUTSIDER, endpoint, str(count), str(size), str(count * size), *keys],
        env=ENV,
        timeout=60,
        check=True,
    )


@pytest.mark.slow
def test_huge_subscription_frames_do_not_grow_the_publisher(publishers: list[Publisher]) -> None:
    pub = Publisher()
    publishers.append(pub)
    sub = open_sub(zmq.Context.instance(), [b"kv.m"])
    try:
        connect_sub(sub, pub.endpoint, None, "")
        before_seq = last_seq(sub)
        rss0 = pub.settled_rss_mb()
        flood(pub.endpoint, 32, MB)
        grown = pub.rss_mb() - rss0
        assert grown < 5, f"publisher grew by {grown:.1f} MB after 32 MB of subscription frames"
        assert pub.p.poll() is None
        assert last_seq(sub) > before_seq  # still publishing to its real subscribers
    finally:
        sub.close(linger=0)


@pytest.mark.slow
def test_with_curve_strangers_cannot_subscribe_at_all(publishers: list[Publisher], tmp_path: Path) -> None:
    """Many small distinct subscriptions fit the frame bound; CURVE's allow-list keeps strangers out."""
    _, server_secret = generate_keypair(tmp_path, "server")
    _, client_secret = generate_keypair(tmp_path / "allow", "client")
    _, stranger_secret = generate_keypair(tmp_path, "stranger")
    pub = Publisher(str(server_secret), str(tmp_path / "allow"))
    publishers.append(pub)
    client = CurveConfig.load(str(client_secret), None)
    stranger = CurveConfig.load(str(stranger_secret), None)
    assert client is not None and stranger is not None
    sub = open_sub(zmq.Context.instance(), [b"kv.m"])
    try:
        connect_sub(sub, pub.endpoint, client, pub.key)
        before_seq = last_seq(sub)
        rss0 = pub.settled_rss_mb()
        flood(pub.endpoint, 8000, 1000, stranger, pub.key)  # 8 MB, each frame under the bound
        flood(pub.endpoint, 8000, 1000)  # and without CURVE at all
        grown = pub.rss_mb() - rss0
        assert grown < 5, f"publisher grew by {grown:.1f} MB after strangers' subscriptions"
        assert last_seq(sub) > before_seq
    finally:
        sub.close(linger=0)
