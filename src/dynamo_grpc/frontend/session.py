"""A request's placement on workers: route → Decode stream → free, again after a migration or a re-route.

The error decides what happens (`dynamo_grpc.errors` specs, one rule for every hop):
- `spec.migrate` (WorkerLost, Draining; UNKNOWN/INTERNAL from a worker): route again, excluding that worker,
  with the prompt plus the tokens generated so far; counted against `--migration-limit`;
- `spec.reroute` (Overloaded: that worker's queue is full) before the first token: route ONCE more,
  excluding it, not counted as a migration; if that one is full too, or no other worker is left, the
  client gets Overloaded (RESOURCE_EXHAUSTED / HTTP 429 + Retry-After);
- anything else (InvalidArgument, PromptTooLong, ...) goes to the client as it is.
Every route is freed exactly once (`Router.free` in the attempt's `finally`), on every path.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING, Protocol

from dynamo_grpc import errors
from dynamo_grpc.frontend.disagg import DisaggPlanner, Prefilled, first_response, with_handle
from dynamo_grpc.frontend.routing import Router
from dynamo_grpc.logs import request_id_var
from dynamo_grpc.observability import spans, tracing
from dynamo_grpc.v1 import common_pb2, worker_pb2

if TYPE_CHECKING:  # pragma: no cover
    from dynamo_grpc.frontend.pipeline import Prepared

log = logging.getLogger(__name__)


class DecodeClient(Protocol):
    def decode(
        self, address: str, request: worker_pb2.DecodeRequest, timeout: float | None = None
    ) -> AsyncGenerator[worker_pb2.DecodeResponse, None]: ...


def decode_request(route_id: str, p: Prepared, lora: str, generated: Sequence[int]) -> worker_pb2.DecodeRequest:
    """The worker's request for one placement: prompt plus tokens so far, the budget that is left."""
    stop = p.stop
    if generated:  # a migration: the tokens so far are part of the prompt and count against the limits
        stop = common_pb2.StopConditions()
        stop.CopyFrom(p.stop)
        stop.max_tokens = p.max_tokens - len(generated)
        stop.min_tokens = max(0, p.stop.min_tokens - len(generated))
    return worker_pb2.DecodeRequest(
        request_id=route_id,
        model=p.model.name,
        token_ids=[*p.prompt_ids, *generated] if generated else p.prompt_ids,
        sampling=p.sampling,
        stop=stop,
        lora=lora,
    )


class RouteSession:
    """Where one request runs, across migrations; `responses` yields the worker responses in order."""

    def __init__(
        self,
        router: Router,
        workers: DecodeClient,
        p: Prepared,
        lora: str,
        request_id: str,
        migration_limit: int,
        deadline: float | None,
        disagg: DisaggPlanner | None = None,
    ) -> None:
        self.router = router
        self.disagg = disagg
        #: the prefill worker of a disaggregated request ("" when it was prefilled where it decodes)
        self.prefill_worker_id = ""
        self.workers = workers
        self.p = p
        self.lora = lora
        self.request_id = request_id
        self.migration_limit = migration_limit
        self.deadline = deadline  # time.monotonic() value, or None
        self.worker_id = ""
        self.route_pool = ""  # the global router's decision (pool, reason) for the final response
        self.route_reason = ""
        self.migrations = 0
        self._span: spans.trace.Span | None = None  # the frontend.request span, when tracing

    def responses(self, generated: list[int]) -> AsyncGenerator[worker_pb2.DecodeResponse, None]:
        """Worker responses until one finishes; `generated` (kept by the caller) is what a migration resends.

        Returns without a finish only when every token was generated before the worker was lost.
        """
        request_id_var.set(self.request_id)  # JSON log lines of this request carry its id
        return self._traced(generated) if tracing.enabled() else self._placements(generated)

    async def _traced(self, generated: list[int]) -> AsyncGenerator[worker_pb2.DecodeResponse, None]:
        """`_placements` inside the request's span (model, prompt tokens, routing mode; TTFT as an event)."""
        mode = getattr(self.router, "mode", None) or type(self.router).__name__
        attrs = {"model": self.p.model.name, "prompt_tokens": len(self.p.prompt_ids), "routing_mode": mode}
        with spans.span("frontend.request", request_id=self.request_id, **attrs) as s:
            self._span = s
            placements = self._placements(generated)
            async with contextlib.aclosing(placements):
                async for resp in placements:
                    yield resp
            spans.set_attributes(s, output_tokens=len(generated), migrations=self.migrations)

    async def _placements(self, generated: list[int]) -> AsyncGenerator[worker_pb2.DecodeResponse, None]:
        p, m = self.p, self.p.model
        exclude: set[str] = set()
        overloaded: errors.DynamoError | None = None  # the first worker was full: we re-routed once
        route_id = self.request_id
        t_start = time.perf_counter_ns()
        while True:
            if not m.workers and not exclude:
                raise errors.Unavailable(f"model '{m.name}' has no live worker")
            try:
                # the phase only when disaggregated, so routers written before phases existed keep working
                phase = self.disagg.phase(m.workers) if self.disagg is not None else "aggregated"
                kw = {"phase": phase} if phase != "aggregated" else {}
                with spans.span("route", request_id=route_id, model=m.name, excluded=len(exclude)) as rs:
                    pick = await self.router.route(
                        route_id, m.name, [*p.prompt_ids, *generated], m.workers, exclude,
                        p.max_tokens - len(generated), self.lora, **kw,
                    )  # fmt: skip
                    spans.set_attributes(
                        rs, worker=pick.instance_id, overlap_blocks=pick.overlap_blocks, cost=pick.cost
                    )
            except errors.Unavailable as e:
                if overloaded is not None:  # every worker is full
                    raise overloaded from e
                if self.migrations:
                    raise errors.Unavailable(f"worker lost and no other worker left: {e.message}") from e
                raise
            self.worker_id = pick.instance_id
            self.route_pool, self.route_reason = pick.pool, pick.reason
            if not p.timings.routed_at_ns:
                p.timings.routed_at_ns = time.perf_counter_ns()
            placed = route_id  # freed in `finally`, whatever happens to this placement
            remaining = None if self.deadline is None else max(0.001, self.deadline - time.monotonic())
            first = True
            prefilled: Prefilled | None = None
            pulled = False
            try:
                request = decode_request(route_id, p, self.lora, generated)  # inside: the route is freed if it fails
                if self.disagg is not None and not generated and not self.migrations and overloaded is None:
                    prefilled = await self.disagg.prefill(
                        self.request_id, m.name, m.workers, pick, m.card.block_size, request, self.deadline
                    )
                if prefilled is not None:
                    self.prefill_worker_id = prefilled.worker_id
                    request = with_handle(request, prefilled)
                    head = first_response(prefilled)
                    self._count_tokens(time.perf_counter_ns(), 1)
                    if not p.timings.first_token_ns:
                        p.timings.first_token_ns = time.perf_counter_ns() - t_start
                    yield head
                    if head.finish_reason:
                        return
                # read directly (no read-ahead task): the worker already sends in one message the tokens an
                # engine step made ready, so a frontend-side merge saved almost no writes and cost a task
                # and a queue hop per message (docs/scale-out.md, "The frontend's hot path")
                stream = self.workers.decode(pick.address, request, remaining)
                async with contextlib.aclosing(stream):
                    async for resp in stream:
                        pulled = True
                        now = time.perf_counter_ns()
                        n = len(resp.token_ids)
                        self._count_tokens(now, n)
                        if first:
                            first = False
                            if not p.timings.first_token_ns:
                                p.timings.first_token_ns = now - t_start
                            self.router.prefill_done(route_id, n)
                        finish = resp.finish_reason
                        if finish:
                            if finish == common_pb2.FINISH_REASON_ERROR:
                                raise errors.Internal(f"worker {pick.instance_id} failed the request")
                            if finish == common_pb2.FINISH_REASON_CANCELLED:
                                raise errors.WorkerLost(f"worker {pick.instance_id} cancelled the request")
                            yield resp
                            return
                        yield resp
                raise errors.WorkerLost(f"worker {pick.instance_id} ended the stream without a finish")
            except errors.DynamoError as e:
                exclude.add(pick.instance_id)
                if e.spec.reroute and first and not generated and overloaded is None:
                    log.info("request %s: %s; re-routing once", self.request_id, e.message)
                    overloaded = e
                    route_id = f"{self.request_id}.r"
                    continue
                if not e.spec.migrate:
                    raise
                self.migrations += 1
                p.timings.migrations = self.migrations
                if self.migrations > self.migration_limit:
                    raise errors.Unavailable(f"{e.message} (migration limit {self.migration_limit} reached)") from e
                log.warning("request %s: %s; migrating with %d tokens", self.request_id, e.message, len(generated))
                route_id = f"{self.request_id}.m{self.migrations}"
                if len(generated) >= p.max_tokens:
                    return
            finally:
                self.router.free(placed, len(generated))
                if prefilled is not None and not pulled and self.disagg is not None:
                    self.disagg.release_later(prefilled)  # the decoder never answered: free the prefill's blocks

    def _count_tokens(self, now_ns: int, n: int) -> None:
        """Token times for the metrics (TTFT, ITL per token) and the span's first-token event."""
        t = self.p.timings
        if not n:
            return
        if not t.first_token_at_ns:
            t.first_token_at_ns = now_ns
            if self._span is not None:
                spans.event(self._span, "first_token", ttft_s=(now_ns - t.arrival_ns) / 1e9 if t.arrival_ns else None)
        else:
            t.token_gaps.append(((now_ns - t.last_token_at_ns) / 1e9 / n, n))
        t.last_token_at_ns = now_ns
        t.output_tokens += n
