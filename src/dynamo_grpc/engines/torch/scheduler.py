"""Continuous batching with chunked prefill, prefix-cache admission and preemption by recompute.

Each step spends a token budget (``max_num_batched_tokens``): running requests first
(decodes and unfinished prefill chunks, oldest first), then waiting ones while there is
budget, a sequence slot and KV room. When a running request cannot get a block, the
newest running request is preempted: its blocks are freed and it goes back to the
front of the queue to be recomputed (its prefix is likely still cached). The output is
a plain :class:`SchedulerOutput`; the scheduler never touches a model.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .kv_manager import KvCacheManager
from .request import Request, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0 or self.max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")


@dataclass
class ScheduledSeq:
    request: Request
    #: tokens already in the cache before this step (the chunk starts here)
    start: int
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens (so a token is sampled)."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    def __bool__(self) -> bool:
        return bool(self.seqs)


@dataclass
class Finished:
    request: Request
    reason: str


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KvCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # ------------------------------------------------------------------ intake

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        req.update_block_hashes(self.kv.block_size)
        req.status = Status.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str) -> Request | None:
        """Drop a request wherever it is and free its blocks."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req in self.running:
            self.running.remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self.kv.free(req)
        req.status = Status.FINISHED
        req.finish_reason = req.finish_reason or "cancelled"
        return req

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ scheduling

    def _preempt(self, victim: Request, out: SchedulerOutput) -> None:
        self.running.remove(victim)
        self.kv.free(victim)
        victim.num_computed_tokens = 0
        victim.status = Status.PREEMPTED
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(victim)
        out.preempted.append(victim.request_id)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: set[str] = set()

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:
                i += 1
                continue
            while not self.kv.allocate(req, n):
                victim = self.running[-1]
                if victim.request_id in scheduled:
                    # never preempt a request already in this batch: stop scheduling instead
                    victim = req
                self._preempt(victim, out)
                if victim is req:
                    break
            if req.status is Status.PREEMPTED:
                break
            out.seqs.append(ScheduledSeq(req, req.num_computed_tokens, n))
            scheduled.add(req.request_id)
            budget -= n
            i += 1

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not out.preempted:
            req = self.waiting[0]
            prefix = self.kv.find_prefix(req)
            cached = len(prefix) * self.kv.block_size
            n = min(req.num_tokens - cached, budget)
            if not self.kv.allocate(req, n, prefix):
                break
            self.waiting.popleft()
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = cached
                self.kv.record_lookup(req, len(prefix) * self.kv.block_size)
            req.num_computed_tokens = cached
            req.status = Status.RUNNING
            self.running.append(req)
            out.seqs.append(ScheduledSeq(req, cached, n))
            budget -= n
        return out

    def update(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Finished]:
        """Advance every scheduled request by its chunk; append the tokens sampled for it."""
        finished: list[Finished] = []
        for s in out.seqs:
            req = s.request
            if req.status is not Status.RUNNING:
                continue
            req.num_computed_tokens = s.start + s.num_new_tokens
            self.kv.cache_full_blocks(req)
            tok = sampled.get(req.request_id)
            if tok is None:
                continue
            reason = req.append_output(tok)
            if reason is not None:
                finished.append(Finished(req, reason))
        for f in finished:
            self.finish(f.request, f.reason)
        return finished

    def finish(self, req: Request, reason: str) -> None:
        self.requests.pop(req.request_id, None)
        if req in self.running:
            self.running.remove(req)
        self.kv.free(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
