"""How each protocol answers: KServe responses (hold-back, echo, final flag) and OpenAI errors over real HTTP.

The OpenAI app runs on a real aiohttp server on loopback; workers are scripted (as in test_frontend_pipeline)
so a test can make every worker full, or the prompt too long, and read the status, headers and body.
"""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from dynamo_grpc import errors
from dynamo_grpc.engines.base import SamplingParams
from dynamo_grpc.frontend.kserve.responses import FINAL, Responder
from dynamo_grpc.frontend.openai.app import OpenAiApp
from dynamo_grpc.frontend.request import LlmRequest
from dynamo_grpc.frontend.stats import StatsBook
from dynamo_grpc.frontend.token_stream import Chunk
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from tests.unit.test_frontend_pipeline import MODEL, make, source  # noqa: F401  (fixture)


def llm(**kw: object) -> LlmRequest:
    return LlmRequest(prompt="Hi", messages=None, stream=True, sampling=SamplingParams(), **kw)  # type: ignore[arg-type]


def text_of(resp: pb.ModelInferResponse) -> bytes:
    return resp.outputs[0].contents.bytes_contents[0]


def test_stream_responses_hold_back_tokens_and_echo_the_prompt(source) -> None:  # noqa: F811
    _, tok = source
    request = pb.ModelInferRequest(model_name=MODEL, id="x")
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"Hi")
    r = Responder(request, llm(exclude_input_in_output=True), tok, stream_rpc=True)
    assert r.chunk(Chunk("", 1)) is None  # a partial character: nothing to send yet
    first = r.chunk(Chunk(" é", 1, worker_id="w0"))
    assert first is not None
    assert text_of(first) == " é".encode() and not first.parameters[FINAL].bool_param
    assert first.outputs[3].name == "num_output_tokens" and first.outputs[3].contents.int_contents[0] == 2
    echo = Responder(request, llm(), tok, stream_rpc=True)
    lead = echo.chunk(Chunk("", 1))
    assert lead is not None and text_of(lead) == b"Hi"  # the prompt leads the output (Triton vLLM backend)
    last = r.chunk(Chunk("!", 1, "length", 3, 3, 0, "w0"))
    assert (
        last is not None and last.parameters[FINAL].bool_param and last.parameters["completion_tokens"].int64_param == 3
    )


def test_empty_final_response_when_asked(source) -> None:  # noqa: F811
    _, tok = source
    request = pb.ModelInferRequest(model_name=MODEL, id="x")
    assert Responder(request, llm(), tok, stream_rpc=True).empty_final() is None
    r = Responder(request, llm(empty_final_response=True, exclude_input_in_output=True), tok, stream_rpc=True)
    data = r.chunk(Chunk("end", 1, "stop", 3, 1, 0, "w0"))
    empty = r.empty_final()
    assert data is not None and not data.parameters[FINAL].bool_param and data.outputs
    assert empty is not None and empty.parameters[FINAL].bool_param and not empty.outputs and empty.id == "x"


@pytest.fixture
async def http(source):  # noqa: F811
    servers = []

    async def start(scripts: dict) -> str:
        p, _, _ = make(source, scripts)
        runner = web.AppRunner(OpenAiApp(p, StatsBook()).app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        servers.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    yield start
    for runner in servers:
        await runner.cleanup()


async def post(base: str, body: dict) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/v1/completions", json=body) as r:
            return r.status, dict(r.headers), await r.json()


async def test_openai_every_worker_full_is_429_with_retry_after(http) -> None:
    base = await http({"a:1": [errors.Overloaded("queue full")], "b:2": [errors.Overloaded("queue full")]})
    status, headers, body = await post(base, {"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert status == 429 and headers["Retry-After"] == "1"
    assert body["error"]["type"] == "rate_limit_error" and body["error"]["code"] == "overloaded"


async def test_openai_error_answers(http, source) -> None:  # noqa: F811
    card, _ = source
    base = await http({"a:1": [errors.InvalidArgument("worker a:1: 'bad_words' is not supported"), "finish"]})
    status, _, body = await post(base, {"model": MODEL, "prompt": " hi" * (card.context_length + 5)})
    assert status == 400 and body["error"]["code"] == "prompt_too_long"
    status, _, body = await post(base, {"model": MODEL, "prompt": "hi", "response_format": {"type": "json_object"}})
    assert status == 400 and body["error"]["param"] == "response_format"
    status, _, body = await post(base, {"model": MODEL, "prompt": "hi", "bad_words": ["x"]})
    assert status == 400 and "bad_words" in body["error"]["message"]  # the worker's refusal, passed on
    status, _, body = await post(base, {"model": "nope", "prompt": "hi"})
    assert status == 404 and body["error"]["type"] == "not_found_error"
