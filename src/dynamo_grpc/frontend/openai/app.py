"""OpenAI-compatible HTTP on the same pipeline: /v1/completions, /v1/chat/completions (SSE streaming),
/v1/models, /health, /metrics.

Only the HTTP shape differs from the KServe servicer; preprocessing, routing, migration and
detokenisation are the pipeline's, and every failure is answered through `errors.to_http`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
import uuid
from typing import Any

import prometheus_client
from aiohttp import web
from opentelemetry import trace
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from dynamo_grpc import errors
from dynamo_grpc.frontend.collect import collect
from dynamo_grpc.frontend.limits import Limits, check_client_id, unauthenticated
from dynamo_grpc.frontend.openai.protocol import Choices, parse_openai, usage
from dynamo_grpc.frontend.pipeline import Pipeline
from dynamo_grpc.frontend.request import parse_json
from dynamo_grpc.frontend.stats import StatsBook
from dynamo_grpc.observability import spans, tracing

log = logging.getLogger(__name__)


def error_response(e: BaseException) -> web.Response:
    """Any failure as the OpenAI error answer (status, Retry-After, body) of `errors.to_http`."""
    err = errors.from_exception(e)
    if isinstance(err, errors.Internal) and err is not e:
        log.exception("internal error", exc_info=e)
    status, headers, body = errors.to_http(err)
    return web.json_response(body, status=status, headers=headers)


def _refusal(status: int, message: str) -> web.Response:
    """An HTTP-level refusal (413, 415, 408) with the OpenAI error body of an invalid request."""
    return web.json_response(errors.openai_body(errors.InvalidArgument(message)), status=status)


class _StatsCollector:
    """Exposes the per-model StatsBook as Prometheus metrics."""

    def __init__(self, stats: StatsBook, pipeline: Pipeline) -> None:
        self.stats = stats
        self.pipeline = pipeline

    def collect(self) -> Any:
        # requests, latencies and tokens are in FrontendMetrics (frontend/metrics.py); here what is read live
        workers = GaugeMetricFamily("dynamo_frontend_live_workers", "Live workers per model", labels=["model"])
        for m in self.pipeline.registry.models():
            workers.add_metric([m.name], len(m.workers))
        adm = self.pipeline.admission
        running = GaugeMetricFamily("dynamo_frontend_admitted_requests", "Requests admitted and running (admission)")
        running.add_metric([], adm.inflight)
        queued = GaugeMetricFamily("dynamo_frontend_queued_requests", "Requests waiting for admission")
        queued.add_metric([], adm.waiting)
        rejected = CounterMetricFamily("dynamo_frontend_rejected_requests", "Requests refused: admission queue full")
        rejected.add_metric([], adm.rejected)
        yield from (workers, running, queued, rejected)
        router_metrics = getattr(self.pipeline.router, "metric_families", None)
        if router_metrics is not None:  # the KV router runs in this process
            yield from router_metrics()
        if self.pipeline.disagg is not None:
            yield from self.pipeline.disagg.metric_families()


class OpenAiApp:
    def __init__(self, pipeline: Pipeline, stats: StatsBook) -> None:
        self.pipeline = pipeline
        self.stats = stats
        self.registry = prometheus_client.CollectorRegistry()
        self.registry.register(_StatsCollector(stats, pipeline))

    @property
    def limits(self) -> Limits:
        return self.pipeline.limits

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """API keys guard /v1/*; /health stays open, /metrics takes --metrics-api-key when set."""
        header = request.headers.get("Authorization")
        if request.path.startswith("/v1/"):
            ok = self.limits.authorized(header)
        elif request.path == "/metrics":
            ok = self.limits.metrics_authorized(header)
        else:
            ok = True
        if not ok:
            status, headers, body = errors.to_http(unauthenticated())
            return web.json_response(body, status=status, headers={**headers, "WWW-Authenticate": "Bearer"})
        return await handler(request)

    def app(self, admin_only: bool = False) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_message_bytes, middlewares=[self._auth])
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
        body = (
            prometheus_client.generate_latest(self.registry)
            + prometheus_client.generate_latest(self.stats.metrics.registry)
            + self.stats.metrics.triton.exposition()
            + prometheus_client.generate_latest()
        )
        return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, chat=True)

    async def _handle(self, request: web.Request, chat: bool) -> web.StreamResponse:
        """`_serve` in the client's trace (W3C traceparent header) and counted in the metrics, however it ends."""
        t0 = time.perf_counter_ns()
        served: dict[str, Any] = {}  # model, stream, timings (once prepared): what the metrics record
        try:
            if not tracing.enabled():
                return await self._serve(request, chat, t0, served)
            with spans.continued(request.headers), spans.span(f"POST {request.path}", trace.SpanKind.SERVER):
                return await self._serve(request, chat, t0, served)
        finally:
            if served:
                t = served.get("timings")
                # recorded success / error, else an error before generation, else the client went away
                status = (t.status if t is not None else "error") or "cancelled"
                endpoint = "chat_completions" if chat else "completions"
                total = time.perf_counter_ns() - t0
                self.stats.metrics.finished(served["model"], "openai", endpoint, served["stream"], status, total, t)

    async def _serve(self, request: web.Request, chat: bool, t0: int, served: dict[str, Any]) -> web.StreamResponse:
        raw = await self._body(request)
        if isinstance(raw, web.Response):
            return raw
        try:
            body = parse_json("request body", raw)
            o = parse_openai(body, chat)
            if self.pipeline.registry.get(o.model) is not None:  # counted from here: a model we serve
                served.update(model=o.model, stream=o.req.stream)
                self.stats.metrics.started(o.model)
            if o.user:
                check_client_id("user", o.user)
            self.pipeline.check_input_size(o.req)
        except errors.DynamoError as e:
            return error_response(e)
        admission = self.pipeline.admission
        try:
            await admission.acquire()
        except errors.DynamoError as e:
            return error_response(e)
        try:
            return await self._admitted(request, chat, o, t0, served)
        finally:
            admission.release()

    async def _body(self, request: web.Request) -> bytes | web.Response:
        """The request body, refused early: wrong type (415), too big (413), too slow (408)."""
        ctype = request.content_type  # a request without the header is taken as JSON (curl --data-binary)
        if ctype != "application/json" and "Content-Type" in request.headers:
            return _refusal(415, f"Content-Type must be application/json, got '{ctype}'")
        limit = self.limits.max_message_bytes
        if request.content_length is not None and request.content_length > limit:
            return _refusal(
                413, f"request body is {request.content_length} bytes, at most {limit} (--max-message-bytes)"
            )
        try:
            async with asyncio.timeout(self.limits.http_body_timeout_s):
                return await request.read()  # aiohttp stops a chunked body at client_max_size
        except web.HTTPRequestEntityTooLarge:
            return _refusal(413, f"request body is over {limit} bytes (--max-message-bytes)")
        except TimeoutError:
            resp = _refusal(408, f"request body not received within {self.limits.http_body_timeout_s:g}s")
            resp.force_close()
            return resp

    async def _admitted(
        self, request: web.Request, chat: bool, o: Any, t0: int, served: dict[str, Any]
    ) -> web.StreamResponse:
        try:
            p = await self.pipeline.prepare_async(o.model, o.req)
        except errors.DynamoError as e:
            return error_response(e)
        served["timings"] = p.timings
        req = o.req
        served["timings"] = p.timings
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        echo = req.prompt if (req.prompt is not None and not req.exclude_input_in_output) else ""
        choices = Choices(req, p.model.tokenizer, chat, echo)
        # the client's `user` goes into the request id the logs and traces carry
        timeout = self.limits.http_request_timeout_s or None
        gen = self.pipeline.generate(p, req, f"{rid}:{o.user}" if o.user else rid, timeout)
        # closed on every exit (a client that leaves included) so the route is freed now, not at garbage collection
        async with contextlib.aclosing(gen):
            if not req.stream:
                try:
                    r = await collect(gen, echo)
                except Exception as e:
                    self.stats.record_failure(p.model.name, time.perf_counter_ns() - t0)
                    p.timings.status = "error"
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
                p.timings.status = "error"
                await send(errors.openai_body(errors.from_exception(e)))
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp

    def _record(self, p: Any, t0: int) -> None:
        t = p.timings
        t.status = "success"
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
    reuse_port: bool = False,
) -> tuple[web.AppRunner, str]:
    """Serve the OpenAI app (or only /health and /metrics); returns the runner (cleanup() stops it), host:port.

    ``ssl_context`` (``TlsConfig.ssl_context_server(public=True)``) serves HTTPS.
    """
    # handler_cancellation: a client that disconnects cancels its handler, so a non-streamed request stops
    # generating (the route and the worker stream are closed) instead of running to max_tokens unseen
    # lingering_time: after an early answer (413, 408) the rest of a body is drained for at most this long
    runner = web.AppRunner(
        OpenAiApp(pipeline, stats).app(admin_only),
        access_log=None,
        handler_cancellation=True,
        lingering_time=min(2.0, pipeline.limits.http_body_timeout_s),
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_port=reuse_port or None)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, f"{host}:{bound}"
