"""OpenAI-compatible HTTP on the same pipeline: /v1/completions, /v1/chat/completions (SSE streaming),
/v1/models, /health, /metrics.

Only the HTTP shape differs from the KServe servicer; preprocessing, routing, migration and
detokenisation are the pipeline's, and every failure is answered through `errors.to_http`.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
import uuid
from typing import Any

import prometheus_client
from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dynamo_grpc import errors
from dynamo_grpc.frontend.collect import collect
from dynamo_grpc.frontend.openai.protocol import Choices, parse_openai, usage
from dynamo_grpc.frontend.pipeline import Pipeline
from dynamo_grpc.frontend.stats import StatsBook

log = logging.getLogger(__name__)


def error_response(e: BaseException) -> web.Response:
    """Any failure as the OpenAI error answer (status, Retry-After, body) of `errors.to_http`."""
    err = errors.from_exception(e)
    if isinstance(err, errors.Internal) and err is not e:
        log.exception("internal error", exc_info=e)
    status, headers, body = errors.to_http(err)
    return web.json_response(body, status=status, headers=headers)


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
            return error_response(errors.InvalidArgument(f"request body is not valid JSON: {e}"))
        try:
            o = parse_openai(body, chat)
            p = self.pipeline.prepare(o.model, o.req)
        except errors.DynamoError as e:
            return error_response(e)
        req = o.req
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        echo = req.prompt if (req.prompt is not None and not req.exclude_input_in_output) else ""
        choices = Choices(req, p.model.tokenizer, chat, echo)
        # the client's `user` goes into the request id the logs and traces carry
        gen = self.pipeline.generate(p, req, f"{rid}:{o.user}" if o.user else rid)
        if not req.stream:
            try:
                r = await collect(gen, echo)
            except Exception as e:
                self.stats.record_failure(p.model.name, time.perf_counter_ns() - t0)
                return error_response(e)
            self._record(p, t0)
            return web.json_response(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": o.model,
                    "choices": [choices.choice(r.text, r.last.finish_reason, False, r.logprobs)],
                    "usage": usage(r.last),
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        head = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created}
        head["model"] = o.model

        async def send(data: dict[str, Any]) -> None:
            await resp.write(b"data: " + json.dumps(data).encode() + b"\n\n")

        try:
            first = True
            async for c in gen:
                text = (echo + c.text) if first else c.text
                first = False
                await send({**head, "choices": [choices.choice(text, c.finish_reason, True, c.logprobs)]})
                if c.finish_reason is not None and o.include_usage:
                    await send({**head, "choices": [], "usage": usage(c)})
            self._record(p, t0)
        except Exception as e:  # the status line is sent: the error travels as an event (as OpenAI does)
            self.stats.record_failure(p.model.name, time.perf_counter_ns() - t0)
            await send(errors.openai_body(errors.from_exception(e)))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _record(self, p: Any, t0: int) -> None:
        t = p.timings
        self.stats.record_success(
            p.model.name, time.perf_counter_ns() - t0, t.preprocess_ns, t.infer_ns, t.first_token_ns, 0, 1, t.migrations
        )


async def start_http(
    host: str,
    port: int,
    pipeline: Pipeline,
    stats: StatsBook,
    admin_only: bool = False,
    ssl_context: ssl.SSLContext | None = None,
) -> tuple[web.AppRunner, str]:
    """Serve the OpenAI app (or only /health and /metrics); returns the runner (cleanup() stops it), host:port.

    ``ssl_context`` (``TlsConfig.ssl_context_server(public=True)``) serves HTTPS.
    """
    runner = web.AppRunner(OpenAiApp(pipeline, stats).app(admin_only), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, f"{host}:{bound}"
