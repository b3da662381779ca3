"""The worker's gRPC servicers: thin adapters from protobuf to the Engine API and back.

Every error leaves through ``errors.abort`` with its class from errors.py (status + the
``dynamo-error`` name): bad fields → invalid_argument, a prompt that can never fit → prompt_too_long,
a full engine queue → overloaded (the frontend re-routes once), draining → draining, the wrong model
or file → not_found, a checksum mismatch → failed_precondition, a dead engine → worker_lost. Every
exit from a stream (finish, error, client cancel, deadline, drain) closes the engine iterator, which
frees the request's KV blocks, and releases the drain gate and the in-flight gauge.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import NoReturn

import grpc

from dynamo_grpc import errors
from dynamo_grpc.engines.base import Engine, EngineOutput, EngineRequest, KvImport
from dynamo_grpc.engines.core.driver import CoreEngine
from dynamo_grpc.engines.core.kv_manager import KvReservation
from dynamo_grpc.logs import request_id_var
from dynamo_grpc.models.card import ModelCard, sha256_hex
from dynamo_grpc.observability import spans
from dynamo_grpc.tokens.block_hash import block_hash_list
from dynamo_grpc.v1 import kv_transfer_pb2, worker_pb2, worker_pb2_grpc
from dynamo_grpc.worker import kv_transfer
from dynamo_grpc.worker.convert import (
    FINISH_REASONS,
    logprobs_pb,
    sampling_from_pb,
    usage_pb,
)
from dynamo_grpc.worker.decode_stream import serve_stream
from dynamo_grpc.worker.drain import DrainGate
from dynamo_grpc.worker.kv_transfer import KvGeometry
from dynamo_grpc.worker.metrics import WorkerMetrics
from dynamo_grpc.worker.stream_interval import StreamInterval

log = logging.getLogger(__name__)

FILE_CHUNK_BYTES = 1 << 20


@dataclasses.dataclass
class WorkerContext:
    """What the servicers share: the engine, the served model, the drain gate and metrics."""

    engine: Engine
    card: ModelCard
    files: dict[str, bytes]
    gate: DrainGate
    metrics: WorkerMetrics
    instance_id: str = ""
    grpc_address: str = ""
    file_sha256: dict[str, str] = dataclasses.field(default_factory=dict)
    #: prefill | decode | both (--role): what routers send here; every role serves every RPC
    role: str = "both"
    #: KV block geometry, when the engine can lease and move blocks (the engine core); None otherwise
    geometry: KvGeometry | None = None
    #: "socket": ask prefill workers for a data socket; "grpc": take the bytes on the Pull stream
    kv_transfer_path: str = "socket"
    #: channels to peers' KvTransferService (decode side)
    kv_channels: kv_transfer.Channels = dataclasses.field(default_factory=kv_transfer.Channels)
    #: KV pulls that failed, so the decoder prefilled locally instead
    pull_fallbacks: int = 0
    #: --stream-interval: tokens per Decode message (1: send what is ready; worker/stream_interval.py)
    stream_interval: int = 1

    def __post_init__(self) -> None:
        self.file_sha256 = {name: sha256_hex(data) for name, data in self.files.items()}

    @property
    def model(self) -> str:
        return self.card.name


async def _abort(context: grpc.aio.ServicerContext, err: errors.DynamoError) -> NoReturn:
    await errors.abort(context, err)


def _response(out: EngineOutput, completion: int) -> worker_pb2.DecodeResponse:
    return worker_pb2.DecodeResponse(
        token_ids=out.token_ids,
        finish_reason=FINISH_REASONS.get(out.finish_reason, FINISH_REASONS["error"]),
        usage=usage_pb(out, completion),
        logprobs=logprobs_pb(out),
    )


class _Requests:
    """Shared request checks and engine streaming for Decode and Prefill."""

    def __init__(self, ctx: WorkerContext, rpc: str) -> None:
        self.ctx = ctx
        self.rpc = rpc

    def _count(self, outcome: str) -> None:
        self.ctx.metrics.requests.labels(self.ctx.model, self.rpc, outcome).inc()

    async def _refuse(self, context: grpc.aio.ServicerContext, err: errors.DynamoError) -> NoReturn:
        self._count(err.name)
        await _abort(context, err)

    async def _build(
        self,
        request: worker_pb2.DecodeRequest | worker_pb2.PrefillRequest,
        context: grpc.aio.ServicerContext,
        max_tokens: int | None = None,
        hold_kv: bool = False,
    ) -> EngineRequest:
        ctx = self.ctx
        if request.model and request.model != ctx.model:
            await self._refuse(
                context, errors.ModelNotFound(f"model {request.model!r} is not served here ({ctx.model!r})")
            )
        stop = request.stop
        if max_tokens is not None:
            stop = type(stop)()
            stop.CopyFrom(request.stop)
            stop.max_tokens = max_tokens
            stop.min_tokens = min(stop.min_tokens, max_tokens)
        # the engine checks the tokens and sampling (SamplingParams.validate) when generate() starts
        token_ids = list(request.token_ids)
        sampling = sampling_from_pb(request.sampling, stop)
        return EngineRequest(
            request_id=request.request_id or uuid.uuid4().hex,
            token_ids=token_ids,
            sampling=sampling,
            lora=request.lora or None,
            hold_kv=hold_kv,
        )

    async def _stream(
        self,
        req: EngineRequest,
        context: grpc.aio.ServicerContext,
        sp: spans.trace.Span | None = None,
        leases: list[EngineOutput] | None = None,
    ) -> AsyncGenerator[worker_pb2.DecodeResponse, None]:
        """Engine outputs as DecodeResponses, with deadline, drain and error handling.

        Every engine error (raised at the first ``__anext__`` or later) ends the stream with its own
        status after the gate and the in-flight gauge are released and the engine iterator is closed.
        """
        ctx = self.ctx
        m, model = ctx.metrics, ctx.model
        request_id_var.set(req.request_id)  # JSON log lines of this request carry its id
        try:
            ctx.gate.enter()
        except errors.Draining:
            await self._refuse(context, errors.Draining(f"draining: worker {ctx.instance_id} takes no new work"))
        m.inflight.labels(model).inc()
        task = asyncio.current_task()
        remaining = context.time_remaining()
        timer = None
        timed_out = False
        if remaining is not None and task is not None:

            def expire() -> None:
                nonlocal timed_out
                timed_out = True
                task.cancel()

            timer = asyncio.get_running_loop().call_later(max(remaining, 0.0), expire)
        start = time.monotonic()
        last = start
        completion = len(req.prefilled)  # a disaggregated decode continues after the prefill's first token
        first_out = True
        outcome = "error"
        failure: errors.DynamoError | None = None
        agen: AsyncIterator[EngineOutput] | None = None
        batch = StreamInterval(ctx.stream_interval)
        try:
            agen = ctx.engine.generate(req)
            async for out in agen:
                now = time.monotonic()
                if out.lease is not None and leases is not None:
                    leases.append(out)
                if out.token_ids:
                    if first_out:
                        first_out = False
                        m.ttft.labels(model).observe(now - start)
                        m.prompt_tokens.labels(model).inc(out.prompt_tokens)
                        m.cached_tokens.labels(model).inc(out.cached_tokens)
                    else:
                        m.itl.labels(model).observe((now - last) / len(out.token_ids))
                    last = now
                    completion += len(out.token_ids)
                    m.generated_tokens.labels(model).inc(len(out.token_ids))
                elif out.finish_reason is not None:
                    first_out = False
                if out.finish_reason == "cancelled":
                    held = batch.flush()  # what the client has not seen yet: a migration then resends less
                    if held is not None:
                        yield _response(held, completion - len(out.token_ids))
                    if ctx.gate.handing_back:
                        outcome = "handed_back"
                        failure = errors.Draining(
                            f"draining: worker {ctx.instance_id} handed the request back after {completion} tokens"
                        )
                    else:
                        outcome = "cancelled"
                        failure = errors.Cancelled("the engine stopped the request")
                    break
                if out.finish_reason is not None:  # before the yield: a client that has the finish may close here
                    outcome = out.finish_reason
                send = batch.add(out)
                if send is not None:
                    yield _response(send, completion)
        except errors.DynamoError as e:
            failure = e
            outcome = e.name
        except asyncio.CancelledError:
            outcome = "deadline_exceeded" if timed_out else "client_cancelled"
            if timed_out:
                log.info("request %s passed its deadline; aborted", req.request_id)
            raise
        except GeneratorExit:  # closed while it waited at a yield (its reader cancelled, or passed the deadline)
            if outcome == "error":  # no finish was reached
                outcome = "deadline_exceeded" if timed_out else "client_cancelled"
            raise
        except Exception as e:  # a bug in the engine adapter: the client sees INTERNAL, the worker keeps serving
            log.exception("request %s failed", req.request_id)
            failure = errors.from_exception(e)
            outcome = failure.name
        finally:
            if timer is not None:
                timer.cancel()
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                await aclose()  # frees the request's blocks if it is still running
            m.inflight.labels(model).dec()
            ctx.gate.leave()
            self._count(outcome)
            spans.set_attributes(sp, output_tokens=completion, finish_reason=outcome)
        if failure is not None:
            await _abort(context, failure)


class DecodeServicer(worker_pb2_grpc.DecodeServiceServicer, _Requests):
    def __init__(self, ctx: WorkerContext) -> None:
        _Requests.__init__(self, ctx, "decode")

    async def Decode(
        self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[worker_pb2.DecodeResponse, None]:
        req = await self._build(request, context)
        try:
            if request.HasField("kv_handle"):
                await self._continue_prefill(request, req, context)
            attrs = {"model": self.ctx.model, "prompt_tokens": len(req.token_ids)}
            with spans.span("decode", request_id=req.request_id, **attrs) as sp:
                # closed here, not by the garbage collector: when the client stops reading (it has the finish), the
                # stream's cleanup (gate, gauges, the span's output_tokens/finish_reason) runs before the span ends
                async with contextlib.aclosing(self._stream(req, context, sp)) as stream:
                    async for resp in stream:
                        yield resp
        finally:
            imp = req.kv_import
            if imp is not None and imp.reservation is not None and isinstance(self.ctx.engine, CoreEngine):
                # a no-op once the request took the blocks; else (refused, overloaded, cancelled before the
                # engine saw it) the pulled blocks go back unregistered
                self.ctx.engine.cancel_reservation(imp.reservation)

    async def DecodeStream(  # type: ignore[override]  # answers with context.write, as a streaming handler may
        self,
        request_iterator: AsyncIterator[worker_pb2.DecodeStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Many Decode requests on one stream, responses batched per message (worker/decode_stream.py)."""
        await serve_stream(self.Decode, request_iterator, context)

    async def _reserve(self, req: EngineRequest, deadline: float) -> KvReservation | None:
        """The blocks the pulled KV goes into, waiting for free blocks up to ``deadline`` (monotonic)."""
        engine = self.ctx.engine
        assert isinstance(engine, CoreEngine)
        delay = 0.002
        while (res := engine.reserve_kv(req.token_ids, req.lora)) is None:
            if time.monotonic() + delay > deadline:
                return None
            await asyncio.sleep(delay)  # blocks free as running requests finish
            delay = min(2 * delay, 0.05)
        return res

    async def _continue_prefill(
        self, request: worker_pb2.DecodeRequest, req: EngineRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """Reserve the blocks the handle's KV needs, pull what this cache lacks straight into them; on any
        failure free them and prefill locally instead.

        Either way the request continues after the prefill's first token, so the client sees the same
        tokens; only the time to the second token differs.
        """
        ctx = self.ctx
        handle = request.kv_handle
        engine = ctx.engine
        if ctx.geometry is None or not isinstance(engine, CoreEngine):
            await self._refuse(
                context,
                errors.Unimplemented(
                    f"worker {ctx.instance_id} cannot pull KV over KvTransfer; send Decode without kv_handle"
                ),
            )
        want = block_hash_list(req.token_ids, engine.block_size, req.lora)
        if handle.num_tokens != len(req.token_ids) or list(handle.block_hashes) != want:
            await self._refuse(
                context,
                errors.InvalidArgument(
                    f"kv_handle {handle.handle_id!r} covers {handle.num_tokens} other tokens than this prompt "
                    f"of {len(req.token_ids)}"
                ),
            )
        req.prefilled = [request.first_token]
        try:
            res = await self._reserve(req, _reserve_deadline(handle, context.time_remaining()))
        except errors.DynamoError as e:
            await self._refuse(context, e)
        if res is None:
            self._pull_failed(req, handle, "no free KV blocks before the lease expires")
            await kv_transfer.release(ctx.kv_channels.get(handle.address), handle)
            return
        req.kv_import = KvImport(res.first_block, len(req.token_ids), res)  # the Decode's finally frees it
        with spans.span(
            "kv_transfer", request_id=req.request_id, source=handle.instance_id, first_block=res.first_block
        ) as sp:
            try:
                pulled = await kv_transfer.pull(
                    ctx.kv_channels.get(handle.address),
                    handle,
                    res.first_block,
                    ctx.geometry,
                    kv_transfer.ReservedBlocks(engine, res),
                    context.time_remaining(),
                    path=ctx.kv_transfer_path,
                )
            except errors.DynamoError as e:
                engine.cancel_reservation(res)  # half-written: back to the free pool, never registered
                req.kv_import = None
                self._pull_failed(req, handle, e.message)
                spans.set_attributes(sp, fallback=e.name)
                await kv_transfer.release(ctx.kv_channels.get(handle.address), handle)
                return
            spans.set_attributes(sp, bytes=pulled.bytes, seconds=pulled.seconds)
        ctx.metrics.kv_pulled_bytes.labels(ctx.model).inc(pulled.bytes)
        ctx.metrics.kv_pull_seconds.labels(ctx.model).observe(pulled.seconds)

    def _pull_failed(self, req: EngineRequest, handle: kv_transfer_pb2.KvHandle, why: str) -> None:
        ctx = self.ctx
        ctx.pull_fallbacks += 1
        ctx.metrics.kv_pull_fallbacks.labels(ctx.model).inc()
        log.warning("request %s: KV pull from %s failed (%s); prefilling locally", req.request_id, handle.address, why)


def _reserve_deadline(handle: kv_transfer_pb2.KvHandle, time_remaining: float | None) -> float:
    """How long a decoder may wait for free blocks: until the lease expires (less a margin for the pull
    itself) or the call's deadline, whichever comes first."""
    now = time.monotonic()
    deadline = now + (time_remaining if time_remaining is not None else 30.0)
    if handle.lease_expiry_unix_ms:
        deadline = min(deadline, now + handle.lease_expiry_unix_ms / 1e3 - time.time() - 1.0)
    return deadline


class PrefillServicer(worker_pb2_grpc.PrefillServiceServicer, _Requests):
    """Prefill = run the prompt and sample one token; the prompt's blocks stay pinned under a lease
    (``--kv-lease-seconds``) until a decode worker pulls them over KvTransferService."""

    def __init__(self, ctx: WorkerContext) -> None:
        _Requests.__init__(self, ctx, "prefill")

    async def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.PrefillResponse:
        ctx = self.ctx
        leasing = ctx.geometry is not None
        req = await self._build(request, context, max_tokens=1, hold_kv=leasing)
        first: worker_pb2.DecodeResponse | None = None
        leases: list[EngineOutput] = []
        attrs = {"model": ctx.model, "prompt_tokens": len(req.token_ids)}
        with spans.span("prefill", request_id=req.request_id, **attrs) as sp:
            async for resp in self._stream(req, context, sp, leases):
                if first is None:
                    first = resp
                else:
                    first.token_ids.extend(resp.token_ids)
                    first.usage.CopyFrom(resp.usage)
        lease = leases[-1].lease if leases else None
        if first is None or not first.token_ids:
            if lease is not None and isinstance(ctx.engine, CoreEngine):
                ctx.engine.release_lease(lease.lease_id)
            await _abort(context, errors.Internal("the engine produced no token"))
        token = first.token_ids[0]
        # the first token ends the request by itself: max_tokens 1, or a stop token once min_tokens allows
        finish = FINISH_REASONS[None]
        if request.stop.max_tokens == 1:
            finish = FINISH_REASONS["length"]
        elif first.finish_reason == FINISH_REASONS["stop"] and request.stop.min_tokens <= 1:
            finish = FINISH_REASONS["stop"]
        handle = kv_transfer_pb2.KvHandle(
            instance_id=ctx.instance_id,
            address=ctx.grpc_address,
            handle_id=lease.lease_id if lease is not None else req.request_id,
            block_hashes=lease.block_hashes
            if lease is not None
            else block_hash_list(req.token_ids, ctx.engine.block_size, req.lora),
            num_tokens=len(req.token_ids),
            lease_expiry_unix_ms=lease.expiry_unix_ms if lease is not None else 0,
        )
        if ctx.geometry is not None:
            handle.layout.CopyFrom(ctx.geometry.layout())
        if lease is not None and finish and isinstance(ctx.engine, CoreEngine):
            ctx.engine.release_lease(lease.lease_id)  # nothing will pull it
        lp = first.logprobs[0] if first.logprobs else None
        return worker_pb2.PrefillResponse(
            first_token=token, kv_handle=handle, usage=first.usage, first_logprob=lp, finish_reason=finish
        )


class ModelFilesServicer(worker_pb2_grpc.ModelFilesServiceServicer):
    """The files a model card names by checksum (tokenizer.json), streamed in 1 MiB chunks."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx

    async def GetModelFile(
        self, request: worker_pb2.GetModelFileRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GetModelFileResponse]:
        ctx = self.ctx
        if request.model and request.model != ctx.model:
            await _abort(context, errors.ModelNotFound(f"model {request.model!r} is not served here"))
        data = ctx.files.get(request.name)
        if data is None:
            names = ", ".join(sorted(ctx.files))
            await _abort(context, errors.NotFound(f"no file {request.name!r} (have: {names})"))
        have = ctx.file_sha256[request.name]
        if request.sha256 and request.sha256.lower() != have:
            await _abort(
                context,
                errors.FailedPrecondition(
                    f"{request.name} of {ctx.model!r} here has sha256 {have}, not {request.sha256}"
                ),
            )
        total = len(data)
        for off in range(0, max(total, 1), FILE_CHUNK_BYTES):
            yield worker_pb2.GetModelFileResponse(data=data[off : off + FILE_CHUNK_BYTES], offset=off, total_size=total)
