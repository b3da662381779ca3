"""Engine errors through a real worker process, on both engines: each its own status, nothing leaks.

Regression for the worker calling ``engine.generate`` outside its error handling: an engine that
raised at once (bad LoRA, prompt over the cache, a full queue) reached the client as UNKNOWN, left the
drain gate and the in-flight gauge raised, and made every later drain wait its whole grace period.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dynamo_grpc.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.helpers.consul_dev import ConsulDevProcess, run_consul_dev
from tests.integration.test_worker_serving import WorkerProcess, start_worker

#: long enough that a drain waiting for a leaked gate entry would be unmistakable
GRACE_S = 60


@pytest.fixture(scope="module")
def consul() -> Iterator[ConsulDevProcess]:
    with run_consul_dev() as agent:
        yield agent


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from tests.helpers.tiny_llama import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def _engine_args(engine: str, tiny_model: Path | None) -> list[str]:
    common = ["--max-waiting-requests", "1", "--max-num-seqs", "1", "--metrics-port", "0"]
    common += ["--drain-grace", str(GRACE_S), "--no-consul"]
    if engine == "mocker":
        # 8 blocks of 16 tokens: a 200-token prompt can never fit; speedup 1 keeps the long request running
        return ["--engine", "mocker", "--block-size", "16", "--num-gpu-blocks", "8", *common]
    assert tiny_model is not None
    return [
        "--engine", "torch", "--model", str(tiny_model), "--block-size", "4", "--num-gpu-blocks", "32",
        "--num-threads", "1", *common,
    ]  # fmt: skip


def _request(tokens: list[int], max_tokens: int, **kw: object) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(
        token_ids=tokens,
        stop=common_pb2.StopConditions(max_tokens=max_tokens, ignore_eos=True),
        **kw,  # type: ignore[arg-type]
    )


async def _error(stub: worker_pb2_grpc.DecodeServiceStub, req: worker_pb2.DecodeRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.Decode(req):
            pass
    return err.value


async def _overloaded(stub: worker_pb2_grpc.DecodeServiceStub) -> grpc.aio.AioRpcError:
    """Fill the one running slot and the one waiting place, then send one more; its error."""
    for _ in range(20):
        running = stub.Decode(_request([5, 6, 7], 100_000))
        waiting = None
        try:
            try:
                first = await running.read()
            except grpc.aio.AioRpcError as e:
                # the previous round's cancelled requests may still hold the queue for a moment
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                await asyncio.sleep(0.1)
                continue
            assert first.token_ids  # admitted and producing
            waiting = stub.Decode(_request([8, 9], 4))
            for _ in range(50):
                try:
                    async for _ in stub.Decode(_request([10, 11], 4)):
                        pass
                except grpc.aio.AioRpcError as e:
                    return e
                await asyncio.sleep(0.01)  # the waiting request had not reached the engine yet
        finally:
            running.cancel()
            if waiting is not None:
                waiting.cancel()
    raise AssertionError("never saw a full queue")


def _error_name(err: grpc.aio.AioRpcError) -> str:
    return dict(err.trailing_metadata() or ()).get("dynamo-error", "")  # type: ignore[arg-type]


async def _count_tokens(stub: worker_pb2_grpc.DecodeServiceStub, req: worker_pb2.DecodeRequest) -> int:
    """Tokens of one request; a full queue (the one waiting place, --max-waiting-requests 1) is waited out, since
    the engine thread may still be retiring the last round's cancelled requests when the gauges already read 0."""
    for _ in range(50):
        try:
            return sum([len(r.token_ids) async for r in stub.Decode(req)])
        except grpc.aio.AioRpcError as e:
            if _error_name(e) != "overloaded":
                raise
            await asyncio.sleep(0.1)
    raise AssertionError("the queue never freed")


def _gauge(worker: WorkerProcess, name: str) -> float:
    url = f"http://{worker.info['metrics_address']}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    m = re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


@pytest.mark.parametrize("engine", ["mocker", "torch"])
async def test_engine_errors_get_their_status_free_everything_and_drain_at_once(
    engine: str, consul: ConsulDevProcess, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    tiny = request.getfixturevalue("tiny_model") if engine == "torch" else None
    w = start_worker(consul.address, tmp_path, *_engine_args(engine, tiny))
    try:
        async with grpc.aio.insecure_channel(w.address) as ch:
            stub = worker_pb2_grpc.DecodeServiceStub(ch)

            # request-scoped errors the engine raises: each its own status and name
            cases: list[tuple[worker_pb2.DecodeRequest, grpc.StatusCode, str, str]] = [
                (_request([3] * 200, 4), grpc.StatusCode.RESOURCE_EXHAUSTED, "prompt_too_long", "200"),
            ]
            if engine == "torch":
                cases.append(
                    (_request([3, 4], 4, lora="adapter-x"), grpc.StatusCode.FAILED_PRECONDITION, "failed_precondition",
                     "adapter-x")
                )  # fmt: skip
            else:
                cases.append(
                    (_request([3, 4], 4, sampling=common_pb2.SamplingOptions(logprobs=2)),
                     grpc.StatusCode.INVALID_ARGUMENT, "unsupported_option", "logprobs")
                )  # fmt: skip
            for req, code, name, text in cases:
                err = await _error(stub, req)
                assert (err.code(), _error_name(err)) == (code, name), err
                assert text in (err.details() or "")

            # a full queue: one running, one waiting (--max-waiting-requests 1), the next is refused
            err = await _overloaded(stub)
            assert (err.code(), _error_name(err)) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded"), err
            assert "waiting queue is full" in (err.details() or "")

            # nothing leaked once the cancels land, and the worker keeps serving
            names = ("dynamo_worker_inflight_requests", "dynamo_worker_kv_active_blocks", "dynamo_worker_queue_depth")
            for _ in range(200):
                if all(_gauge(w, n) == 0 for n in names):
                    break
                await asyncio.sleep(0.05)
            assert {n: _gauge(w, n) for n in names} == dict.fromkeys(names, 0.0)
            assert await _count_tokens(stub, _request([12, 13, 14], 3)) == 3

            # a client id that collides with one in flight is never refused (the engine keys by its own id)
            async def run(n: int) -> int:
                return await _count_tokens(stub, _request([20, 21], n, request_id="dup"))

            assert await asyncio.gather(run(3), run(5)) == [3, 5]

        # nothing in flight: a drain ends at once, not after the grace period
        t0 = time.monotonic()
        w.signal(signal.SIGTERM)
        assert await asyncio.to_thread(w.proc.wait, GRACE_S / 2) == 0
        assert time.monotonic() - t0 < GRACE_S / 2
        assert "still running" not in w.log()
    finally:
        w.stop()
