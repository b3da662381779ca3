"""The frontend admission queue: bounded running and waiting counts, FCFS, refusal when full, no leaks."""

from __future__ import annotations

import asyncio

import pytest

from dynamo_grpc import errors
from dynamo_grpc.frontend.admission import Admission


async def test_free_slot_admits_without_waiting() -> None:
    a = Admission(2, 0)
    await a.acquire()
    await a.acquire()
    assert (a.inflight, a.waiting) == (2, 0)
    with pytest.raises(errors.Overloaded, match="--max-inflight-requests"):
        await a.acquire()
    assert a.rejected == 1
    a.release()
    a.release()
    assert a.inflight == 0


async def test_waiters_run_first_come_first_served() -> None:
    a = Admission(1, 3)
    order: list[int] = []

    async def job(i: int) -> None:
        async with a.slot():
            order.append(i)
            await asyncio.sleep(0)

    await a.acquire()
    tasks = [asyncio.create_task(job(i)) for i in range(3)]
    await asyncio.sleep(0)
    assert a.waiting == 3
    with pytest.raises(errors.Overloaded) as e:  # queue full: refused at once, as RESOURCE_EXHAUSTED / 429
        await a.acquire()
    assert errors.to_http(e.value)[:2] == (429, {"Retry-After": "1"})
    a.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert (a.inflight, a.waiting) == (0, 0)


async def test_cancelled_waiter_gives_its_place_back() -> None:
    a = Admission(1, 2)
    await a.acquire()
    gone = asyncio.create_task(a.acquire())
    stays = asyncio.create_task(a.acquire())
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert a.waiting == 1
    a.release()
    await stays
    assert (a.inflight, a.waiting) == (1, 0)
    a.release()
    assert a.inflight == 0


async def test_waiter_cancelled_after_being_handed_a_slot_passes_it_on() -> None:
    a = Admission(1, 2)
    await a.acquire()
    first = asyncio.create_task(a.acquire())
    second = asyncio.create_task(a.acquire())
    await asyncio.sleep(0)
    a.release()  # hands the place to `first` ...
    first.cancel()  # ... which leaves before running
    await asyncio.gather(first, return_exceptions=True)
    await second
    assert (a.inflight, a.waiting) == (1, 0)
    a.release()
    assert a.inflight == 0
