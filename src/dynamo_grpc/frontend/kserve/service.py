"""KServe v2 `inference.GRPCInferenceService`: decode the request, call the pipeline, encode the answer.

ModelInfer returns the whole text in one response. ModelStreamInfer is decoupled: each request gets one
response per chunk of text and a last one with the `triton_final_response` parameter true; with input
`stream` false it gets a single final response (as Triton does). A bad request on a stream gets a response
with `error_message` and the stream stays open. Every failure leaves through `errors.abort` (unary) or the
same status name in `error_message` (stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc

from dynamo_grpc import __version__ as VERSION
from dynamo_grpc import errors
from dynamo_grpc.frontend.collect import collect
from dynamo_grpc.frontend.kserve import metadata, simple_model
from dynamo_grpc.frontend.kserve.codec import decode_inputs, encode_outputs, parameters_dict
from dynamo_grpc.frontend.kserve.parse import parse_request, requested_outputs
from dynamo_grpc.frontend.kserve.responses import FINAL, Responder, base, used_raw
from dynamo_grpc.frontend.limits import MAX_CLIENT_ID_BYTES, check_client_id
from dynamo_grpc.frontend.pipeline import Pipeline
from dynamo_grpc.frontend.stats import StatsBook
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVER_NAME = "dynamo-grpc"
EXTENSIONS = ["model_configuration", "model_repository", "statistics", "parameters", "schedule_policy"]
_NO_SHM = "shared-memory tensors are not supported"


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    t = context.time_remaining()
    return None if t is None or t > 1e8 else float(t)


def _error(e: BaseException) -> errors.DynamoError:
    err = errors.from_exception(e)
    if isinstance(err, errors.Internal) and err is not e:
        log.exception("internal error", exc_info=e)
    return err


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Thin adapter between KServe v2 protobuf and `Pipeline`."""

    def __init__(self, pipeline: Pipeline, stats: StatsBook | None = None, simple: bool = False) -> None:
        self.pipeline = pipeline
        self.stats = stats or StatsBook()
        self.simple = simple

    def _is_simple(self, name: str) -> bool:
        return self.simple and name == simple_model.NAME

    def _check_model(self, name: str, version: str) -> None:
        if version not in ("", "1"):
            raise errors.ModelNotFound(f"model '{name}' has no version '{version}' (only 1)")
        if not self._is_simple(name):
            self.pipeline.model(name)

    async def _known(self, name: str, version: str, context: grpc.aio.ServicerContext) -> None:
        try:
            self._check_model(name, version)
        except errors.DynamoError as e:
            await errors.abort(context, e)

    # -- health and metadata ------------------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.simple or any(m.ready for m in self.pipeline.registry.models()))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        if self._is_simple(request.name):
            return pb.ModelReadyResponse(ready=True)
        m = self.pipeline.registry.get(request.name)
        return pb.ModelReadyResponse(ready=m is not None and m.ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=VERSION, extensions=EXTENSIONS)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        await self._known(request.name, request.version, context)
        if self._is_simple(request.name):
            return metadata.simple_metadata(request.name)
        return metadata.llm_metadata(request.name)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        await self._known(request.name, request.version, context)
        if self._is_simple(request.name):
            return metadata.simple_config(request.name)
        return metadata.llm_config(self.pipeline.model(request.name))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        if request.name:
            await self._known(request.name, request.version, context)
            names = [request.name]
        else:
            names = sorted({m.name for m in self.pipeline.registry.models()} | set(self.stats.models()))
        out = pb.ModelStatisticsResponse()
        for name in names:
            metadata.add_statistics(out, name, self.stats.get(name))
        return out

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        out = pb.RepositoryIndexResponse()
        entries = [(m.name, m.ready) for m in self.pipeline.registry.models()]
        if self.simple:
            entries.append((simple_model.NAME, True))
        for name, ready in sorted(entries):
            if request.ready and not ready:
                continue
            state, reason = ("READY", "") if ready else ("UNAVAILABLE", "no live worker")
            out.models.add(name=name, version="1", state=state, reason=reason)
        return out

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        await errors.abort(
            context, errors.FailedPrecondition("models are loaded by starting workers, not through the frontend")
        )

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        await errors.abort(
            context, errors.FailedPrecondition("models are unloaded by stopping workers, not through the frontend")
        )

    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> pb.SystemSharedMemoryStatusResponse:
        return pb.SystemSharedMemoryStatusResponse()

    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> pb.CudaSharedMemoryStatusResponse:
        return pb.CudaSharedMemoryStatusResponse()

    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        await errors.abort(context, errors.Unimplemented(_NO_SHM))

    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        await errors.abort(context, errors.Unimplemented(_NO_SHM))

    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        await errors.abort(context, errors.Unimplemented(_NO_SHM))

    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        await errors.abort(context, errors.Unimplemented(_NO_SHM))

    async def TraceSetting(self, request: Any, context: Any) -> pb.TraceSettingResponse:
        return pb.TraceSettingResponse()

    async def LogSettings(self, request: Any, context: Any) -> pb.LogSettingsResponse:
        return pb.LogSettingsResponse()

    # -- inference ----------------------------------------------------------------------------------
    async def _infer(
        self, request: pb.ModelInferRequest, timeout: float | None, stream_rpc: bool
    ) -> AsyncGenerator[pb.ModelInferResponse | pb.ModelStreamInferResponse | bytes, None]:
        """Responses for one request: one (ModelInfer or stream=false) or one per chunk (decoupled); for
        ModelStreamInfer (``stream_rpc``) each already inside its ModelStreamInferResponse, or that message's
        bytes (`wire.py`; ModelStreamInfer's serializer passes them through).

        Statistics are recorded here, once per request, for a model this frontend knows.
        """
        t0 = time.perf_counter_ns()
        name = request.model_name
        known = self._is_simple(name) or self.pipeline.registry.get(name) is not None
        out_ns = responses = 0
        endpoint = "model_stream_infer" if stream_rpc else "model_infer"
        if known:
            self.stats.metrics.started(name)
        try:
            self._check_model(name, request.model_version)
            inputs = decode_inputs(request)
            if self._is_simple(name):
                resp = base(request)
                encode_outputs(resp, simple_model.run(inputs, [o.name for o in request.outputs]), raw=used_raw(request))
                if stream_rpc:
                    resp.parameters[FINAL].bool_param = True
                yield pb.ModelStreamInferResponse(infer_response=resp) if stream_rpc else resp
                total = time.perf_counter_ns() - t0
                self.stats.record_success(name, total, 0, total, 0, 0, 1)
                self.stats.metrics.finished(name, "kserve", endpoint, stream_rpc, "success", total, None)
                return
            if request.id:
                check_client_id("id", request.id)
            outputs = requested_outputs(request.outputs)
            req = parse_request(inputs, parameters_dict(request.parameters), outputs, stream_rpc=stream_rpc)
            if req.stream and not stream_rpc:
                raise errors.InvalidArgument("tensor 'stream': true needs ModelStreamInfer (a decoupled stream)")
            self.pipeline.check_input_size(req)  # before waiting for a slot or tokenising
            admission = self.pipeline.admission
            await admission.acquire()
            try:
                p = await self.pipeline.prepare_async(name, req)
                responder = Responder(request, req, p.model.tokenizer, stream_rpc)
                chunks = self.pipeline.generate(p, req, request.id or None, timeout)
                if req.stream:
                    async with contextlib.aclosing(chunks):  # a client that goes away frees the route at once
                        async for chunk in chunks:  # (a stream needs ModelStreamInfer: stream_rpc is true)
                            t1 = time.perf_counter_ns()
                            frame = responder.stream_frame(chunk)
                            out_ns += time.perf_counter_ns() - t1
                            if frame is not None:
                                yield frame
                                responses += 1
                else:
                    result = await collect(chunks)
                    t1 = time.perf_counter_ns()
                    whole = responder.unary(result)
                    out_ns = time.perf_counter_ns() - t1
                    yield responder.wrapped(whole) if stream_rpc else whole
                    responses += 1
                final = responder.empty_final()
                if final is not None:
                    yield responder.wrapped(final) if stream_rpc else final
            finally:
                admission.release()
        except BaseException as e:
            if known:
                cancelled = isinstance(e, (asyncio.CancelledError, GeneratorExit))
                self.stats.record_failure(name, time.perf_counter_ns() - t0, cancelled=cancelled)
                status = "cancelled" if cancelled else "error"
                total = time.perf_counter_ns() - t0
                self.stats.metrics.finished(name, "kserve", endpoint, stream_rpc, status, total, None)
            raise
        t = p.timings
        total = time.perf_counter_ns() - t0
        self.stats.record_success(
            name, total, t.preprocess_ns, t.infer_ns, t.first_token_ns, out_ns, responses, t.migrations,
        )  # fmt: skip
        self.stats.metrics.finished(name, "kserve", endpoint, stream_rpc, "success", total, t)

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        last: pb.ModelInferResponse | None = None
        try:
            gen = self._infer(request, _timeout(context), stream_rpc=False)
            async with contextlib.aclosing(gen):
                async for resp in gen:
                    assert isinstance(resp, pb.ModelInferResponse)
                    last = resp
        except Exception as e:
            await errors.abort(context, _error(e))
        assert last is not None
        return last

    async def ModelStreamInfer(  # type: ignore[override]  # grpc.aio lets a streaming handler write, not yield
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> None:
        """Requests on one stream run concurrently; their responses interleave (each carries its id).

        Each request's task writes its own responses (a lock keeps one write in flight, as gRPC requires):
        no queue or extra task switch between a worker's tokens and the client.
        """
        tasks: set[asyncio.Task[None]] = set()
        timeout = _timeout(context)
        write_lock = asyncio.Lock()
        # back-pressure: past --max-stream-requests in flight the stream is not read (HTTP/2 flow control
        # then holds the client), so one unread stream cannot pile up unbounded requests
        in_flight = asyncio.Semaphore(self.pipeline.limits.max_stream_requests)

        async def write(msg: pb.ModelStreamInferResponse | bytes) -> None:
            async with write_lock:
                await context.write(msg)

        async def one(request: pb.ModelInferRequest) -> None:
            try:
                await _answer(request)
            finally:
                in_flight.release()

        async def _answer(request: pb.ModelInferRequest) -> None:
            try:
                gen = self._infer(request, timeout, stream_rpc=True)
                async with contextlib.aclosing(gen):
                    async for resp in gen:  # (the write inline: one coroutine less per response)
                        async with write_lock:
                            await context.write(resp)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                err = _error(e)
                msg = pb.ModelStreamInferResponse(
                    error_message=f"[{err.spec.grpc_code}] {err.message}",
                    # an id refused as too long is not echoed (it would amplify the attack)
                    infer_response=pb.ModelInferResponse(
                        model_name=request.model_name[:MAX_CLIENT_ID_BYTES],
                        id=request.id if len(request.id) <= MAX_CLIENT_ID_BYTES else "",
                    ),
                )
                with contextlib.suppress(Exception):  # the client may be gone already
                    await write(msg)

        try:
            async for request in request_iterator:
                await in_flight.acquire()
                t = asyncio.get_running_loop().create_task(one(request))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            while tasks:  # the client closed its side: finish what it asked for
                await asyncio.gather(*list(tasks), return_exceptions=True)
        finally:
            for t in list(tasks):
                t.cancel()
            if tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
