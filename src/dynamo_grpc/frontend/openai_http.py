"""OpenAI-compatible HTTP on the same pipeline: /v1/completions, /v1/chat/completions (SSE streaming),
/v1/models, /health, /metrics.

Only the HTTP shape differs from the KServe servicer; preprocessing, routing, migration and
detokenisation are the pipeline's.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import prometheus_client
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dynamo_grpc.frontend import logprobs
from dynamo_grpc.frontend.errors import Code, FrontendError
from dynamo_grpc.frontend.pipeline import Chunk, Pipeline
from dynamo_grpc.frontend.request import RequestError, parse_openai
from dynamo_grpc.frontend.stats import StatsBook
from dynamo_grpc.v1 import common_pb2

_HTTP_STATUS = {
    Code.INVALID_ARGUMENT: 400,
    Code.NOT_FOUND: 404,
    Code.RESOURCE_EXHAUSTED: 400,  # OpenAI answers 400 for a prompt over the context length
    Code.UNAVAILABLE: 503,
    Code.DEADLINE_EXCEEDED: 504,
    Code.CANCELLED: 499,
    Code.INTERNAL: 500,
    Code.FAILED_PRECONDITION: 400,
}


def _error(status: int, message: str, code: str) -> web.Response:
    body = {
        "error": {"message": message, "type": "invalid_request_error" if status < 500 else "server_error", "code": code}
    }
    return web.json_response(body, status=status)


class _StatsCollector:
    """Exposes the per-model StatsBook as Prometheus metrics."""

    def __init__(self, stats: StatsBook, pipeline: Pipeline) -> None:
        self.stats = stats
        self.pipeline = pipeline

    def collect(self) -> Any:
        req = CounterMetricFamily(
            "dynamo_frontend_requests", "Requests by model and outcome", labels=["model", "outcome"]
        )
        dur = CounterMetricFamily("dynamo_frontend_request_seconds", "Total request time", labels=["model", "outcome"])
        ttft = CounterMetricFamily("dynamo_frontend_first_token_seconds", "Total time to first token", labels=["model"])
        mig = CounterMetricFamily("dynamo_frontend_migrations", "Requests moved off a dead worker", labels=["model"])
        workers = GaugeMetricFamily("dynamo_frontend_live_workers", "Live workers per model", labels=["model"])
        for name in self.stats.models():
            s = self.stats.get(name)
            for outcome, d in (("success", s.success), ("fail", s.fail), ("cancelled", s.cancelled)):
                req.add_metric([name, outcome], d.count)
                dur.add_metric([name, outcome], d.ns / 1e9)
            ttft.add_metric([name], s.queue.ns / 1e9)
            mig.add_metric([name], s.migrations)
        for m in self.pipeline.registry.models():
            workers.add_metric([m.name], len(m.workers))
        yield from (req, dur, ttft, mig, workers)
        router_metrics = getattr(self.pipeline.router, "metric_families", None)
        if router_metrics is not None:  # the KV router runs in this process
            yield from router_metrics()


class OpenAiApp:
    def __init__(self, pipeline: Pipeline, stats: StatsBook) -> None:
        self.pipeline = pipeline
        self.stats = stats
        self.registry = prometheus_client.CollectorRegistry()
        self.registry.register(_StatsCollector(stats, pipeline))

    def app(self, admin_only: bool = False) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        if not admin_only:
            app.router.add_post("/v1/completions", self.completions)
            app.router.add_post("/v1/chat/completions", self.chat)
            app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def health(self, request: web.Request) -> web.Response:
        models = {m.name: len(m.workers) for m in self.pipeline.registry.models()}
        ok = any(models.values())
        return web.json_response(
            {"status": "healthy" if ok else "no live workers", "models": models}, status=200 if ok else 503
        )

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {
                "id": m.name,
                "object": "model",
                "created": int(m.loaded_at),
                "owned_by": "dynamo-grpc",
                "max_model_len": m.card.context_length,
            }
            for m in self.pipeline.registry.models()
            if m.ready
        ]
        return web.json_response({"object": "list", "data": data})

    async def metrics(self, request: web.Request) -> web.Response:
        body = prometheus_client.generate_latest(self.registry) + prometheus_client.generate_latest()
        return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        t0 = time.perf_counter_ns()
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(400, f"request body is not valid JSON: {e}", "invalid_json")
        try:
            model, req, include_usage = parse_openai(body, chat)
            p = self.pipeline.prepare(model, req)
        except RequestError as e:
            return _error(400, str(e), "invalid_request")
        except FrontendError as e:
            return _error(_HTTP_STATUS[e.code], e.message, e.code.value.lower())
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        echo = req.prompt if (req.prompt is not None and not req.exclude_input_in_output) else ""

        want_lp = req.sampling.logprobs is not None
        tokenizer = p.model.tokenizer
        text_offset = len(echo)

        def choice(text: str, finish: str | None, delta: bool, lps: list[common_pb2.TokenLogprob]) -> dict[str, Any]:
            nonlocal text_offset
            out: dict[str, Any]
            if chat:
                key = "delta" if delta else "message"
                out = {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}
                out["logprobs"] = logprobs.openai_chat(lps, tokenizer) if want_lp else None
                return out
            out = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            if want_lp:
                out["logprobs"] = logprobs.openai_completion(lps, tokenizer, text_offset)
                text_offset += sum(len(t) for t in out["logprobs"]["tokens"])
            return out

        def usage(c: Chunk) -> dict[str, Any]:
            return {
                "prompt_tokens": c.prompt_tokens,
                "completion_tokens": c.completion_tokens,
                "total_tokens": c.prompt_tokens + c.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": c.cached_tokens},
            }

        gen = self.pipeline.generate(p, req, rid)
        if not req.stream:
            parts = [echo]
            all_lps: list[common_pb2.TokenLogprob] = []
            last: Chunk | None = None
            try:
                async for c in gen:
                    parts.append(c.text)
                    all_lps.extend(c.logprobs)
                    last = c
            except FrontendError as e:
                self.stats.record_failure(p.model.name, time.perf_counter_ns() - t0)
                return _error(_HTTP_STATUS[e.code], e.message, e.code.value.lower())
            assert last is not None
            self._record(p, t0)
            return web.json_response(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": model,
                    "choices": [choice("".join(parts), last.finish_reason, False, all_lps)],
                    "usage": usage(last),
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        obj_chunk = "chat.completion.chunk" if chat else "text_completion"

        async def send(data: dict[str, Any]) -> None:
            await resp.write(b"data: " + json.dumps(data).encode() + b"\n\n")

        try:
            first = True
            async for c in gen:
                text = (echo + c.text) if first else c.text
                first = False
                await send(
                    {
                        "id": rid,
                        "object": obj_chunk,
                        "created": created,
                        "model": model,
                        "choices": [choice(text, c.finish_reason, True, c.logprobs)],
                    }
                )
                if c.finish_reason is not None and include_usage:
                    await send(
                        {
                            "id": rid,
                            "object": obj_chunk,
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": usage(c),
                        }
                    )
            self._record(p, t0)
        except FrontendError as e:
            self.stats.record_failure(p.model.name, time.perf_counter_ns() - t0)
            await send({"error": {"message": e.message, "code": e.code.value.lower()}})
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _record(self, p: Any, t0: int) -> None:
        t = p.timings
        self.stats.record_success(
            p.model.name, time.perf_counter_ns() - t0, t.preprocess_ns, t.infer_ns, t.first_token_ns, 0, 1, t.migrations
        )


async def start_http(
    host: str, port: int, pipeline: Pipeline, stats: StatsBook, admin_only: bool = False
) -> tuple[web.AppRunner, str]:
    """Serve the OpenAI app (or only /health and /metrics); returns the runner (cleanup() stops it), host:port."""
    runner = web.AppRunner(OpenAiApp(pipeline, stats).app(admin_only), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, f"{host}:{bound}"
