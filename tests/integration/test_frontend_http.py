"""The frontend's OpenAI HTTP endpoints on a real mesh: completions, chat, SSE streaming, errors, metrics."""

from __future__ import annotations

import json
from collections.abc import Iterator

import aiohttp
import pytest

from dynamo_grpc.launch.mesh import Mesh, MeshConfig

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def http_mesh() -> Iterator[Mesh]:
    m = Mesh(MeshConfig(workers=2, speedup_ratio=1000.0, http_port=0, ready_timeout_s=90.0)).start()
    try:
        yield m
    finally:
        m.stop()


async def test_completions_unary_and_stream_agree(http_mesh: Mesh) -> None:
    base = f"http://{http_mesh.frontend_http}"
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 10, "seed": 4}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{base}/v1/completions", json=body) as r:
            assert r.status == 200
            unary = await r.json()
        text = unary["choices"][0]["text"]
        assert unary["choices"][0]["finish_reason"] == "length" and unary["usage"]["completion_tokens"] == 10
        streamed, events = [], []
        async with s.post(
            f"{base}/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}
        ) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                if line.startswith(b"data: "):
                    events.append(line[6:].strip())
        assert events[-1] == b"[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        streamed = [c["choices"][0]["text"] for c in chunks if c["choices"]]
        assert "".join(streamed) == text
        assert chunks[-1]["usage"]["completion_tokens"] == 10


async def test_chat_and_models_and_health(http_mesh: Mesh) -> None:
    base = f"http://{http_mesh.frontend_http}"
    async with aiohttp.ClientSession() as s:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        async with s.post(f"{base}/v1/chat/completions", json=body) as r:
            assert r.status == 200
            resp = await r.json()
        assert resp["object"] == "chat.completion" and resp["choices"][0]["message"]["role"] == "assistant"
        assert resp["usage"]["prompt_tokens"] > 5  # the chat template added its markup
        async with s.get(f"{base}/v1/models") as r:
            assert [m["id"] for m in (await r.json())["data"]] == [MODEL]
        async with s.get(f"{base}/health") as r:
            assert r.status == 200
        async with s.get(f"{base}/metrics") as r:
            text = await r.text()
        labels = f'endpoint="chat_completions",model="{MODEL}",protocol="openai",request_type="unary",status="success"'
        assert f"dynamo_frontend_requests_total{{{labels}}} 1.0" in text
        assert f'dynamo_frontend_inflight_requests{{model="{MODEL}"}} 0.0' in text  # finished requests leave it
        value = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln[:1] != "#"}
        assert value[f'dynamo_frontend_time_to_first_token_seconds_count{{model="{MODEL}"}}'] >= 1
        assert value[f'nv_inference_request_success{{model="{MODEL}",version="1"}}'] >= 1
        # the KV router runs in the frontend (the default mode) and reports its decisions here
        # with the names the `dynamo-grpc router` service uses
        assert f'dynamo_router_decisions_total{{mode="kv",model="{MODEL}"}}' in text
        assert f'dynamo_router_ready{{model="{MODEL}"}} 1.0' in text
        overlap = f'dynamo_router_overlap_blocks_count{{model="{MODEL}"}}'
        routed = [ln for ln in text.splitlines() if ln.startswith(overlap)]
        assert routed and float(routed[0].split()[-1]) >= 1


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "nope"),
        ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -2}, 400, "temperature"),
        ("/v1/completions", {"model": MODEL}, 400, "prompt"),
        ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
        ("/v1/completions", {"model": MODEL, "prompt": "hello " * 9000}, 400, "context length"),
    ],
)
async def test_http_errors(http_mesh: Mesh, path: str, body: dict, status: int, needle: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://{http_mesh.frontend_http}{path}", json=body) as r:
            assert r.status == status
            err = await r.json()
        assert needle in err["error"]["message"]
        # (a body with a Content-Type other than application/json is 415: test_frontend_limits)
        json_type = {"Content-Type": "application/json"}
        async with s.post(
            f"http://{http_mesh.frontend_http}/v1/completions", data=b"{not json", headers=json_type
        ) as r:
            assert r.status == 400


async def test_a_refused_request_is_counted_as_an_error_and_leaves_no_inflight(http_mesh: Mesh) -> None:
    base = f"http://{http_mesh.frontend_http}"
    labels = f'endpoint="completions",model="{MODEL}",protocol="openai",request_type="unary",status="error"'
    series = f"dynamo_frontend_requests_total{{{labels}}}"

    async def scrape(s: aiohttp.ClientSession) -> dict[str, float]:
        async with s.get(f"{base}/metrics") as r:
            text = await r.text()
        return {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln[:1] != "#"}

    async with aiohttp.ClientSession() as s:
        before = (await scrape(s)).get(series, 0.0)
        async with s.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "hello " * 9000}) as r:
            assert r.status == 400  # longer than the context
        after = await scrape(s)
    assert after[series] == before + 1
    assert after[f'dynamo_frontend_inflight_requests{{model="{MODEL}"}}'] == 0
    assert after[f'nv_inference_request_failure{{model="{MODEL}",version="1"}}'] >= 1
