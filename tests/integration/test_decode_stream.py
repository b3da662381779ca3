"""DecodeStream on a real mocker worker: many requests on one stream, the frontend's client for it, fallback.

The worker runs each request on the stream as a Decode call would (same tokens, same errors, same cleanup); the
frontend's `WorkerClient` (stream transport) gives the same responses and errors as Decode calls, and uses Decode
calls for a worker that has no DecodeStream.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from dynamo_grpc import errors
from dynamo_grpc.frontend.decode_stream import IDLE_CLOSE_S
from dynamo_grpc.frontend.engine_client import WorkerClient
from dynamo_grpc.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.helpers.consul_dev import ConsulDevProcess, run_consul_dev
from tests.integration.test_worker_errors import _gauge
from tests.integration.test_worker_serving import WorkerProcess, collect, decode_request, start_worker

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def consul() -> Iterator[ConsulDevProcess]:
    with run_consul_dev() as agent:
        yield agent


@pytest.fixture(scope="module")
def worker(consul: ConsulDevProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    # speedup 20: a decode step is ~1 ms, so a long request lasts long enough to cancel it mid-way
    w = start_worker(consul.address, tmp_path_factory.mktemp("worker"), "--speedup-ratio", "20", "--metrics-port", "0")
    yield w
    w.stop()


def _req(rid: str, prompt: list[int], max_tokens: int, seed: int = 0, **kw: object) -> worker_pb2.DecodeRequest:
    return decode_request(prompt, max_tokens, request_id=rid, sampling=common_pb2.SamplingOptions(seed=seed), **kw)


class Stream:
    """A raw DecodeStream: send starts and cancels, read messages."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.out: asyncio.Queue[worker_pb2.DecodeStreamRequest | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[worker_pb2.DecodeStreamRequest]:
            while (m := await self.out.get()) is not None:
                yield m

        self.call = worker_pb2_grpc.DecodeServiceStub(channel).DecodeStream(requests())

    def start(self, *reqs: worker_pb2.DecodeRequest, timeout_ms: int = 0) -> None:
        starts = [worker_pb2.DecodeStart(request=r, timeout_ms=timeout_ms) for r in reqs]
        self.out.put_nowait(worker_pb2.DecodeStreamRequest(start=starts))

    def cancel(self, *rids: str) -> None:
        self.out.put_nowait(worker_pb2.DecodeStreamRequest(cancel=rids))

    async def until_done(self, rids: set[str]) -> tuple[dict[str, list[worker_pb2.DecodeStreamItem]], int]:
        """Every item of these requests until each has a finish or an end, and how many messages were read
        (items of other requests, e.g. the last ones of a request just cancelled, are passed over)."""
        items: dict[str, list[worker_pb2.DecodeStreamItem]] = {r: [] for r in rids}
        left, messages = set(rids), 0
        while left:
            msg = await asyncio.wait_for(self.call.read(), 30)
            assert msg is not grpc.aio.EOF
            messages += 1
            for item in msg.items:
                if item.request_id not in items:
                    continue
                items[item.request_id].append(item)
                if item.HasField("end") or item.response.finish_reason:
                    left.discard(item.request_id)
        return items, messages


def _outcomes(worker: WorkerProcess) -> dict[str, float]:
    """The worker's Decode requests by outcome (dynamo_worker_requests_total)."""
    text = urllib.request.urlopen(f"http://{worker.info['metrics_address']}/metrics", timeout=5).read().decode()
    found = []
    for labels, value in re.findall(r"^dynamo_worker_requests_total\{([^}]*)\} (\S+)$", text, re.M):
        outcome = re.search(r'outcome="([^"]+)"', labels)
        if 'rpc="decode"' in labels and outcome:
            found.append((outcome.group(1), value))
    return {k: float(v) for k, v in found}


def _tokens(items: list[worker_pb2.DecodeStreamItem]) -> list[int]:
    return [t for i in items if i.HasField("response") for t in i.response.token_ids]


async def test_requests_on_one_stream_get_what_decode_calls_get_batched_into_fewer_messages(
    worker: WorkerProcess,
) -> None:
    async with grpc.aio.insecure_channel(worker.address) as ch:
        prompts = {f"s{k}": [100 + k] * (20 + k) for k in range(12)}
        expected = {}
        for rid, prompt in prompts.items():  # the same requests as Decode calls, one at a time
            toks, last = await collect(worker_pb2_grpc.DecodeServiceStub(ch), _req(f"c{rid}", prompt, 16, seed=7))
            expected[rid] = (toks, last.finish_reason, last.usage.completion_tokens)
        s = Stream(ch)
        s.start(*(_req(rid, p, 16, seed=7) for rid, p in prompts.items()))
        items, messages = await s.until_done(set(prompts))
        for rid, its in items.items():
            last = its[-1].response
            assert (_tokens(its), last.finish_reason, last.usage.completion_tokens) == expected[rid]
            assert all(i.HasField("response") for i in its)
        # 12 requests x 16 tokens: one message carries many requests' responses
        assert messages < sum(len(its) for its in items.values())
        s.out.put_nowait(None)  # the client closes its side: the stream ends OK
        assert await s.call.code() == grpc.StatusCode.OK


async def test_a_failed_request_ends_alone_with_its_status_and_the_stream_goes_on(worker: WorkerProcess) -> None:
    async with grpc.aio.insecure_channel(worker.address) as ch:
        s = Stream(ch)
        bad_model = worker_pb2.DecodeRequest(request_id="bad", model="no-such-model", token_ids=[1, 2])
        s.start(bad_model, _req("good", [5, 6, 7], 4))
        items, _ = await s.until_done({"bad", "good"})
        (end,) = [i.end for i in items["bad"]]
        assert (end.code, end.error) == (grpc.StatusCode.NOT_FOUND.value[0], "model_not_found")
        assert "no-such-model" in end.message
        assert len(_tokens(items["good"])) == 4
        s.start(_req("dup", [9] * 10, 5000))  # a long one, then its id again while it runs
        s.start(_req("dup", [9] * 10, 4))
        msg = await asyncio.wait_for(s.call.read(), 30)
        while not any(i.HasField("end") for i in msg.items):
            msg = await asyncio.wait_for(s.call.read(), 30)
        (end,) = [i.end for i in msg.items if i.HasField("end")]
        assert (end.code, end.error) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "invalid_argument")
        s.cancel("dup")
        s.out.put_nowait(None)
        assert await s.call.code() == grpc.StatusCode.OK


async def test_cancel_and_deadline_stop_requests_and_free_their_kv(worker: WorkerProcess) -> None:
    names = ("dynamo_worker_inflight_requests", "dynamo_worker_kv_active_blocks")
    before = _outcomes(worker)
    async with grpc.aio.insecure_channel(worker.address) as ch:
        s = Stream(ch)
        s.start(_req("long", list(range(300, 500)), 100_000))
        s.start(_req("late", list(range(600, 800)), 100_000), timeout_ms=300)
        first = await asyncio.wait_for(s.call.read(), 30)
        assert any(i.request_id == "long" for i in first.items)
        s.cancel("long")
        items, _ = await s.until_done({"late"})
        end = items["late"][-1].end
        assert (end.code, end.error) == (grpc.StatusCode.DEADLINE_EXCEEDED.value[0], "deadline_exceeded")
        for _ in range(200):
            if all(_gauge(worker, n) == 0 for n in names):
                break
            await asyncio.sleep(0.05)
        assert {n: _gauge(worker, n) for n in names} == dict.fromkeys(names, 0.0)
        after = _outcomes(worker)  # counted as what they were, not as errors
        for outcome in ("deadline_exceeded", "client_cancelled"):
            assert after.get(outcome, 0) - before.get(outcome, 0) == 1, (before, after)
        assert after.get("error", 0) == before.get("error", 0)
        # a client that goes away mid-request: the worker stops and frees it too
        s.start(_req("orphan", list(range(900, 1100)), 100_000))
        await asyncio.wait_for(s.call.read(), 30)
        s.call.cancel()
        for _ in range(200):
            if all(_gauge(worker, n) == 0 for n in names):
                break
            await asyncio.sleep(0.05)
        assert {n: _gauge(worker, n) for n in names} == dict.fromkeys(names, 0.0)


async def test_frontend_client_over_the_stream_matches_decode_calls(worker: WorkerProcess) -> None:
    streamed, called = WorkerClient(transport="stream"), WorkerClient(transport="call")
    tasks_before = len(asyncio.all_tasks())
    try:

        async def run(client: WorkerClient, rid: str, k: int) -> tuple[list[int], int]:
            toks: list[int] = []
            finish = 0
            async for resp in client.decode(worker.address, _req(rid, [40 + k] * 30, 12, seed=k)):
                toks += resp.token_ids
                finish = resp.finish_reason
            return toks, finish

        a = await asyncio.gather(*(run(streamed, f"x{k}", k) for k in range(16)))
        b = await asyncio.gather(*(run(called, f"y{k}", k) for k in range(16)))
        assert a == b and all(len(t) == 12 and f == common_pb2.FINISH_REASON_LENGTH for t, f in a)

        # the worker's errors arrive as the same classes either way
        bad = worker_pb2.DecodeRequest(request_id="e", model="nope", token_ids=[1])
        for client in (streamed, called):
            with pytest.raises(errors.ModelNotFound, match="nope"):
                async for _ in client.decode(worker.address, bad):
                    pass

        # a deadline ends the request with DeadlineExceeded, and closing a reader early cancels its request
        with pytest.raises(errors.DeadlineExceeded):
            async for _ in streamed.decode(worker.address, _req("slow", list(range(50, 250)), 100_000), timeout=0.3):
                pass
        gen = streamed.decode(worker.address, _req("early", list(range(1200, 1400)), 100_000))
        await anext(gen)
        await gen.aclose()
        names = ("dynamo_worker_inflight_requests", "dynamo_worker_kv_active_blocks")
        for _ in range(200):
            if all(_gauge(worker, n) == 0 for n in names):
                break
            await asyncio.sleep(0.05)
        assert {n: _gauge(worker, n) for n in names} == dict.fromkeys(names, 0.0)
        # with no request left, the stream closes after IDLE_CLOSE_S: none of its tasks outlive the traffic
        await asyncio.sleep(IDLE_CLOSE_S + 0.5)
        assert len(asyncio.all_tasks()) == tasks_before
    finally:
        await streamed.close()
        await called.close()


async def test_a_worker_that_dies_fails_its_requests_as_lost(consul: ConsulDevProcess, tmp_path: Path) -> None:
    w = start_worker(consul.address, tmp_path, "--speedup-ratio", "20")
    client = WorkerClient(transport="stream")
    try:

        async def run(rid: str) -> None:
            async for _ in client.decode(w.address, _req(rid, list(range(10, 210)), 100_000)):
                pass

        tasks = [asyncio.create_task(run(f"d{k}")) for k in range(3)]
        await asyncio.sleep(0.5)
        w.proc.kill()
        for t in tasks:
            with pytest.raises(errors.WorkerLost):  # the frontend migrates such a request
                await asyncio.wait_for(t, 30)
    finally:
        w.stop()
        await client.close()


class OnlyDecode(worker_pb2_grpc.DecodeServiceServicer):
    """A worker of an older release: Decode, no DecodeStream (the generated base answers UNIMPLEMENTED)."""

    def __init__(self) -> None:
        self.stream_calls = self.decode_calls = 0

    async def DecodeStream(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:  # type: ignore[override]
        self.stream_calls += 1
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")

    async def Decode(  # type: ignore[override]
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        self.decode_calls += 1
        for k in range(request.stop.max_tokens):
            last = k == request.stop.max_tokens - 1
            yield worker_pb2.DecodeResponse(token_ids=[k], finish_reason=common_pb2.FINISH_REASON_LENGTH if last else 0)


async def test_a_worker_without_decode_stream_is_served_by_decode_calls() -> None:
    servicer = OnlyDecode()
    server = grpc.aio.server()
    worker_pb2_grpc.add_DecodeServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = WorkerClient(transport="stream")
    try:
        address = f"127.0.0.1:{port}"

        async def tokens(rid: str, n: int) -> list[int]:
            return [t async for r in client.decode(address, _req(rid, [1], n)) for t in r.token_ids]

        for n in (3, 5):  # the first learns the worker has none; the second goes straight to a call
            assert await tokens(f"o{n}", n) == list(range(n))
        assert (servicer.stream_calls, servicer.decode_calls) == (1, 2)
        # the worker left discovery: whatever serves here next (maybe a newer release) is asked again
        await client.forget(address)
        assert await tokens("o7", 7) == list(range(7))
        assert (servicer.stream_calls, servicer.decode_calls) == (2, 3)
    finally:
        await client.close()
        await server.stop(None)


async def test_a_draining_worker_ends_its_idle_streams_and_exits(consul: ConsulDevProcess, tmp_path: Path) -> None:
    w = start_worker(consul.address, tmp_path, "--speedup-ratio", "20", "--drain-grace", "10")
    try:
        async with grpc.aio.insecure_channel(w.address) as ch:
            s = Stream(ch)
            s.start(_req("one", [3, 4, 5], 4))
            items, _ = await s.until_done({"one"})
            assert len(_tokens(items["one"])) == 4
            t0 = time.monotonic()
            w.signal(signal.SIGTERM)  # nothing runs: the drain ends at once, and with it the idle stream
            code = await asyncio.wait_for(s.call.code(), 10)
            assert code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
            assert await asyncio.to_thread(w.proc.wait, 10) == 0
            print(f"drained and exited in {time.monotonic() - t0:.2f} s")
    finally:
        w.stop()
