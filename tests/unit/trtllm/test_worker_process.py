"""``dynamo-grpc worker --engine trtllm`` as a real process: without TensorRT-LLM, and over the stand-in.

The second test puts tests/unit/trtllm/standin (a STAND-IN of TensorRT-LLM 1.1's LLM API, not the real
package) first on PYTHONPATH as ``tensorrt_llm``, so the worker's lazy import, flags and gRPC services run
exactly as on a GPU host.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import zmq

from dynamo_grpc.tokens.block_hash import block_hash_list
from dynamo_grpc.v1 import common_pb2, events_pb2, worker_pb2, worker_pb2_grpc

from .conftest import STANDIN_DIR, write_checkpoint

ROOT = Path(__file__).resolve().parents[3]


def _env(*extra: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*(str(p) for p in extra), str(ROOT / "src"), str(ROOT / "gen")])
    return env


def _worker(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "dynamo_grpc.worker.main", "--no-consul", *args]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)


def test_without_tensorrt_llm_the_worker_exits_with_one_line_naming_the_extra(tmp_path: Path) -> None:
    res = _worker("--engine", "trtllm", "--model", str(tmp_path), env=_env())
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "pip install 'dynamo-grpc[trtllm]'" in lines[0] and "tensorrt_llm" in lines[0]


def test_flags_of_other_engines_are_refused_by_name(tmp_path: Path) -> None:
    res = _worker("--engine", "trtllm", "--model", str(write_checkpoint(tmp_path)), "--dtype", "bfloat16",
                  env=_env(STANDIN_DIR))  # fmt: skip
    assert res.returncode == 2 and "--dtype is not read by --engine trtllm" in res.stderr


@pytest.fixture(scope="module")
def standin_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("trtllm-worker")
    ready = tmp / "ready.json"
    log = (tmp / "worker.log").open("wb")
    argv = [
        sys.executable, "-m", "dynamo_grpc.worker.main", "--no-consul", "--engine", "trtllm",
        "--model", str(write_checkpoint(tmp / "ckpt")), "--block-size", "4", "--num-gpu-blocks", "64",
        "--ready-file", str(ready),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, env=_env(STANDIN_DIR), stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((tmp / "worker.log").read_text())
            time.sleep(0.05)
        yield json.loads(ready.read_text())
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _decode(
    info: dict[str, str], prompt: tuple[int, ...] = (5, 9, 13, 17, 21, 25), **sampling: object
) -> list[worker_pb2.DecodeResponse]:
    with grpc.insecure_channel(info["grpc_address"]) as ch:
        stub = worker_pb2_grpc.DecodeServiceStub(ch)
        req = worker_pb2.DecodeRequest(
            token_ids=list(prompt),
            sampling=common_pb2.SamplingOptions(temperature=0.0, **sampling),  # type: ignore[arg-type]
            stop=common_pb2.StopConditions(max_tokens=5, ignore_eos=True),
        )
        return list(stub.Decode(req, timeout=30))


def test_a_worker_over_the_standin_serves_decode_and_refuses_what_it_cannot_honour(
    standin_worker: dict[str, str],
) -> None:
    outs = _decode(standin_worker)
    assert sum(len(o.token_ids) for o in outs) == 5
    assert outs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    with pytest.raises(grpc.RpcError) as exc:
        _decode(standin_worker, logit_bias={7: 2.0})
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "logit_bias" in (exc.value.details() or "")
    assert sum(len(o.token_ids) for o in _decode(standin_worker)) == 5  # still serving


def test_its_kv_events_reach_the_event_plane_with_the_routers_hashes(standin_worker: dict[str, str]) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv.")
    sub.connect(standin_worker["zmq_endpoint"])
    try:
        time.sleep(0.3)  # ZMQ slow joiner
        prompt = tuple(40 + (3 * k) % 50 for k in range(10))
        toks = [t for o in _decode(standin_worker, prompt) for t in o.token_ids]
        want = set(block_hash_list([*prompt, *toks], 4)[:3])  # 15 tokens: 3 full blocks of 4
        seen: set[int] = set()
        deadline = time.monotonic() + 10
        while not want <= seen and time.monotonic() < deadline:
            if sub.poll(200):
                batch = events_pb2.KvEventBatch.FromString(sub.recv_multipart()[2])
                assert batch.block_size == 4
                seen |= {
                    b.block_hash for ev in batch.events if ev.WhichOneof("data") == "stored" for b in ev.stored.blocks
                }
        assert want <= seen  # what the router computes for these tokens, not TensorRT-LLM's own hashes
    finally:
        sub.close(0)
        ctx.term()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--engine", "mocker", "--tokenizer", "/x"], "--tokenizer is a trtllm flag; --engine mocker does not read it"),
        (["--engine", "torch", "--free-gpu-memory-fraction", "0.5"], "--free-gpu-memory-fraction is a trtllm flag"),
        (["--engine", "trtllm", "--model", "/m", "--seed", "3"], "--seed is not read by --engine trtllm"),
        (["--engine", "trtllm"], "--engine trtllm needs --model"),
        (["--engine", "trtllm", "--model", "/m", "--num-gpu-blocks", "8", "--free-gpu-memory-fraction", "0.5"],
         "give one"),
    ],
)  # fmt: skip
def test_engine_flags_are_checked_before_anything_starts(argv: list[str], message: str) -> None:
    from dynamo_grpc.engines.trtllm.worker import check_flags
    from dynamo_grpc.worker.main import build_parser

    with pytest.raises(ValueError, match=re.escape(message)):
        check_flags(build_parser().parse_args(argv))
