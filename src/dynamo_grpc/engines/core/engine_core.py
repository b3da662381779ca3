"""The engine core: one step is schedule → execute → update, and the step's KV events are taken once.

Synchronous and thread-agnostic (the driver decides where it runs). The core owns the rules every
executor shares: what a request may ask (``check``: sampling validated once by
``SamplingParams.validate``, options the executor cannot honour refused by name, prompts that can
never fit refused), unique internal ids, the bounded waiting queue, and the difference between a
request-scoped failure (the request ends with its error, the engine goes on) and a crashed step
(``EngineDead``: every request of the step fails as worker_lost, migrated by the frontend).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

from dynamo_grpc import errors
from dynamo_grpc.engines.base import (
    EngineDead,
    EngineOutput,
    EngineRequest,
    LeaseInfo,
    PromptTooLong,
    check_prompt_fits,
    check_token_ids,
)
from dynamo_grpc.events.kv import KvEvent, KvStored, LoadMetrics
from dynamo_grpc.kvbm.config import KvbmConfig
from dynamo_grpc.kvbm.manager import TierManager

from .executor import Executor
from .kv_manager import KvManager, KvReservation
from .leases import Lease, LeaseTable
from .output import SchedulerOutput
from .request import Request
from .scheduler import Scheduler, SchedulerConfig

log = logging.getLogger(__name__)


@dataclass
class CoreConfig:
    """The geometry and limits of one engine (the executor's own knobs live with the executor)."""

    block_size: int
    num_blocks: int
    context_length: int
    vocab_size: int
    eos_token_ids: frozenset[int] = frozenset()
    enable_prefix_caching: bool = True
    #: waiting requests beyond this are refused with errors.Overloaded (--max-waiting-requests)
    max_waiting: int = 4096
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    #: KV tiers below the device cache (G2 host, G3 disk); disabled by default
    kvbm: KvbmConfig = field(default_factory=KvbmConfig)
    #: how long a finished prefill's blocks wait for a decode worker's pull (--kv-lease-seconds)
    kv_lease_seconds: float = 30.0

    def validate(self) -> None:
        if not self.kv_lease_seconds > 0:
            raise ValueError(f"kv_lease_seconds must be positive, got {self.kv_lease_seconds}")
        for name in ("block_size", "num_blocks", "context_length", "vocab_size", "max_waiting"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        self.scheduler.validate()
        self.kvbm.validate()


@dataclass
class CoreStats:
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    finished: int = 0
    cancelled: int = 0
    #: wall time spent in executor.execute
    execute_s: float = 0.0
    #: sum of the executor's simulated step times (the mocker's timing model)
    simulated_s: float = 0.0


@dataclass
class StepResult:
    """One step's effect, for the driver to deliver."""

    outputs: list[tuple[str, EngineOutput]] = field(default_factory=list)
    #: requests that ended with an error (request-scoped, or EngineDead for a crashed step)
    failures: list[tuple[str, errors.DynamoError]] = field(default_factory=list)
    events: list[KvEvent] = field(default_factory=list)
    step_seconds: float = 0.0
    #: the plan this step ran (for tests and tracing)
    plan: SchedulerOutput | None = None
    #: whether anything ran (False: nothing can run until a request arrives or leaves)
    ran: bool = False


class EngineCore:
    def __init__(self, config: CoreConfig, executor: Executor) -> None:
        config.validate()
        self.config = config
        self.executor = executor
        tiers = None
        if config.kvbm.enabled and config.enable_prefix_caching:
            block_io = getattr(executor, "block_io", None)
            if block_io is None:
                raise ValueError("KV tiers (--kv-host-mib / --kv-disk-dir) are not supported by this engine")
            tiers = TierManager(config.kvbm, block_io(), config.block_size)
        self.kv = KvManager(config.num_blocks, config.block_size, config.enable_prefix_caching, tiers)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.leases = LeaseTable(self.kv.pool, config.kv_lease_seconds)
        self.stats = CoreStats()
        self.max_total_tokens = min(config.context_length, config.num_blocks * config.block_size)
        self._ids = itertools.count()

    # ------------------------------------------------------------------ intake (any thread)

    def check(self, request: EngineRequest) -> None:
        """Raise the error a request that can never run here gets; reads only the config."""
        cfg = self.config
        check_token_ids(request.token_ids, cfg.vocab_size)
        sp = request.sampling
        sp.validate(cfg.vocab_size)
        ex = self.executor
        for name in sp.set_options():
            if name in ex.unsupported_options:
                raise errors.UnsupportedOption(name, ex.refusal)
        if request.lora and not ex.supports_lora:
            raise errors.FailedPrecondition(f"LoRA adapter {request.lora!r}: this engine serves no LoRA adapters")
        check_prompt_fits(len(request.token_ids), cfg.context_length, cfg.num_blocks, cfg.block_size)
        check_token_ids(request.prefilled or [0], cfg.vocab_size)
        imp = request.kv_import
        if imp is not None and (imp.num_tokens != len(request.token_ids) or not request.prefilled):
            raise errors.InvalidArgument(
                f"pulled KV covers {imp.num_tokens} tokens but the prompt has {len(request.token_ids)}"
                + ("" if request.prefilled else " and no first token was given")
            )

    def make_request(self, request: EngineRequest) -> Request:
        """The core's request for a checked EngineRequest, under a fresh internal id."""
        return Request(
            request_id=f"{request.request_id}#{next(self._ids)}",
            prompt_token_ids=list(request.token_ids),
            sampling=request.sampling,
            eos_token_ids=self.config.eos_token_ids,
            lora=request.lora or None,
            max_total_tokens=self.max_total_tokens,
            external_id=request.request_id,
            hold_kv=request.hold_kv,
            prefilled=list(request.prefilled),
            kv_import=request.kv_import,
        )

    # ------------------------------------------------------------------ engine side

    def add(self, req: Request) -> None:
        self.scheduler.add(req)

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its blocks at once; False if it already ended."""
        if self.scheduler.abort(request_id) is None:
            return False
        self.stats.cancelled += 1
        return True

    def abort_all(self) -> list[str]:
        ids = list(self.scheduler.requests)
        for rid in ids:
            self.abort(rid)
        return ids

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> StepResult:
        sched = self.scheduler
        res = StepResult()
        plan = sched.schedule()
        res.plan = plan
        try:
            tier_seconds = self.kv.run_tiers()  # offload evicted blocks, onboard hits, before execute
        except Exception as e:
            log.exception("KV tier transfer failed; failing the step's %d requests", len(plan.chunks))
            for c in plan.chunks:
                if sched.abort(c.request_id, "error") is not None:
                    res.failures.append((c.request_id, EngineDead(f"KV tier transfer failed: {type(e).__name__}: {e}")))
            res.events = self.kv.take_events()
            return res
        if not plan:
            held = bool(self.kv.reservations) or self.leases.num_active > 0
            if not sched.running and sched.waiting and not plan.preempted_ids and not held:
                # nothing runs and the head cannot be admitted into an empty cache: it never will be (blocks
                # held by a pull in flight or a lease come back: then it waits)
                head = sched.waiting[0]
                sched.abort(head.request_id, "error")
                res.failures.append((head.request_id, PromptTooLong("the request cannot fit the KV cache")))
            if plan.finished_ids:
                self._execute(plan, res)  # lets the executor forget ended requests
            res.events = self.kv.take_events()
            return res
        self._execute(plan, res, tier_seconds)
        res.events = self.kv.take_events()
        return res

    def close(self) -> None:
        """Release what outlives steps (the G3 writer thread; its files stay for the next start)."""
        if self.kv.tiers is not None:
            self.kv.tiers.close()

    def _execute(self, plan: SchedulerOutput, res: StepResult, extra_seconds: float = 0.0) -> None:
        t0 = time.perf_counter()
        try:
            result = self.executor.execute(plan)
        except Exception as e:
            log.exception("engine step failed; failing its %d requests", len(plan.chunks))
            for c in plan.chunks:
                if self.scheduler.abort(c.request_id, "error") is not None:
                    res.failures.append((c.request_id, EngineDead(f"engine step failed: {type(e).__name__}: {e}")))
            return
        if not plan.chunks:
            return
        st = self.stats
        st.execute_s += time.perf_counter() - t0
        st.steps += 1
        st.prefill_tokens += plan.num_prefill_tokens
        st.decode_tokens += plan.num_decodes
        if extra_seconds:
            result.step_seconds += extra_seconds  # the mocker's modelled onboarding time
        st.simulated_s += result.step_seconds
        res.ran = True
        res.step_seconds = result.step_seconds
        logprobs = result.logprobs
        outputs = res.outputs
        finished = 0
        for req, token, reason in self.scheduler.update(plan, result):
            lp = logprobs.get(req.request_id) if logprobs else None
            # num_cached_tokens is set (>= 0) when a request is first admitted, before any output
            out = EngineOutput([token], reason, len(req.prompt_token_ids), req.num_cached_tokens)
            if lp is not None:
                out.logprobs = [lp]
            outputs.append((req.request_id, out))
            if reason is not None:
                finished += 1
        st.finished += finished
        held, self.scheduler.held = self.scheduler.held, []
        for req in held:
            lease = self._lease(req)
            for rid, out in reversed(outputs):
                if rid == req.request_id:
                    out.lease = LeaseInfo(lease.lease_id, lease.num_tokens, lease.block_hashes, lease.expiry_unix_ms)
                    break

    def _lease(self, req: Request) -> Lease:
        """Move a finished prefill's prompt blocks into a lease (any block past the prompt is freed)."""
        n = req.num_prompt_tokens
        keep = self.kv.blocks_for(n)
        blocks, req.blocks = req.blocks, []
        if len(blocks) > keep:
            self.kv.pool.free(reversed(blocks[keep:]))
        req.update_block_hashes(self.config.block_size)
        hashes = req.block_hashes[: n // self.config.block_size]
        return self.leases.create(req.request_id, blocks[:keep], n, hashes)

    # ------------------------------------------------------------------ introspection

    def load_metrics(self, extra_waiting: int = 0) -> LoadMetrics:
        s = self.scheduler
        return LoadMetrics(
            active_blocks=self.kv.pool.num_active,
            total_blocks=self.config.num_blocks,
            waiting=len(s.waiting) + extra_waiting,
            running=len(s.running),
        )

    def cached_blocks(self) -> list[KvStored]:
        return self.kv.dump()

    def reserve_import(self, token_ids: list[int], lora: str | None) -> KvReservation | None:
        """Blocks for a prompt whose KV a transfer will write: its cached prefix (pinned) and fresh
        blocks for the rest (see KvManager.reserve); None while the free blocks cannot cover them.

        Raises PromptTooLong for a prompt that can never fit, so a caller does not wait for it.
        """
        cfg = self.config
        check_prompt_fits(len(token_ids), cfg.context_length, cfg.num_blocks, cfg.block_size)
        probe = Request("probe", list(token_ids), lora=lora)
        probe.update_block_hashes(cfg.block_size)
        reserve = self.scheduler.watermark_blocks if self.scheduler.running else 0
        return self.kv.reserve(probe.block_hashes, len(token_ids), reserve)
