"""Continuous batching, vLLM v1 style: running requests first, then admissions, under a token budget.

Each step hands every running request its next tokens (one while decoding, a chunk while
prefilling) and admits waiting requests in arrival order while the step's token budget
(``max_num_batched_tokens``), the sequence limit (``max_num_seqs``) and the free blocks allow,
keeping ``watermark`` of the blocks free for the running ones; long prompts are prefilled in
chunks. When a running request needs a block and none is free, the most recently admitted running
request is preempted (even one already scheduled this step: its tokens go back to the budget): its
blocks are freed (they stay in the prefix cache) and it goes back to the front of the queue to be
recomputed. The output is a plain :class:`~.output.SchedulerOutput`; the scheduler never runs a model.

Which waiting request goes first is ``policy`` (``--schedule-policy``): ``fcfs`` (arrival, vLLM's) or
``lpm`` (longest cached prefix first, SGLang's, with an age cap; ``admission.py``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .admission import DEFAULT_MAX_SORTED, POLICIES, lpm_order
from .kv_manager import KvManager
from .output import ExecutorOutput, NewRequest, ScheduledChunk, SchedulerOutput
from .request import Request, Status


@dataclass
class SchedulerConfig:
    """One typed config; the same rules for every executor."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    #: fraction of blocks kept free when admitting new requests while others run (vLLM's watermark)
    watermark: float = 0.01
    #: admission order of the waiting queue: fcfs | lpm (--schedule-policy; admission.py)
    policy: str = "fcfs"
    #: lpm: a request waiting this long goes first, oldest first (--schedule-age-cap-secs; 0: no cap)
    age_cap_s: float = 30.0
    #: lpm: above this many waiting requests, arrival order (SGLang's 128)
    max_sorted: int = DEFAULT_MAX_SORTED
    #: lpm: what a prefix block in host memory / on disk counts for against one on the device (1.0);
    #: the router's defaults (--router-host-overlap-weight / --router-disk-overlap-weight), Dynamo's
    host_weight: float = 0.75
    disk_weight: float = 0.25

    def validate(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_sorted"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.age_cap_s < 0:
            raise ValueError(f"age_cap_s must be >= 0, got {self.age_cap_s}")
        for name in ("host_weight", "disk_weight"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KvManager) -> None:
        config.validate()
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.watermark_blocks = int(config.watermark * kv.num_blocks)
        self._forget: list[str] = []
        #: finished ``hold_kv`` requests whose blocks the engine core turns into leases (not freed here)
        self.held: list[Request] = []
        #: the age cap's clock (a virtual one in the benchmarks' simulations)
        self.clock: Callable[[], float] = time.monotonic
        #: lpm: admissions ahead of an older waiting request, and admissions the age cap forced
        self.num_overtaken = 0
        self.num_aged = 0

    # ------------------------------------------------------------------ queue

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:  # internal ids are unique; this is a bug in the caller
            raise RuntimeError(f"internal request id {req.request_id!r} reused")
        req.status = Status.WAITING
        if req.arrival_s < 0:
            req.arrival_s = self.clock()
        imp = req.kv_import
        if imp is not None and imp.reservation is not None:
            # the pulled KV is in reserved blocks: the request owns them from now on (an abort frees them)
            res = self.kv.claim(imp.reservation)
            if res is None:
                req.kv_import = None  # cancelled before it got here: prefill locally
            else:
                req.blocks = list(res.blocks)
                req.num_registered = res.first_block
                req.num_computed_tokens = res.num_tokens
                # ready to run and holding every block it needs: ahead of requests that still need blocks
                # (behind them it could hold blocks the head waits for, with nothing running to free any)
                self.requests[req.request_id] = req
                i = 0
                while i < len(self.waiting) and self.waiting[i].kv_import is not None and self.waiting[i].blocks:
                    i += 1
                self.waiting.insert(i, req)
                return
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def abort(self, request_id: str, reason: str = "cancelled") -> Request | None:
        """Drop a request wherever it is and free its blocks at once."""
        req = self.requests.get(request_id)
        if req is None:
            return None
        if req.status is Status.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._finish(req, reason)
        return req

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        kv = self.kv
        planned: dict[Request, int] = {}  # in schedule order

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not kv.allocate(req, n):
                victim = self.running.pop()
                budget += planned.pop(victim, 0)
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                break  # req preempted itself: nothing after it runs either
            planned[req] = n
            budget -= n
            i += 1

        if not out.preempted_ids:
            aged: set[str] | None = None  # lpm ordered the queue this step: the ids the age cap put first
            if self.config.policy == "lpm" and len(self.waiting) > 1 and budget > 0:
                if len(self.running) < self.config.max_num_seqs:
                    aged = self._lpm_order()
            while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
                req = self.waiting[0]
                imp = req.kv_import
                reserve = self.watermark_blocks if self.running else 0
                if imp is not None and imp.reservation is not None:
                    # its KV was pulled into blocks it holds: only the tokens after it are fed
                    done, hit = imp.num_tokens, imp.reservation.first_block * kv.block_size
                    n = min(req.num_tokens - done, budget)
                    if not kv.can_allocate(req, n, [], reserve=reserve):
                        break
                    kv.allocate(req, n)
                    req.kv_import = None
                else:
                    req.kv_import = None  # KV to import comes with its blocks; without them it is recomputed
                    prefix = kv.find_prefix(req)
                    hit = kv.prefix_tokens(req, prefix)  # the device prefix and the blocks below it (kvbm)
                    n = min(req.num_tokens - hit, budget)
                    if not kv.can_allocate(req, n, prefix, reserve=reserve):
                        break
                    done = hit = kv.admit(req, n, prefix)  # less than planned if a lower-tier block was unreadable
                self.waiting.popleft()
                if aged is not None:
                    self._count_admission(req, aged)
                req.num_computed_tokens = done
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = min(hit, req.num_prompt_tokens)
                    kv.record_lookup(req, hit)
                req.status = Status.RUNNING
                self.running.append(req)
                planned[req] = n
                budget -= n

        self._plan(planned, out)
        out.finished_ids, self._forget = self._forget, []
        out.kv_usage = kv.pool.num_active / kv.num_blocks
        return out

    def _lpm_order(self) -> set[str]:
        """Sort the waiting queue for admission (lpm); returns the ids the age cap put first."""
        cfg = self.config
        kv = self.kv
        hw, dw = cfg.host_weight, cfg.disk_weight
        order = lpm_order(
            self.waiting, lambda r: kv.prefix_credit(r, hw, dw), self.clock(), cfg.age_cap_s, cfg.max_sorted
        )
        self.waiting = order.queue
        return order.aged

    def _count_admission(self, req: Request, aged: set[str]) -> None:
        """lpm's counters: forced by the age cap, or ahead of an older request still waiting."""
        if req.request_id in aged:
            self.num_aged += 1
        elif req.status is Status.WAITING and any(
            r.arrival_s < req.arrival_s for r in self.waiting if r.status is Status.WAITING
        ):
            self.num_overtaken += 1

    def _plan(self, planned: dict[Request, int], out: SchedulerOutput) -> None:
        """The plan's chunks: only what the executor does not know yet (hot loop: one pass, few lookups)."""
        chunks = out.chunks
        new_requests = out.new_requests
        decodes = prefill = 0
        for req, n in planned.items():
            rid = req.request_id
            if not req.sent:
                req.sent = True
                new_requests.append(
                    NewRequest(
                        rid, req.prompt_token_ids, req.sampling, req.eos_token_ids, req.lora, list(req.prefilled)
                    )
                )
            start = req.num_computed_tokens
            end = start + n
            tokens = req.all_token_ids
            blocks = req.blocks
            sent = req.num_sent_blocks
            if len(blocks) > sent:
                new_ids = [b.block_id for b in blocks[sent:]]
                req.num_sent_blocks = len(blocks)
            else:
                new_ids = []
            if n == 1 and start >= len(req.prompt_token_ids):
                decodes += 1
            else:
                prefill += n
            chunks.append(ScheduledChunk(rid, start, tokens[start:end], new_ids, sent == 0, end == len(tokens)))
        out.num_decodes = decodes
        out.num_prefill_tokens = prefill

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.kv_import = None
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = Status.PREEMPTED
        self.waiting.appendleft(req)
        self.num_preemptions += 1

    # ------------------------------------------------------------------ update

    def update(self, plan: SchedulerOutput, result: ExecutorOutput) -> list[tuple[Request, int, str | None]]:
        """Apply a step: advance computed tokens, register full blocks, append sampled tokens, finish.

        Returns (request, token, finish reason or None) for every token appended.
        """
        appended: list[tuple[Request, int, str | None]] = []
        requests = self.requests
        sampled = result.sampled
        register = self.kv.register_full_blocks
        block_size = self.kv.block_size
        for c in plan.chunks:
            req = requests.get(c.request_id)
            if req is None or req.status is not Status.RUNNING:
                continue  # aborted or preempted since the plan was made
            computed = req.num_computed_tokens = c.start + len(c.token_ids)
            if computed // block_size > req.num_registered:
                register(req)
            if not c.samples:
                continue  # mid-prefill: no token yet
            token = sampled[c.request_id]
            reason = req.append_output(token)
            appended.append((req, token, reason))
        for req, _, reason in appended:
            if reason is not None:
                self.running.remove(req)
                self._finish(req, reason)
        return appended

    def _finish(self, req: Request, reason: str) -> None:
        if req.hold_kv and reason in ("stop", "length") and req.blocks:
            self.held.append(req)  # the engine core moves its blocks into a lease
        else:
            self.kv.free(req)
        req.status = Status.FINISHED
        req.finish_reason = reason
        self.requests.pop(req.request_id, None)
        if req.sent:
            self._forget.append(req.request_id)
