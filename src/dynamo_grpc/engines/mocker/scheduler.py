"""Continuous batching, vLLM v1 style: running requests first, then admissions, under a token budget.

Each step hands every running request its next tokens (one while decoding, a chunk while
prefilling) and admits waiting requests in arrival order while the step's token budget
(max_num_batched_tokens), the sequence limit (max_num_seqs) and the free blocks allow; long
prompts are prefilled in chunks. When a running request needs a block and none is free, the
most recently admitted request is preempted: its blocks are freed (they stay in the prefix
cache) and it goes back to the front of the queue to be recomputed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .config import MockerConfig
from .kv_manager import KvManager
from .request import MockRequest, Status
from .sampler import HashSampler


@dataclass
class SchedulerOutput:
    """What one step computes: new tokens per request, split into prefill and decode work."""

    num_new_tokens: dict[str, int] = field(default_factory=dict)
    prefill_tokens: int = 0
    num_decodes: int = 0
    preempted: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.num_new_tokens


@dataclass
class StepResult:
    """One request's outcome of a step: a sampled token (or none mid-prefill), maybe finished."""

    request: MockRequest
    token_id: int | None
    finish_reason: str | None


class Scheduler:
    def __init__(self, config: MockerConfig) -> None:
        config.validate()
        self.config = config
        self.kv = KvManager(config.num_gpu_blocks, config.block_size, config.enable_prefix_caching)
        self.sampler = HashSampler(config.vocab_size, config.eos_token_ids, config.eos_probability, config.seed)
        self.waiting: deque[MockRequest] = deque()
        self.running: list[MockRequest] = []
        self.requests: dict[str, MockRequest] = {}
        self._watermark_blocks = int(config.watermark * config.num_gpu_blocks)
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue

    def add(self, req: MockRequest) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in flight")
        req.status = Status.WAITING
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str, reason: str = "cancelled") -> MockRequest | None:
        """Drop a request wherever it is and free its blocks at once."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req.status is Status.RUNNING:
            self.running.remove(req)
        elif req.status is Status.WAITING:
            self.waiting.remove(req)
        self._finish(req, reason)
        return req

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        bs = self.config.block_size

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            while not self.kv.allocate(req, n):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                out.num_new_tokens.pop(victim.request_id, None)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break  # req preempted itself: nothing after it runs either
            out.num_new_tokens[req.request_id] = n
            budget -= n
            i += 1

        if not out.preempted:
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                req = self.waiting[0]
                prefix = self.kv.find_prefix(req)
                hit = len(prefix) * bs
                n = min(req.num_tokens - hit, budget)
                reserve = self._watermark_blocks if self.running else 0
                if not self.kv.can_allocate(req, n, prefix, reserve=reserve):
                    break
                self.kv.allocate(req, n, prefix)
                self.waiting.popleft()
                req.num_computed = hit
                if req.cached_tokens < 0:
                    req.cached_tokens = min(hit, len(req.prompt))
                    self.kv.record_lookup(req, hit)
                req.status = Status.RUNNING
                self.running.append(req)
                out.num_new_tokens[req.request_id] = n
                budget -= n

        for rid, n in out.num_new_tokens.items():
            req = self.requests[rid]
            if n == 1 and req.num_computed >= len(req.prompt):
                out.num_decodes += 1
            else:
                out.prefill_tokens += n
        return out

    def _preempt(self, req: MockRequest) -> None:
        self.kv.free(req)
        req.num_computed = 0
        req.num_preemptions += 1
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    # ------------------------------------------------------------------ update

    def update(self, out: SchedulerOutput) -> list[StepResult]:
        """Apply a step: advance computed tokens, register full blocks, sample, finish."""
        results: list[StepResult] = []
        eos = self.sampler.eos_token_ids
        for rid, n in out.num_new_tokens.items():
            req = self.requests.get(rid)
            if req is None or req.status is not Status.RUNNING:
                continue  # aborted while the step ran
            req.num_computed += n
            self.kv.register_full_blocks(req)
            if req.num_computed < req.num_tokens:
                continue  # mid-prefill: no token yet
            token = self.sampler.next_token(req)
            reason = req.append_token(token, eos)
            results.append(StepResult(req, token, reason))
            if reason is not None:
                self.running.remove(req)
                self._finish(req, reason)
        return results

    def _finish(self, req: MockRequest, reason: str) -> None:
        self.kv.free(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        self.requests.pop(req.request_id, None)
        self.sampler.forget(req)
