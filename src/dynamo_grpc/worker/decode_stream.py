"""DecodeStream: many Decode requests on one long-lived stream, their responses batched per message.

A frontend keeps one DecodeStream per worker. Each request on it runs exactly as a Decode call does (the same
`DecodeServicer.Decode`: admission, drain, deadline, metrics, KV pull), in a task of its own, with a
`StreamContext` in place of the call's gRPC context. Every response it yields goes into the stream's outbox;
one writer sends everything the outbox holds as one DecodeStreamResponse, and while that write is in flight
the next batch collects. Under load, that is one message per engine step for all the stream's requests
instead of one per request (vLLM's engine core sends its outputs to its frontend the same way).

A request that ends without a finish (an abort with a status, the engine stopping it) gets a DecodeStreamEnd
carrying the status Decode would have ended with. A cancel from the client, or the stream ending, cancels
the request's task: the engine frees its KV as when a Decode call is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, NoReturn

import grpc

from dynamo_grpc import errors
from dynamo_grpc.v1 import worker_pb2

log = logging.getLogger(__name__)

#: one request's Decode: responses until a finish, or an abort through the context
DecodeFn = Callable[[worker_pb2.DecodeRequest, Any], AsyncGenerator[worker_pb2.DecodeResponse, None]]


class StreamAbort(Exception):
    """`StreamContext.abort`: the request ends with this status (a DecodeStreamEnd), the stream goes on."""

    def __init__(self, code: grpc.StatusCode, details: str, name: str) -> None:
        super().__init__(details)
        self.code, self.details, self.name = code, details, name


class StreamContext:
    """The part of grpc.aio's ServicerContext that `DecodeServicer.Decode` uses, for one request on a stream."""

    def __init__(self, timeout_ms: int) -> None:
        self._deadline = time.monotonic() + timeout_ms / 1e3 if timeout_ms else None
        self._name = ""

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def set_trailing_metadata(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._name = next((v for k, v in metadata if k == errors.METADATA_KEY), "")

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise StreamAbort(code, details, self._name)


def _end(request_id: str, code: grpc.StatusCode, message: str, name: str) -> worker_pb2.DecodeStreamItem:
    end = worker_pb2.DecodeStreamEnd(code=code.value[0], message=message, error=name)
    return worker_pb2.DecodeStreamItem(request_id=request_id, end=end)


def _failed(request_id: str, err: errors.DynamoError) -> worker_pb2.DecodeStreamItem:
    return _end(request_id, errors.grpc_status(err), err.message, err.name)


async def serve_stream(
    decode: DecodeFn, requests: AsyncIterator[worker_pb2.DecodeStreamRequest], context: grpc.aio.ServicerContext
) -> None:
    """Run every request the client starts until the client closes its side and they are done."""
    outbox: list[worker_pb2.DecodeStreamItem] = []
    ready = asyncio.Event()
    written = asyncio.Event()  # set once the batch collecting now has been written (a new one per batch)
    tasks: dict[str, asyncio.Task[None]] = {}
    loop = asyncio.get_running_loop()
    closing = False  # the client closed its side and every request is done, or the stream is being torn down

    def put(item: worker_pb2.DecodeStreamItem) -> None:
        outbox.append(item)
        ready.set()

    async def run(start: worker_pb2.DecodeStart) -> None:
        rid = start.request.request_id
        finished = False
        try:
            async with contextlib.aclosing(decode(start.request, StreamContext(start.timeout_ms))) as responses:
                async for resp in responses:
                    item = worker_pb2.DecodeStreamItem(request_id=rid)
                    item.response.CopyFrom(resp)
                    put(item)
                    if resp.finish_reason:
                        finished = True
                        break
                    # one message in flight per request, as on a Decode call: what the engine makes meanwhile
                    # waits in the request's own mailbox and comes out merged into the next response
                    await written.wait()
            if not finished:
                put(_end(rid, grpc.StatusCode.OK, "the engine stopped the request without a finish", ""))
        except StreamAbort as e:
            put(_end(rid, e.code, e.details, e.name))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if closing or task is None or tasks.get(rid) is not task:  # the stream ends, or the client cancelled
                raise
            # Decode's own deadline timer cancelled it (the context's time ran out): the status Decode ends with
            task.uncancel()
            put(_failed(rid, errors.DeadlineExceeded(f"request {rid} passed its deadline")))
        except Exception as e:  # a bug below Decode: this request fails, the stream and its others go on
            log.exception("request %s failed on DecodeStream", rid)
            put(_failed(rid, errors.from_exception(e)))
        finally:
            if tasks.get(rid) is asyncio.current_task():
                del tasks[rid]

    async def write() -> None:
        nonlocal outbox, written
        while True:
            if not outbox:
                if closing:
                    return
                ready.clear()
                await ready.wait()
                continue
            batch, outbox = outbox, []
            done, written = written, asyncio.Event()
            try:
                await context.write(worker_pb2.DecodeStreamResponse(items=batch))
            finally:
                done.set()

    writer = loop.create_task(write())
    try:
        async for msg in requests:
            for rid in msg.cancel:
                task = tasks.pop(rid, None)
                if task is not None:
                    task.cancel()
            for start in msg.start:
                rid = start.request.request_id
                if rid in tasks:
                    put(_failed(rid, errors.InvalidArgument(f"request {rid!r} is already running on this stream")))
                    continue
                tasks[rid] = loop.create_task(run(start))
        while tasks:  # the client closed its side: finish what it started
            await asyncio.gather(*list(tasks.values()), return_exceptions=True)
        closing = True  # the writer sends what is left, then returns
        ready.set()
        await writer
    finally:
        closing = True
        for task in list(tasks.values()):
            task.cancel()
        if tasks:
            await asyncio.gather(*list(tasks.values()), return_exceptions=True)
        if not writer.done():
            writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):  # the client is gone: nothing to tell it
            await writer
