"""A real worker process (mocker engine) registered in a real consul-dev, driven over gRPC and ZMQ."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import zmq
import zmq.asyncio

from dynamo_grpc.discovery import ConsulSettings, Discovery
from dynamo_grpc.tokens.block_hash import block_hash_list
from dynamo_grpc.v1 import (
    common_pb2,
    events_pb2,
    events_pb2_grpc,
    kv_transfer_pb2,
    kv_transfer_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from tests.helpers.consul_dev import ConsulDevProcess, run_consul_dev

ROOT = Path(__file__).resolve().parents[2]
MODEL = "SmolLM2-135M-Instruct"


class WorkerProcess:
    """``python -m dynamo_grpc.worker.main`` as a subprocess; ``info`` is its ready file."""

    def __init__(self, consul: str, log_dir: Path, *args: str) -> None:
        self.ready_file = log_dir / f"worker-{time.monotonic_ns()}.json"
        self.log_path = self.ready_file.with_suffix(".log")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "gen"), env.get("PYTHONPATH", "")])
        argv = [
            sys.executable,
            "-m",
            "dynamo_grpc.worker.main",
            "--consul",
            consul,
            "--ready-file",
            str(self.ready_file),
            *args,
        ]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        self.info: dict[str, Any] = {}

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                self.info = json.loads(self.ready_file.read_text())
                return self.info
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def address(self) -> str:
        return str(self.info["grpc_address"])

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        finally:
            self._log.close()


def start_worker(consul: str, log_dir: Path, *args: str) -> WorkerProcess:
    w = WorkerProcess(consul, log_dir, *args)
    try:
        w.wait_ready()
    except BaseException:
        w.stop()
        raise
    return w


@pytest.fixture(scope="module")
def consul() -> Iterator[ConsulDevProcess]:
    with run_consul_dev() as agent:
        yield agent


@pytest.fixture(scope="module")
def worker(consul: ConsulDevProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    # speedup 20: a decode step is ~1 ms, so an 8k-token stream lasts seconds (room to cancel it)
    w = start_worker(
        consul.address, tmp_path_factory.mktemp("worker"), "--speedup-ratio", "20", "--metrics-port", "0", "--ttl", "5"
    )
    yield w
    w.stop()


@pytest.fixture
async def channel(worker: WorkerProcess) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(worker.address) as ch:
        yield ch


def decode_request(tokens: list[int], max_tokens: int, **kw: Any) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(
        token_ids=tokens, model=MODEL, stop=common_pb2.StopConditions(max_tokens=max_tokens), **kw
    )


async def collect(
    stub: worker_pb2_grpc.DecodeServiceStub, req: worker_pb2.DecodeRequest, **kw: Any
) -> tuple[list[int], worker_pb2.DecodeResponse]:
    toks: list[int] = []
    last = None
    async for resp in stub.Decode(req, **kw):
        toks += resp.token_ids
        last = resp
    assert last is not None
    return toks, last


class LoadWatcher:
    """Subscribes to a worker's ``load.<model>`` topic and keeps the latest LoadMetrics."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, f"load.{MODEL}".encode())
        self.sock.connect(endpoint)

    async def wait_for(self, pred: Any, timeout: float = 10.0) -> events_pb2.LoadMetrics:
        deadline = asyncio.get_running_loop().time() + timeout
        last = None
        while True:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise AssertionError(f"load never matched; last {last}")
            frames = await asyncio.wait_for(self.sock.recv_multipart(), left)
            last = events_pb2.LoadMetrics.FromString(frames[2])
            if pred(last):
                return last

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


async def test_registered_in_consul_with_meta_and_model_card(worker: WorkerProcess, consul: ConsulDevProcess) -> None:
    d = Discovery(ConsulSettings.from_addr(consul.address))
    try:
        snapshot = await asyncio.wait_for(anext(aiter(d.watch("dynamo-worker"))), 10)
        cards = await d.get_model_cards(MODEL)
    finally:
        await d.close()
    (inst,) = [i for i in snapshot if i.instance_id == worker.info["instance_id"]]
    assert inst.meta["grpc_address"] == worker.address
    assert inst.meta["zmq_endpoint"] == worker.info["zmq_endpoint"]
    assert inst.meta["block_size"] == "64" and inst.meta["kv_blocks"] == "16384"
    assert inst.meta["engine"] == "mocker" and inst.meta["model"] == MODEL
    assert set(inst.tags) == {"namespace=dynamo", f"model={MODEL}", "role=both", "pool=default"}
    card = cards[MODEL][worker.info["instance_id"]]
    assert card["block_size"] == 64 and card["kv_blocks"] == 16384 and card["grpc_address"] == worker.address
    assert card["files"] == {"tokenizer.json": card["tokenizer_sha256"]}


async def test_decode_streams_tokens_and_the_second_call_hits_the_prefix_cache(channel: grpc.aio.Channel) -> None:
    stub = worker_pb2_grpc.DecodeServiceStub(channel)
    prompt = list(range(7000, 7200))
    toks, last = await collect(stub, decode_request(prompt, 24))
    assert len(toks) == 24 and all(0 <= t < 49152 for t in toks)
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.cached_tokens) == (200, 24, 0)
    toks2, last2 = await collect(stub, decode_request(prompt, 24))
    assert toks2 == toks  # deterministic
    assert last2.usage.cached_tokens == 192  # 3 full blocks of 64


async def test_cancel_mid_stream_frees_blocks(worker: WorkerProcess, channel: grpc.aio.Channel) -> None:
    watcher = LoadWatcher(worker.info["zmq_endpoint"])
    try:
        stub = worker_pb2_grpc.DecodeServiceStub(channel)
        call = stub.Decode(decode_request(list(range(20000, 20500)), 7000))
        got = 0
        async for resp in call:
            got += len(resp.token_ids)
            if got >= 5:
                break
        busy = await watcher.wait_for(lambda m: m.active_blocks > 0 and m.running == 1)
        assert busy.active_blocks >= 8  # 500 prompt tokens = 8 blocks
        call.cancel()
        idle = await watcher.wait_for(lambda m: m.active_blocks == 0)
        assert idle.running == 0 and idle.waiting == 0
    finally:
        watcher.close()


async def test_deadline_exceeded_frees_blocks(worker: WorkerProcess, channel: grpc.aio.Channel) -> None:
    watcher = LoadWatcher(worker.info["zmq_endpoint"])
    try:
        stub = worker_pb2_grpc.DecodeServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, decode_request(list(range(30000, 30300)), 7000), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await watcher.wait_for(lambda m: m.active_blocks == 0 and m.running == 0)
    finally:
        watcher.close()


async def test_bad_requests_get_clear_statuses(channel: grpc.aio.Channel) -> None:
    stub = worker_pb2_grpc.DecodeServiceStub(channel)
    cases = [
        (decode_request(list(range(9000)), 4), grpc.StatusCode.RESOURCE_EXHAUSTED, "9000 tokens"),
        (decode_request([], 4), grpc.StatusCode.INVALID_ARGUMENT, "token_ids is empty"),
        (decode_request([1, 2, 3], 0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (decode_request([1, 2, 49152], 4), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
        (
            worker_pb2.DecodeRequest(model="other", token_ids=[1], stop=common_pb2.StopConditions(max_tokens=1)),
            grpc.StatusCode.NOT_FOUND,
            "other",
        ),
        (
            decode_request([1, 2], 4, sampling=common_pb2.SamplingOptions(top_p=0)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "top_p",
        ),
    ]
    for req, code, text in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, req)
        assert err.value.code() == code, (text, err.value)
        assert text in (err.value.details() or "")


async def test_get_model_file_matches_the_card_checksum(
    worker: WorkerProcess, consul: ConsulDevProcess, channel: grpc.aio.Channel
) -> None:
    d = Discovery(ConsulSettings.from_addr(consul.address))
    try:
        card = (await d.get_model_cards(MODEL))[MODEL][worker.info["instance_id"]]
    finally:
        await d.close()
    sha = card["files"]["tokenizer.json"]
    stub = worker_pb2_grpc.ModelFilesServiceStub(channel)
    chunks = [
        c
        async for c in stub.GetModelFile(worker_pb2.GetModelFileRequest(model=MODEL, name="tokenizer.json", sha256=sha))
    ]
    data = b"".join(c.data for c in chunks)
    assert hashlib.sha256(data).hexdigest() == sha
    assert len(chunks) > 1 and all(c.total_size == len(data) for c in chunks)
    assert [c.offset for c in chunks] == [sum(len(x.data) for x in chunks[:i]) for i in range(len(chunks))]
    for req, code in [
        (
            worker_pb2.GetModelFileRequest(model=MODEL, name="tokenizer.json", sha256="0" * 64),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (worker_pb2.GetModelFileRequest(model=MODEL, name="weights.bin"), grpc.StatusCode.NOT_FOUND),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            _ = [c async for c in stub.GetModelFile(req)]
        assert err.value.code() == code


async def test_kv_events_arrive_on_zmq_and_replay(worker: WorkerProcess, channel: grpc.aio.Channel) -> None:
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, f"kv.{MODEL}".encode())
    sub.connect(worker.info["zmq_endpoint"])
    try:
        await asyncio.sleep(0.3)  # let the subscription reach the publisher (ZMQ slow joiner)
        prompt = list(range(40000, 40130))  # 2 full blocks of 64 + 2
        toks, _ = await collect(worker_pb2_grpc.DecodeServiceStub(channel), decode_request(prompt, 70))
        want = block_hash_list(prompt + toks, 64)[:3]  # 199 computed tokens: 3 blocks, one made while decoding
        seen: list[int] = []
        parents: list[int | None] = []
        while seen != want:
            frames = await asyncio.wait_for(sub.recv_multipart(), 5)
            batch = events_pb2.KvEventBatch.FromString(frames[2])
            assert batch.instance_id == worker.info["instance_id"] and batch.block_size == 64
            for ev in batch.events:
                if ev.WhichOneof("data") == "stored" and ev.stored.blocks[0].block_hash in want:
                    parents.append(ev.stored.parent_hash if ev.stored.HasField("parent_hash") else None)
                    seen += [b.block_hash for b in ev.stored.blocks]
        assert parents[0] is None and parents[-1] == want[1]
        replay = events_pb2_grpc.KvEventsServiceStub(channel)
        dumped = {
            b.block_hash
            async for r in replay.Replay(events_pb2.ReplayRequest(full_dump=True))
            for ev in r.batch.events
            for b in ev.stored.blocks
        }
        assert set(want) <= dumped
    finally:
        sub.close(0)
        ctx.term()


async def test_prefill_returns_first_token_and_block_handle(worker: WorkerProcess, channel: grpc.aio.Channel) -> None:
    prompt = list(range(50000 % 49152, 50000 % 49152 + 150))
    resp = await worker_pb2_grpc.PrefillServiceStub(channel).Prefill(
        worker_pb2.PrefillRequest(model=MODEL, token_ids=prompt, stop=common_pb2.StopConditions(max_tokens=99))
    )
    toks, _ = await collect(worker_pb2_grpc.DecodeServiceStub(channel), decode_request(prompt, 1))
    assert resp.first_token == toks[0]
    assert list(resp.kv_handle.block_hashes) == block_hash_list(prompt, 64)
    assert resp.kv_handle.num_tokens == 150 and resp.kv_handle.instance_id == worker.info["instance_id"]
    assert resp.usage.completion_tokens == 1
    # the blocks stay pinned under the lease until a decoder pulls or releases it (here: released)
    kv = kv_transfer_pb2_grpc.KvTransferServiceStub(channel)
    release = kv_transfer_pb2.ReleaseRequest(handle_id=resp.kv_handle.handle_id)
    await kv.Release(release)
    await kv.Release(release)  # idempotent
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in kv.Pull(kv_transfer_pb2.PullRequest(handle=resp.kv_handle)):
            pass
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "released" in (err.value.details() or "")


async def test_metrics_endpoint_reports_requests_latency_and_kv(
    worker: WorkerProcess, channel: grpc.aio.Channel
) -> None:
    await collect(worker_pb2_grpc.DecodeServiceStub(channel), decode_request([5, 6, 7], 3))
    await asyncio.sleep(0.25)  # the load loop refreshes gauges every 100 ms
    url = f"http://{worker.info['metrics_address']}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    for name in (
        "dynamo_worker_requests_total",
        "dynamo_worker_time_to_first_token_seconds_bucket",
        "dynamo_worker_inter_token_latency_seconds_bucket",
        "dynamo_worker_queue_depth",
        "dynamo_worker_kv_usage_ratio",
        "dynamo_worker_prefix_cache_hit_rate",
        'dynamo_worker_kv_total_blocks{model="SmolLM2-135M-Instruct"} 16384.0',
    ):
        assert name in text, name
    assert 'outcome="length",rpc="decode"' in text


def test_help_lists_the_flags() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "gen")]))
    out = subprocess.run(
        [sys.executable, "-m", "dynamo_grpc.worker.main", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    for flag in ("--engine", "--speedup-ratio", "--drain-grace", "--ready-file", "--num-gpu-blocks"):
        assert flag in out
