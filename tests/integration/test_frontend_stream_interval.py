"""A KServe and an OpenAI client through a real mesh whose worker runs `--stream-interval 4`.

Each worker message becomes one streamed response carrying its tokens: the first response has one token
(`num_output_tokens` 1: time to first token is not traded), later ones 4 or more, and the text is
the same text a unary call gets. The OpenAI stream gets the same text in chunks of several tokens.
"""

from __future__ import annotations

import asyncio
import json
import struct
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.mesh import Mesh, MeshConfig

pytestmark = pytest.mark.slow

MAX_TOKENS = 21


def _request(model: str, stream: bool) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id="si")
    for name, value in (
        ("text_input", b"Tell me about batching tokens."),
        ("sampling_parameters", json.dumps({"max_tokens": MAX_TOKENS, "ignore_eos": True, "seed": 11}).encode()),
    ):
        req.inputs.add(name=name, datatype="BYTES", shape=[1])
        req.raw_input_contents.append(struct.pack("<I", len(value)) + value)
    for name, on in (("stream", stream), ("exclude_input_in_output", True)):
        req.inputs.add(name=name, datatype="BOOL", shape=[1])
        req.raw_input_contents.append(b"\x01" if on else b"\x00")
    return req


def _outputs(resp: pb.ModelInferResponse) -> dict[str, bytes]:
    return {o.name: raw for o, raw in zip(resp.outputs, resp.raw_output_contents, strict=True)}


def _text(resp: pb.ModelInferResponse) -> str:
    raw = _outputs(resp)["text_output"]
    return raw[4 : 4 + struct.unpack_from("<I", raw)[0]].decode()


def _num_output_tokens(resp: pb.ModelInferResponse) -> int:
    return int(struct.unpack("<i", _outputs(resp)["num_output_tokens"])[0])


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    cfg = MeshConfig(
        workers=1, speedup_ratio=200.0, http_port=0, worker_args=["--stream-interval", "4"], ready_timeout_s=90.0
    )
    with Mesh(cfg) as m:
        yield m


def test_kserve_stream_gets_one_response_per_worker_message(mesh: Mesh) -> None:
    model = mesh.models[0]

    async def go() -> tuple[list[pb.ModelInferResponse], pb.ModelInferResponse]:
        async with grpc.aio.insecure_channel(mesh.frontend_grpc) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)

            async def one() -> object:
                yield _request(model, stream=True)

            streamed = []
            async for msg in stub.ModelStreamInfer(one(), timeout=30):  # type: ignore[arg-type]
                assert not msg.error_message, msg.error_message
                streamed.append(msg.infer_response)
                if msg.infer_response.parameters["triton_final_response"].bool_param:
                    break
            unary = await stub.ModelInfer(_request(model, stream=False), timeout=30)
            return streamed, unary

    streamed, unary = asyncio.run(go())
    counts = [_num_output_tokens(r) for r in streamed]
    assert sum(counts) == MAX_TOKENS == _num_output_tokens(unary)
    assert counts[0] == 1  # the first token alone
    assert all(n >= 4 for n in counts[1:-1]) and counts[-1] >= 1
    assert len(streamed) <= 1 + -(-(MAX_TOKENS - 1) // 4)
    assert "".join(_text(r) for r in streamed) == _text(unary)


def test_openai_stream_gets_multi_token_chunks_with_the_same_text(mesh: Mesh) -> None:
    assert mesh.frontend_http
    body = {"model": mesh.models[0], "prompt": "Tell me about batching tokens.", "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "seed": 11}  # fmt: skip

    def post(stream: bool) -> bytes:
        req = urllib.request.Request(
            f"http://{mesh.frontend_http}/v1/completions",
            data=json.dumps({**body, "stream": stream}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            return bytes(resp.read())

    whole = json.loads(post(False))["choices"][0]["text"]
    events = [ln[6:] for ln in post(True).decode().splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = [c["choices"][0]["text"] for c in chunks if c.get("choices")]
    assert "".join(texts) == whole
    # 21 tokens in at most 1 + ceil(20 / 4) worker messages (and a usage/finish chunk or two around them)
    assert len([t for t in texts if t]) <= 1 + -(-(MAX_TOKENS - 1) // 4)
