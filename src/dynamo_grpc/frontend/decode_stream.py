"""The frontend's side of DecodeStream: one long-lived stream per worker carries all its requests.

A request on a `WorkerStream` (`open`, then its mailbox's `take` until the finish, then `release`; driven by
`WorkerClient.decode`) gets the same responses and the same errors as on a Decode call, but the requests share
one gRPC stream: starting a request is part of one message (every start and cancel waiting while the previous
message was being written go out together), and each message the worker sends carries every request's ready
responses. A reader task hands each response to its request's mailbox; a
request that finds several waiting takes them as one response (tokens and logprobs in order, the last
finish and usage), so under load a client gets fewer, larger chunks and the first token is never held.

What a Decode call's status would say arrives as a DecodeStreamEnd; a broken stream fails every request on it
as the broken call would have (a worker that went away: WorkerLost, so the request migrates); a deadline is
a timer per request that cancels it on the worker. A worker without DecodeStream (UNIMPLEMENTED) is
remembered and served by Decode calls instead. A stream with no request for IDLE_CLOSE_S is closed (the next
request opens another), so streams and their tasks live only while requests flow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator

import grpc

from dynamo_grpc import errors
from dynamo_grpc.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


class StreamUnsupported(Exception):
    """The worker does not serve DecodeStream: use a Decode call (nothing was sent for the request)."""


class _Mailbox:
    """One request's items, and its reader while it waits for one."""

    __slots__ = ("failure", "items", "request_id", "timer", "waiter")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.items: deque[worker_pb2.DecodeStreamItem] = deque()
        self.waiter: asyncio.Future[None] | None = None
        #: what the stream or the deadline ended the request with (raised once its items are taken)
        self.failure: BaseException | None = None
        self.timer: asyncio.TimerHandle | None = None

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def put(self, item: worker_pb2.DecodeStreamItem) -> None:
        self.items.append(item)
        self.wake()

    def fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self.wake()

    async def take(self) -> worker_pb2.DecodeResponse:
        """The next response, merged with every response after it that is already here."""
        items = self.items
        while not items:
            if self.failure is not None:
                raise self.failure
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
            self.waiter = None
        first = items.popleft()
        if first.HasField("end"):
            raise _ended(first.end)
        resp = first.response
        while items and not resp.finish_reason and items[0].HasField("response"):
            resp.MergeFrom(items.popleft().response)  # token_ids and logprobs append; finish and usage: the last
        return resp


def _ended(end: worker_pb2.DecodeStreamEnd) -> errors.DynamoError:
    if end.code == grpc.StatusCode.OK.value[0]:
        return errors.WorkerLost(f"the worker stopped the request without a finish: {end.message}")
    code = next((c.name for c in grpc.StatusCode if c.value[0] == end.code), "UNKNOWN")
    return _lost_if_internal(errors.from_status(code, end.message, end.error))


#: an idle stream is closed after this long without requests (the next request opens a new one), so a frontend
#: holds streams, and a worker their handlers, only while requests flow
IDLE_CLOSE_S = 0.25


class WorkerStream:
    """One DecodeStream to one worker, shared by every request the frontend sends there."""

    def __init__(self, channel: grpc.aio.Channel, address: str) -> None:
        self.channel = channel
        self.address = address
        self.broken = False
        self._boxes: dict[str, _Mailbox] = {}
        self._next = worker_pb2.DecodeStreamRequest()  # the starts and cancels of the next message
        self._more: asyncio.Future[None] | None = None
        self._closing = False
        self._idle: asyncio.TimerHandle | None = None
        self._call = worker_pb2_grpc.DecodeServiceStub(channel).DecodeStream(self._outgoing())
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def _outgoing(self) -> AsyncIterator[worker_pb2.DecodeStreamRequest]:
        """Every start and cancel that waited while the previous message was written, as one message."""
        while True:
            while not (self._next.start or self._next.cancel):
                if self._closing:
                    return
                self._more = asyncio.get_running_loop().create_future()
                await self._more
                self._more = None
            msg, self._next = self._next, worker_pb2.DecodeStreamRequest()
            yield msg

    def _send(self) -> None:
        more = self._more
        if more is not None and not more.done():
            more.set_result(None)

    async def _read(self) -> None:
        failure: BaseException
        try:
            async for msg in self._call:
                boxes = self._boxes
                for item in msg.items:
                    box = boxes.get(item.request_id)
                    if box is not None:  # else: cancelled here, its last items were already on their way
                        box.put(item)
            failure = errors.WorkerLost(f"worker {self.address}: DecodeStream ended")
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.info("worker %s has no DecodeStream; using Decode calls", self.address)
                failure = StreamUnsupported(self.address)
            else:
                failure = worker_error(e, self.address)
        except asyncio.CancelledError:
            failure = errors.WorkerLost(f"worker {self.address}: the stream was closed")
        self.broken = True
        for box in self._boxes.values():
            box.fail(failure)
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError

    @property
    def usable(self) -> bool:
        """Takes new requests: not broken, not closing."""
        return not (self.broken or self._closing)

    def open(self, request: worker_pb2.DecodeRequest, timeout: float | None = None) -> _Mailbox:
        """Start a request; its responses come through the mailbox's `take` (`release` it when done)."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        rid = request.request_id
        if rid in self._boxes:
            raise errors.InvalidArgument(f"request {rid!r} is already running on worker {self.address}")
        box = self._boxes[rid] = _Mailbox(rid)
        if self.broken:  # a stream that broke since the caller looked: as the broken call would have
            box.fail(errors.WorkerLost(f"worker {self.address}: DecodeStream ended"))
            return box
        if timeout is not None:
            late = errors.DeadlineExceeded(f"worker {self.address}: deadline exceeded")
            box.timer = asyncio.get_running_loop().call_later(timeout, box.fail, late)
        start = self._next.start.add(timeout_ms=_millis(timeout))
        start.request.CopyFrom(request)
        self._send()
        return box

    def release(self, box: _Mailbox, finished: bool) -> None:
        """The request's reader is done; one that ended before its finish or end is cancelled on the worker."""
        if box.timer is not None:
            box.timer.cancel()
        if self._boxes.get(box.request_id) is box:
            del self._boxes[box.request_id]
        if not finished and not self.broken:
            self._next.cancel.append(box.request_id)
            self._send()
        if not self._boxes and self.usable and self._idle is None:
            self._idle = asyncio.get_running_loop().call_later(IDLE_CLOSE_S, self._close_if_idle)

    def _close_if_idle(self) -> None:
        """No request for IDLE_CLOSE_S: end our side; the worker ends the stream (OK) and the reader with it."""
        self._idle = None
        if not self._boxes and self.usable:
            self._closing = True
            self._send()

    async def close(self) -> None:
        """End the stream: requests still on it fail as on a lost worker."""
        if self._idle is not None:
            self._idle.cancel()
        self._closing = True
        self._send()
        self._call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


def _millis(timeout: float | None) -> int:
    return 0 if timeout is None else max(1, int(timeout * 1000))


def worker_error(e: grpc.aio.AioRpcError, address: str) -> errors.DynamoError:
    """A worker's failure (a Decode call's or a DecodeStream's): INTERNAL/UNKNOWN mean the worker broke
    (migrate), whatever class it named."""
    return _lost_if_internal(errors.from_grpc(e, f"worker {address}"))


def _lost_if_internal(err: errors.DynamoError) -> errors.DynamoError:
    return errors.WorkerLost(err.message) if isinstance(err, errors.Internal) else err
