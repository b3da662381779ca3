"""Conditional disaggregation in the frontend (Dynamo's prefill router): remote prefill, or local on the decoder.

With prefill workers (``role=prefill``) live for a model, a request is routed over the decode pool first; its
prompt goes to remote prefill when the part the chosen decoder does not hold (prompt − overlap) exceeds
``--max-local-prefill-tokens`` AND the prefill pool is not saturated: the prompt tokens this frontend has
in flight at prefill workers, per prefill worker, are under ``--prefill-queue-threshold`` (tokens). Else the
decode worker prefills locally (aggregated on that worker). Remote prefill: KV-route over the prefill pool
→ Prefill (first token + a KvHandle lease) → the decode worker pulls the blocks and continues. A prefill
that fails for a worker-side reason (dead, draining, overloaded, unreachable) falls back to local prefill:
the client only sees a slower first token. Every decision is counted by outcome and reason on /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dynamo_grpc import errors
from dynamo_grpc.frontend.decode_stream import worker_error
from dynamo_grpc.frontend.routing import Pick, Router, WorkerEndpoint
from dynamo_grpc.observability import spans
from dynamo_grpc.transport import ChannelOptions, open_channel
from dynamo_grpc.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_MAX_LOCAL_PREFILL_TOKENS = 512
#: Dynamo's prefill router queued up to 2 requests per prefill worker; at 4k-token prompts that is 8192 tokens
DEFAULT_PREFILL_QUEUE_THRESHOLD = 8192


def add_disagg_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("disaggregation (used when prefill workers, --role prefill, are live)")
    g.add_argument(
        "--max-local-prefill-tokens",
        type=int,
        default=DEFAULT_MAX_LOCAL_PREFILL_TOKENS,
        help="prompts whose uncached part on the chosen decode worker is longer than this go to a prefill "
        "worker; shorter ones are prefilled by the decode worker (0: every prompt goes remote)",
    )
    g.add_argument(
        "--prefill-queue-threshold",
        type=int,
        default=DEFAULT_PREFILL_QUEUE_THRESHOLD,
        help="prompt tokens this frontend may have in flight per prefill worker before new prompts are "
        "prefilled locally instead (the prefill pool is saturated)",
    )


@dataclass(frozen=True)
class DisaggConfig:
    max_local_prefill_tokens: int = DEFAULT_MAX_LOCAL_PREFILL_TOKENS
    prefill_queue_threshold: int = DEFAULT_PREFILL_QUEUE_THRESHOLD

    def validate(self) -> None:
        if self.max_local_prefill_tokens < 0:
            raise ValueError("--max-local-prefill-tokens must be >= 0")
        if self.prefill_queue_threshold < 1:
            raise ValueError("--prefill-queue-threshold must be >= 1")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DisaggConfig:
        cfg = cls(args.max_local_prefill_tokens, args.prefill_queue_threshold)
        cfg.validate()
        return cfg


@dataclass(frozen=True)
class Decision:
    remote: bool
    #: short | remote | prefill_queue_full | fallback_<error name>
    reason: str


def decide(uncached_tokens: int, queued_per_worker: float, cfg: DisaggConfig) -> Decision:
    """The rule, alone: remote when the uncached prompt is long and the prefill pool has room."""
    if uncached_tokens <= cfg.max_local_prefill_tokens:
        return Decision(False, "short")
    if queued_per_worker >= cfg.prefill_queue_threshold:
        return Decision(False, "prefill_queue_full")
    return Decision(True, "remote")


@dataclass
class Prefilled:
    """A remote prefill's result: what the decode placement continues from."""

    response: worker_pb2.PrefillResponse
    worker_id: str
    address: str


@dataclass
class DisaggPlanner:
    """One per frontend: the decision, the remote Prefill call, the prefill pool's queue, the counters."""

    config: DisaggConfig
    router: Router
    #: prompt tokens in flight at each prefill worker (from this frontend)
    queued: dict[str, int] = field(default_factory=dict)
    #: (model, decision, reason) -> count
    decisions: dict[tuple[str, str, str], int] = field(default_factory=dict)
    _channels: dict[str, grpc.aio.Channel] = field(default_factory=dict)
    _releases: set[asyncio.Task[None]] = field(default_factory=set)

    @staticmethod
    def prefill_pool(workers: Sequence[WorkerEndpoint]) -> list[WorkerEndpoint]:
        return [w for w in workers if w.role == "prefill"]

    def phase(self, workers: Sequence[WorkerEndpoint]) -> str:
        """The phase a request's (decode) placement is routed for."""
        return "decode" if self.prefill_pool(workers) else "aggregated"

    def _count(self, model: str, d: Decision) -> None:
        key = (model, "remote" if d.remote else "local", d.reason)
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def _channel(self, address: str) -> grpc.aio.Channel:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = open_channel(address, ChannelOptions())
        return ch

    async def prefill(
        self,
        request_id: str,
        model: str,
        workers: Sequence[WorkerEndpoint],
        decode_pick: Pick,
        block_size: int,
        request: worker_pb2.DecodeRequest,
        deadline: float | None,
    ) -> Prefilled | None:
        """Remote prefill when the rule says so; None means: the decode worker prefills locally."""
        pool = self.prefill_pool(workers)
        if not pool:
            return None
        prompt = request.token_ids
        uncached = len(prompt) - decode_pick.overlap_blocks * block_size
        queued = sum(self.queued.get(w.instance_id, 0) for w in pool) / len(pool)
        d = decide(uncached, queued, self.config)
        if not d.remote:
            self._count(model, d)
            return None
        rid = f"{request_id}.p"
        try:
            with spans.span("prefill.route", request_id=rid, model=model, uncached_tokens=uncached) as sp:
                pick = await self.router.route(rid, model, prompt, workers, set(), 1, request.lora, "prefill")
                spans.set_attributes(sp, worker=pick.instance_id, overlap_blocks=pick.overlap_blocks)
        except errors.DynamoError as e:
            self._count(model, Decision(False, f"fallback_{e.name}"))
            return None
        self.queued[pick.instance_id] = self.queued.get(pick.instance_id, 0) + len(prompt)
        try:
            stub = worker_pb2_grpc.PrefillServiceStub(self._channel(pick.address))
            req = worker_pb2.PrefillRequest(
                request_id=rid,
                model=model,
                token_ids=prompt,
                sampling=request.sampling,
                stop=request.stop,
                lora=request.lora,
            )
            timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                with spans.span("prefill.remote", request_id=rid, worker=pick.instance_id, prompt_tokens=len(prompt)):
                    resp = await stub.Prefill(req, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                err = worker_error(e, pick.address)
                if not (err.spec.migrate or err.spec.reroute or isinstance(err, errors.Unavailable)):
                    raise err from None  # the client's fault (bad option, prompt too long): the decoder would agree
                log.warning("request %s: remote prefill failed (%s); prefilling on the decode worker", rid, err.message)
                self._count(model, Decision(False, f"fallback_{err.name}"))
                return None
        finally:
            self.router.free(rid, 1)
            left = self.queued.get(pick.instance_id, 0) - len(prompt)
            if left > 0:
                self.queued[pick.instance_id] = left
            else:
                self.queued.pop(pick.instance_id, None)
        self._count(model, d)
        return Prefilled(resp, pick.instance_id, pick.address)

    def release_later(self, prefilled: Prefilled) -> None:
        """Release a lease the decoder may not have pulled (best effort; idempotent; it expires anyway)."""

        async def release() -> None:
            stub = kv_transfer_pb2_grpc.KvTransferServiceStub(self._channel(prefilled.address))
            handle = prefilled.response.kv_handle
            try:
                await stub.Release(kv_transfer_pb2.ReleaseRequest(handle_id=handle.handle_id), timeout=5.0)
            except grpc.aio.AioRpcError as e:
                log.info("release of KV lease %s failed: %s", handle.handle_id, e.code().name)

        task = asyncio.get_running_loop().create_task(release())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    def metric_families(self) -> Iterator[Metric]:
        c = CounterMetricFamily(
            "dynamo_frontend_disagg_decisions",
            "Prefill placements: remote (a prefill worker) or local (the decode worker), and why",
            labels=["model", "decision", "reason"],
        )
        for (model, decision, reason), n in sorted(self.decisions.items()):
            c.add_metric([model, decision, reason], n)
        q = GaugeMetricFamily(
            "dynamo_frontend_prefill_queued_tokens", "Prompt tokens in flight at prefill workers", labels=["worker"]
        )
        for w, n in sorted(self.queued.items()):
            q.add_metric([w], n)
        yield from (c, q)

    async def close(self) -> None:
        for t in list(self._releases):
            await asyncio.gather(t, return_exceptions=True)
        for ch in self._channels.values():
            await ch.close(None)
        self._channels.clear()


def first_response(p: Prefilled) -> worker_pb2.DecodeResponse:
    """The prefill's first token as the request's first response (the client sees it before the decode starts)."""
    r = p.response
    out = worker_pb2.DecodeResponse(token_ids=[r.first_token], usage=r.usage, finish_reason=r.finish_reason)
    if r.HasField("first_logprob"):
        out.logprobs.append(r.first_logprob)
    return out


def with_handle(request: worker_pb2.DecodeRequest, p: Prefilled) -> worker_pb2.DecodeRequest:
    request.kv_handle.CopyFrom(p.response.kv_handle)
    request.first_token = p.response.first_token
    return request


__all__ = [
    "DisaggConfig",
    "DisaggPlanner",
    "Prefilled",
    "add_disagg_flags",
    "decide",
    "first_response",
    "with_handle",
]
