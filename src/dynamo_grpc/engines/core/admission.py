"""Which waiting request the scheduler admits next: ``fcfs`` (arrival) or ``lpm`` (longest prefix match).

``lpm`` is SGLang's ``--schedule-policy lpm``: before admitting, the waiting queue is sorted by how much
of each prompt is already cached, longest first, so freed blocks go to the request that needs the least
prefill. Ours counts every tier at its weight (a block on the device 1.0, in host memory 0.75, on disk
0.25: the router's defaults, Dynamo's), so a host copy ranks below the same prefix on the device but
above a cold prompt. As in SGLang, a queue longer than ``max_sorted`` is served in arrival order (sorting
every step would cost more than it saves). SGLang has no bound on how long a cold prompt can be passed
over; ours has one: a request that has waited ``age_cap_s`` goes first, oldest first, whatever is cached.
Preempted requests and requests holding pulled KV blocks stay at the front, in their order (they were
admitted before, or hold blocks the others may be waiting for).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .request import Request, Status

POLICIES = ("fcfs", "lpm")
#: SGLang turns lpm off above this many waiting requests (schedule_policy.py)
DEFAULT_MAX_SORTED = 128


@dataclass
class Ordering:
    """The waiting queue in admission order, and which of its requests went first by the age cap."""

    queue: deque[Request]
    aged: set[str]


def lpm_order(
    waiting: deque[Request],
    credit: Callable[[Request], float],
    now: float,
    age_cap_s: float,
    max_sorted: int = DEFAULT_MAX_SORTED,
) -> Ordering:
    """``waiting`` reordered for admission: held/preempted requests, then the aged by arrival, then the rest
    by cached-prefix ``credit`` (longest first; arrival breaks ties)."""
    if len(waiting) > max_sorted:
        return Ordering(deque(sorted(waiting, key=_front_then_arrival)), set())
    front: list[Request] = []
    aged: list[Request] = []
    rest: list[tuple[float, float, int, Request]] = []
    for i, req in enumerate(waiting):
        if _keeps_its_place(req):
            front.append(req)
        elif age_cap_s > 0 and now - req.arrival_s >= age_cap_s:
            aged.append(req)
        else:
            rest.append((-credit(req), req.arrival_s, i, req))
    aged.sort(key=lambda r: r.arrival_s)
    rest.sort(key=lambda t: t[:3])
    return Ordering(deque([*front, *aged, *(t[3] for t in rest)]), {r.request_id for r in aged})


def _keeps_its_place(req: Request) -> bool:
    return req.status is Status.PREEMPTED or (req.kv_import is not None and bool(req.blocks))


def _front_then_arrival(req: Request) -> tuple[int, float]:
    return (0 if _keeps_its_place(req) else 1, req.arrival_s)
