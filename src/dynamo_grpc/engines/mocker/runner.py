"""The mocker's executor: runs no model; samples by hash and says how long the step would take.

It gets the same plan a model runner gets and answers with tokens and the timing model's step
time, so everything above it (scheduler, KV manager, events, preemption under memory pressure)
is the real engine core's behaviour.
"""

from __future__ import annotations

from dynamo_grpc.engines.core.output import ExecutorOutput, SchedulerOutput

from .block_io import MockerBlockIO
from .config import MockerConfig
from .sampler import HashSampler
from .timing import TimingModel


class MockerRunner:
    #: a hash is not a distribution: these would be made up, so they are refused
    unsupported_options = frozenset({"logprobs", "bad_words", "allowed_token_ids", "logit_bias"})
    supports_lora = True  # the adapter's name is mixed into the block hashes; tokens are hashes anyway
    refusal = "is not supported by the mocker engine (it runs no model); ask a torch or trtllm worker"

    def __init__(self, config: MockerConfig) -> None:
        self.sampler = HashSampler(config.vocab_size, config.eos_token_ids, config.eos_probability, config.seed)
        self.timing = TimingModel(config.speedup_ratio)
        self._block_io = MockerBlockIO(config.block_size, config.kv_bytes_per_token, config.speedup_ratio)
        #: request id -> (hash key, ignore_eos)
        self._requests: dict[str, tuple[int, bool]] = {}

    def block_io(self) -> MockerBlockIO:
        """The KV tiers' view of this executor's blocks (modelled bytes)."""
        return self._block_io

    def execute(self, plan: SchedulerOutput) -> ExecutorOutput:
        reqs = self._requests
        for rid in plan.finished_ids:
            reqs.pop(rid, None)
        for nr in plan.new_requests:
            reqs[nr.request_id] = (
                self.sampler.request_key(nr.prompt_token_ids, nr.sampling.seed),
                nr.sampling.ignore_eos,
            )
        token_at = self.sampler.token_at
        sampled: dict[str, int] = {}
        for c in plan.chunks:
            if c.samples:
                key, ignore_eos = reqs[c.request_id]
                sampled[c.request_id] = token_at(key, c.start + len(c.token_ids), ignore_eos)
        seconds = self.timing.step_seconds(plan.num_prefill_tokens, plan.num_decodes, plan.kv_usage)
        return ExecutorOutput(sampled, {}, seconds)
