"""KServe v2 `inference.GRPCInferenceService` over the pipeline: protobuf in, protobuf out, nothing else.

ModelInfer returns the whole text in one response. ModelStreamInfer is decoupled: each request gets one
response per chunk of text and a last one with the `triton_final_response` parameter true; with input
`stream` false it gets a single final response (as Triton does). A bad request on a stream gets a response
with `error_message` and the stream stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

import grpc

from dynamo_grpc import __version__ as VERSION
from dynamo_grpc.frontend import logprobs, simple_model
from dynamo_grpc.frontend.errors import Code, FrontendError
from dynamo_grpc.frontend.pipeline import Chunk, Pipeline
from dynamo_grpc.frontend.request import OUTPUTS, LlmRequest, RequestError, parse_request
from dynamo_grpc.frontend.stats import Duration, StatsBook
from dynamo_grpc.frontend.tensors import (
    Tensor,
    TensorError,
    decode_inputs,
    encode_outputs,
    encode_scalars,
    parameters_dict,
)
from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.kserve.v2 import model_config_pb2 as mc
from dynamo_grpc.tokens.tokenizer import Tokenizer
from dynamo_grpc.v1 import common_pb2

log = logging.getLogger(__name__)

SERVER_NAME = "dynamo-grpc"
EXTENSIONS = ["model_configuration", "model_repository", "statistics", "parameters", "schedule_policy"]
PLATFORM = "dynamo"
FINAL = "triton_final_response"

# (name, datatype, dims, optional) of the LLM model's inputs, as ModelMetadata/ModelConfig show them.
LLM_INPUTS: list[tuple[str, str, list[int], bool]] = [
    ("text_input", "BYTES", [1], True),  # or `messages`, or pre-tokenised `input_ids`
    ("input_ids", "INT32", [-1], True),
    ("stream", "BOOL", [1], True),
    ("sampling_parameters", "BYTES", [1], True),
    ("exclude_input_in_output", "BOOL", [1], True),
    ("messages", "BYTES", [1], True),
    ("max_tokens", "INT32", [1], True),
    ("temperature", "FP32", [1], True),
    ("top_p", "FP32", [1], True),
    ("top_k", "INT32", [1], True),
    ("seed", "UINT64", [1], True),
    ("stop", "BYTES", [-1], True),
    ("bad_words", "BYTES", [-1], True),
    ("return_logprobs", "BOOL", [1], True),
    ("return_cumulative_logprob", "BOOL", [1], True),
]
_OUT_DIMS = {"text_output": [-1], "finish_reason": [-1], "logprobs": [-1]}
_MC_TYPE = {
    "BOOL": mc.TYPE_BOOL,
    "UINT8": mc.TYPE_UINT8,
    "UINT16": mc.TYPE_UINT16,
    "UINT32": mc.TYPE_UINT32,
    "UINT64": mc.TYPE_UINT64,
    "INT8": mc.TYPE_INT8,
    "INT16": mc.TYPE_INT16,
    "INT32": mc.TYPE_INT32,
    "INT64": mc.TYPE_INT64,
    "FP16": mc.TYPE_FP16,
    "FP32": mc.TYPE_FP32,
    "FP64": mc.TYPE_FP64,
    "BYTES": mc.TYPE_STRING,
    "BF16": mc.TYPE_BF16,
}
_STATUS = {c: grpc.StatusCode[c.value] for c in Code}


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _classify(e: BaseException) -> _Abort:
    """Any request failure as (status, message); unexpected exceptions become INTERNAL, logged."""
    if isinstance(e, _Abort):
        return e
    if isinstance(e, (TensorError, RequestError)):
        return _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    if isinstance(e, FrontendError):
        return _Abort(_STATUS[e.code], e.message)
    if isinstance(e, asyncio.TimeoutError):
        return _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
    log.exception("internal error", exc_info=e)
    return _Abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}")


def _used_raw(request: pb.ModelInferRequest) -> bool:
    # Triton's clients send raw and expect raw; a request without inputs gets raw too.
    return bool(request.raw_input_contents) or not request.inputs


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    t = context.time_remaining()
    return None if t is None or t > 1e8 else float(t)


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Thin adapter between KServe v2 protobuf and `Pipeline`."""

    def __init__(self, pipeline: Pipeline, stats: StatsBook | None = None, simple: bool = False) -> None:
        self.pipeline = pipeline
        self.stats = stats or StatsBook()
        self.simple = simple

    # -- health and metadata ------------------------------------------------------------------------
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.simple or any(m.ready for m in self.pipeline.registry.models()))

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        if self.simple and request.name == simple_model.NAME:
            return pb.ModelReadyResponse(ready=True)
        m = self.pipeline.registry.get(request.name)
        return pb.ModelReadyResponse(ready=m is not None and m.ready)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=VERSION, extensions=EXTENSIONS)

    async def _known(self, name: str, version: str, context: grpc.aio.ServicerContext) -> None:
        if version not in ("", "1"):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model '{name}' has no version '{version}' (only 1)")
        if self.simple and name == simple_model.NAME:
            return
        if self.pipeline.registry.get(name) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model '{name}'")

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        await self._known(request.name, request.version, context)
        T = pb.ModelMetadataResponse.TensorMetadata
        if request.name == simple_model.NAME and self.simple:
            return pb.ModelMetadataResponse(
                name=request.name,
                versions=["1"],
                platform="python",
                inputs=[T(name=n, datatype=d, shape=s) for n, d, s in simple_model.INPUTS],
                outputs=[T(name=n, datatype=d, shape=s) for n, d, s in simple_model.OUTPUTS],
            )
        return pb.ModelMetadataResponse(
            name=request.name,
            versions=["1"],
            platform=PLATFORM,
            inputs=[T(name=n, datatype=d, shape=s) for n, d, s, _ in LLM_INPUTS],
            outputs=[T(name=n, datatype=d, shape=_OUT_DIMS.get(n, [1])) for n, d in OUTPUTS.items()],
        )

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        await self._known(request.name, request.version, context)
        if request.name == simple_model.NAME and self.simple:
            cfg = mc.ModelConfig(
                name=request.name,
                platform="python",
                backend="python",
                max_batch_size=simple_model.MAX_BATCH,
                input=[mc.ModelInput(name=n, data_type=_MC_TYPE[d], dims=[16]) for n, d, _ in simple_model.INPUTS],
                output=[mc.ModelOutput(name=n, data_type=_MC_TYPE[d], dims=[16]) for n, d, _ in simple_model.OUTPUTS],
            )
            return pb.ModelConfigResponse(config=cfg)
        m = self.pipeline.registry.get(request.name)
        assert m is not None
        cfg = mc.ModelConfig(
            name=m.name,
            platform=PLATFORM,
            backend=PLATFORM,
            runtime=m.card.architecture,
            max_batch_size=0,
            input=[mc.ModelInput(name=n, data_type=_MC_TYPE[d], dims=s, optional=o) for n, d, s, o in LLM_INPUTS],
            output=[
                mc.ModelOutput(name=n, data_type=_MC_TYPE[d], dims=_OUT_DIMS.get(n, [1])) for n, d in OUTPUTS.items()
            ],
            model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
            instance_group=[
                mc.ModelInstanceGroup(name=m.name, count=len(m.workers), kind=mc.ModelInstanceGroup.KIND_MODEL)
            ],
        )
        params = {
            "context_length": m.card.context_length,
            "block_size": m.card.block_size,
            "kv_blocks": m.card.kv_blocks,
            "vocab_size": m.card.vocab_size,
            "tokenizer_sha256": m.card.tokenizer_sha256,
            "has_chat_template": bool(m.card.chat_template),
            "workers": len(m.workers),
            "source_format": m.card.source_format,
        }
        for k, v in params.items():
            cfg.parameters[k].string_value = str(v).lower() if isinstance(v, bool) else str(v)
        return pb.ModelConfigResponse(config=cfg)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        if request.name:
            await self._known(request.name, request.version, context)
            names = [request.name]
        else:
            names = sorted({m.name for m in self.pipeline.registry.models()} | set(self.stats.models()))
        out = pb.ModelStatisticsResponse()
        for name in names:
            s = self.stats.get(name)

            def d(x: Duration) -> pb.StatisticDuration:
                return pb.StatisticDuration(count=x.count, ns=x.ns)

            ms = out.model_stats.add(
                name=name,
                version="1",
                last_inference=s.last_inference_ms,
                inference_count=s.inference_count,
                execution_count=s.execution_count,
                inference_stats=pb.InferStatistics(
                    success=d(s.success),
                    fail=d(s.fail),
                    queue=d(s.queue),
                    compute_input=d(s.compute_input),
                    compute_infer=d(s.compute_infer),
                    compute_output=d(s.compute_output),
                ),
            )
            if s.responses or s.cancelled.count:
                ms.response_stats["0"].CopyFrom(
                    pb.InferResponseStatistics(success=pb.StatisticDuration(count=s.responses), cancel=d(s.cancelled))
                )
        return out

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:
        out = pb.RepositoryIndexResponse()
        entries = [(m.name, m.ready) for m in self.pipeline.registry.models()]
        if self.simple:
            entries.append((simple_model.NAME, True))
        for name, ready in sorted(entries):
            if request.ready and not ready:
                continue
            out.models.add(
                name=name,
                version="1",
                state="READY" if ready else "UNAVAILABLE",
                reason="" if ready else "no live worker",
            )
        return out

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION, "models are loaded by starting workers, not through the frontend"
        )

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        await context.abort(
            grpc.StatusCode.FAILED_PRECONDITION, "models are unloaded by stopping workers, not through the frontend"
        )

    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> pb.SystemSharedMemoryStatusResponse:
        return pb.SystemSharedMemoryStatusResponse()

    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> pb.CudaSharedMemoryStatusResponse:
        return pb.CudaSharedMemoryStatusResponse()

    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "shared-memory tensors are not supported")

    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "shared-memory tensors are not supported")

    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "shared-memory tensors are not supported")

    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "shared-memory tensors are not supported")

    async def TraceSetting(self, request: Any, context: Any) -> pb.TraceSettingResponse:
        return pb.TraceSettingResponse()

    async def LogSettings(self, request: Any, context: Any) -> pb.LogSettingsResponse:
        return pb.LogSettingsResponse()

    # -- inference ----------------------------------------------------------------------------------
    def _outputs(
        self,
        req: LlmRequest,
        text: str,
        finish: str,
        chunk: Chunk | None,
        new_tokens: int,
        tokenizer: Tokenizer | None = None,
        lps: Sequence[common_pb2.TokenLogprob] = (),
    ) -> list[tuple[str, str, bytes | str | int | float]]:
        values: dict[str, bytes | str | int | float] = {
            "text_output": text,
            "finish_reason": finish,
            "num_input_tokens": chunk.prompt_tokens if chunk else 0,
            "num_output_tokens": new_tokens,
            "cached_tokens": chunk.cached_tokens if chunk else 0,
        }
        if "logprobs" in req.requested_outputs:
            values["logprobs"] = logprobs.triton_json(lps, tokenizer) if tokenizer is not None else "[]"
        if "cumulative_logprob" in req.requested_outputs:
            values["cumulative_logprob"] = chunk.cumulative_logprob if chunk else 0.0
        return [(n, OUTPUTS[n], values[n]) for n in req.requested_outputs]

    def _response(
        self,
        request: pb.ModelInferRequest,
        tensors: list[Tensor] | list[tuple[str, str, bytes | str | int | float]],
        final: bool | None,
        last: Chunk | None = None,
    ) -> pb.ModelInferResponse:
        resp = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        if tensors and isinstance(tensors[0], Tensor):
            encode_outputs(resp, tensors, raw=_used_raw(request))  # type: ignore[arg-type]
        else:
            encode_scalars(resp, tensors, raw=_used_raw(request))  # type: ignore[arg-type]
        if final is not None:
            resp.parameters[FINAL].bool_param = final
        if last is not None:
            resp.parameters["worker_id"].string_param = last.worker_id  # changes when a request migrates
        if last is not None and last.finish_reason is not None:
            # Per-request token accounting on the last response (benchmarks read them).
            resp.parameters["prompt_tokens"].int64_param = last.prompt_tokens
            resp.parameters["completion_tokens"].int64_param = last.completion_tokens
            resp.parameters["cached_tokens"].int64_param = last.cached_tokens
        return resp

    def _parse(self, request: pb.ModelInferRequest, stream_rpc: bool) -> tuple[dict[str, Tensor], LlmRequest | None]:
        inputs = decode_inputs(request)
        if self.simple and request.model_name == simple_model.NAME:
            return inputs, None
        req = parse_request(
            inputs, parameters_dict(request.parameters), [o.name for o in request.outputs], stream_rpc=stream_rpc
        )
        return inputs, req

    async def _infer_stream(
        self, request: pb.ModelInferRequest, timeout: float | None, stream_rpc: bool
    ) -> AsyncGenerator[pb.ModelInferResponse, None]:
        """Responses for one request: one (ModelInfer or stream=false) or one per chunk (decoupled)."""
        t0 = time.perf_counter_ns()
        model = request.model_name
        if request.model_version not in ("", "1"):
            raise FrontendError(Code.NOT_FOUND, f"model '{model}' has no version '{request.model_version}'")
        inputs, req = self._parse(request, stream_rpc)
        if req is None:  # the `simple` example model
            tensors = simple_model.run(inputs, [o.name for o in request.outputs])
            yield self._response(request, tensors, True if stream_rpc else None)
            total = time.perf_counter_ns() - t0
            self.stats.record_success(model, total, 0, total, 0, 0, 1)
            return
        p = self.pipeline.prepare(model, req)
        m = p.model
        # As Triton's vLLM backend: the prompt text leads the output unless exclude_input_in_output is set.
        prefix = req.prompt if (req.prompt is not None and not req.exclude_input_in_output) else ""
        responses = 0
        out_ns = 0
        pending_tokens = 0
        pending_lps: list[common_pb2.TokenLogprob] = []
        try:
            if req.stream:
                if not stream_rpc:
                    raise RequestError("tensor 'stream': true needs ModelStreamInfer (a decoupled stream)")
                async for chunk in self.pipeline.generate(p, req, request.id or None, timeout):
                    t1 = time.perf_counter_ns()
                    text = prefix + chunk.text
                    final = chunk.finish_reason is not None
                    pending_tokens += chunk.num_new_tokens
                    pending_lps.extend(chunk.logprobs)
                    if text or final:  # tokens still held back (a partial character) ride on the next one
                        prefix = ""
                        outputs = self._outputs(
                            req, text, chunk.finish_reason or "", chunk, pending_tokens, m.tokenizer, pending_lps
                        )
                        yield self._response(request, outputs, final, chunk)
                        pending_tokens = 0
                        pending_lps = []
                        responses += 1
                    out_ns += time.perf_counter_ns() - t1
            else:
                parts: list[str] = [prefix]
                last: Chunk | None = None
                async for chunk in self.pipeline.generate(p, req, request.id or None, timeout):
                    parts.append(chunk.text)
                    pending_lps.extend(chunk.logprobs)
                    last = chunk
                t1 = time.perf_counter_ns()
                assert last is not None
                outputs = self._outputs(
                    req,
                    "".join(parts),
                    last.finish_reason or "stop",
                    last,
                    last.completion_tokens,
                    m.tokenizer,
                    pending_lps,
                )
                resp = self._response(request, outputs, True if stream_rpc else None, last)
                out_ns = time.perf_counter_ns() - t1
                yield resp
                responses = 1
        except BaseException as e:
            cancelled = isinstance(e, (asyncio.CancelledError, GeneratorExit))
            self.stats.record_failure(m.name, time.perf_counter_ns() - t0, cancelled=cancelled)
            if isinstance(e, Exception):
                e._counted = True  # type: ignore[attr-defined]
            raise
        self.stats.record_success(
            m.name,
            time.perf_counter_ns() - t0,
            p.timings.preprocess_ns,
            p.timings.infer_ns,
            p.timings.first_token_ns,
            out_ns,
            responses,
            p.timings.migrations,
        )

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        t0 = time.perf_counter_ns()
        try:
            last: pb.ModelInferResponse | None = None
            gen = self._infer_stream(request, _timeout(context), stream_rpc=False)
            async with contextlib.aclosing(gen):
                async for resp in gen:
                    last = resp
            assert last is not None
            return last
        except Exception as e:
            a = _classify(e)
            self._count_failure(request, e, t0)
            await context.abort(a.code, a.message)
            raise AssertionError("unreachable") from None

    def _count_failure(self, request: pb.ModelInferRequest, e: BaseException, t0: int) -> None:
        """Failures before generation started (bad tensors, too long, ...) count against a known model.

        Failures during generation are counted in `_infer_stream` itself.
        """
        if getattr(e, "_counted", False):
            return
        name = request.model_name
        if self.pipeline.registry.get(name) is not None or (self.simple and name == simple_model.NAME):
            self.stats.record_failure(name, time.perf_counter_ns() - t0)

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

        async def write(msg: pb.ModelStreamInferResponse) -> None:
            async with write_lock:
                await context.write(msg)

        async def one(request: pb.ModelInferRequest) -> None:
            t0 = time.perf_counter_ns()
            try:
                gen = self._infer_stream(request, timeout, stream_rpc=True)
                async with contextlib.aclosing(gen):
                    async for resp in gen:
                        await write(pb.ModelStreamInferResponse(infer_response=resp))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                a = _classify(e)
                self._count_failure(request, e, t0)
                err = pb.ModelStreamInferResponse(
                    error_message=f"[{a.code.name}] {a.message}",
                    infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id),
                )
                with contextlib.suppress(Exception):  # the client may be gone already
                    await write(err)

        try:
            async for request in request_iterator:
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
