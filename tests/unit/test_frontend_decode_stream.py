"""The frontend's DecodeStream mailbox: queued responses merge in order, ends and failures arrive as errors."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynamo_grpc import errors
from dynamo_grpc.frontend import main as frontend_main
from dynamo_grpc.frontend.decode_stream import _Mailbox
from dynamo_grpc.v1 import common_pb2, worker_pb2


def _resp(tokens: list[int], finish: int = 0, completion: int = 0) -> worker_pb2.DecodeStreamItem:
    r = worker_pb2.DecodeResponse(token_ids=tokens, finish_reason=finish)
    r.usage.completion_tokens = completion
    for t in tokens:
        r.logprobs.add(token_id=t, logprob=-float(t))
    return worker_pb2.DecodeStreamItem(request_id="r", response=r)


def _end(code: grpc.StatusCode, name: str, message: str = "why") -> worker_pb2.DecodeStreamItem:
    return worker_pb2.DecodeStreamItem(
        request_id="r", end=worker_pb2.DecodeStreamEnd(code=code.value[0], error=name, message=message)
    )


@given(st.lists(st.lists(st.integers(0, 50_000), max_size=4), min_size=1, max_size=8), st.integers(0, 8))
def test_responses_waiting_together_are_taken_as_one_in_order(chunks: list[list[int]], arrive_late: int) -> None:
    async def run() -> list[worker_pb2.DecodeResponse]:
        box = _Mailbox("r")
        n = len(chunks)
        items = [_resp(c, common_pb2.FINISH_REASON_LENGTH if k == n - 1 else 0, k + 1) for k, c in enumerate(chunks)]
        cut = min(arrive_late, n)
        for item in items[: n - cut]:
            box.put(item)
        taken = []

        async def later() -> None:
            for item in items[n - cut :]:
                await asyncio.sleep(0)
                box.put(item)

        feeder = asyncio.ensure_future(later())
        while not (taken and taken[-1].finish_reason):
            taken.append(await box.take())
        await feeder
        return taken

    taken = asyncio.run(run())
    # the tokens and their logprobs, in order, whatever the grouping; the finish and usage of the last
    assert [t for r in taken for t in r.token_ids] == [t for c in chunks for t in c]
    assert [lp.token_id for r in taken for lp in r.logprobs] == [t for c in chunks for t in c]
    assert taken[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert taken[-1].usage.completion_tokens == len(chunks)
    assert all(not r.finish_reason for r in taken[:-1])


def test_an_end_is_raised_as_its_error_after_the_responses_before_it() -> None:
    async def run() -> tuple[worker_pb2.DecodeResponse, BaseException]:
        box = _Mailbox("r")
        box.put(_resp([1, 2]))
        box.put(_end(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded", "queue full"))
        first = await box.take()
        try:
            await box.take()
        except errors.DynamoError as e:
            return first, e
        raise AssertionError("no error")

    first, err = asyncio.run(run())
    assert list(first.token_ids) == [1, 2]
    assert isinstance(err, errors.Overloaded) and "queue full" in err.message


@pytest.mark.parametrize(
    ("code", "name", "cls"),
    [
        (grpc.StatusCode.OK, "", errors.WorkerLost),  # stopped without a finish: as a Decode stream without one
        (grpc.StatusCode.INTERNAL, "internal", errors.WorkerLost),  # the worker broke: migrate
        (grpc.StatusCode.UNAVAILABLE, "draining", errors.Draining),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline_exceeded", errors.DeadlineExceeded),
        (grpc.StatusCode.INVALID_ARGUMENT, "unsupported_option", errors.InvalidArgument),
    ],
)
def test_an_end_maps_as_the_same_status_on_a_decode_call_would(
    code: grpc.StatusCode, name: str, cls: type[errors.DynamoError]
) -> None:
    async def run() -> BaseException:
        box = _Mailbox("r")
        box.put(_end(code, name))
        with pytest.raises(errors.DynamoError) as e:
            await box.take()
        return e.value

    assert type(asyncio.run(run())) is cls


def test_a_failure_wakes_a_waiting_reader() -> None:
    async def run() -> None:
        box = _Mailbox("r")
        reader = asyncio.ensure_future(box.take())
        await asyncio.sleep(0)
        box.fail(errors.WorkerLost("stream broke"))
        with pytest.raises(errors.WorkerLost, match="stream broke"):
            await reader

    asyncio.run(run())


def test_transport_flag_refuses_stream_with_tracing(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        frontend_main.main(["--decode-transport", "stream", "--trace-file", f"{tmp_path}/t.jsonl", "--grpc-port", "0"])
    assert e.value.code == 2
    assert "--decode-transport stream" in capsys.readouterr().err
