"""`--stream-interval`: real worker processes (mocker) over gRPC; fewer Decode messages, the same tokens.

Two workers with the same mocker seed, one sending what is ready (the default) and one with
`--stream-interval 4`: the same request gets the same tokens from both (logprobs, which the mocker
cannot give, are merged per token: tests/unit/test_stream_interval.py); the batched one sends
the first token alone, then messages of at least 4 tokens, and its last message as soon as it finishes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest

from dynamo_grpc.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from tests.integration.test_worker_serving import MODEL, ROOT, WorkerProcess, start_worker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, WorkerProcess]]:
    log_dir = tmp_path_factory.mktemp("stream-interval")
    started: dict[int, WorkerProcess] = {}
    try:
        for interval in (1, 4):
            # speedup 50: a decode step is ~0.4 ms, so a batched message waits a few steps, not a few ms each
            started[interval] = start_worker(
                "127.0.0.1:1", log_dir, "--no-consul", "--speedup-ratio", "50", "--stream-interval", str(interval)
            )
        yield started
    finally:
        for w in started.values():
            w.stop()


async def _messages(address: str, max_tokens: int) -> list[worker_pb2.DecodeResponse]:
    req = worker_pb2.DecodeRequest(
        request_id=f"si-{max_tokens}",
        model=MODEL,
        token_ids=list(range(500, 640)),
        sampling=common_pb2.SamplingOptions(seed=7),
        stop=common_pb2.StopConditions(max_tokens=max_tokens, ignore_eos=True),
    )
    async with grpc.aio.insecure_channel(address) as ch:
        return [r async for r in worker_pb2_grpc.DecodeServiceStub(ch).Decode(req, timeout=30)]


def _tokens(msgs: list[worker_pb2.DecodeResponse]) -> list[int]:
    return [t for m in msgs for t in m.token_ids]


async def test_batched_messages_carry_the_same_tokens(workers: dict[int, WorkerProcess]) -> None:
    plain = await _messages(workers[1].address, 30)
    batched = await _messages(workers[4].address, 30)
    assert _tokens(batched) == _tokens(plain) and len(_tokens(plain)) == 30
    # the first token alone, then at least 4 per message until the finish, which carries what is left
    assert len(batched[0].token_ids) == 1
    assert all(len(m.token_ids) >= 4 for m in batched[1:-1])
    assert batched[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH and batched[-1].token_ids
    assert all(m.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for m in batched[:-1])
    assert len(batched) <= 1 + -(-29 // 4)  # 30 tokens: 1 + at most ceil(29 / 4) messages
    assert batched[-1].usage.completion_tokens == 30 and batched[-1].usage.prompt_tokens == 140


async def test_a_request_shorter_than_the_interval_is_not_held(workers: dict[int, WorkerProcess]) -> None:
    for n in (1, 3):
        msgs = await _messages(workers[4].address, n)
        assert len(_tokens(msgs)) == n and msgs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert len(msgs[0].token_ids) == 1  # the first token never waits for the others


def test_a_bad_interval_is_refused_naming_the_flag() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "gen")]))
    for argv, var in ((["--stream-interval", "0"], {}), ([], {"DYN_STREAM_INTERVAL": "0"})):
        out = subprocess.run(
            [sys.executable, "-m", "dynamo_grpc.worker.main", "--no-consul", *argv],
            env={**env, **var},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 2
        assert "--stream-interval must be >= 1, got 0" in out.stderr


def test_help_names_the_flag_and_its_variable() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "gen")]))
    out = subprocess.run(
        [sys.executable, "-m", "dynamo_grpc.worker.main", "--help"], env=env, capture_output=True, text=True,
        timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "--stream-interval" in out and "DYN_STREAM_INTERVAL" in out

