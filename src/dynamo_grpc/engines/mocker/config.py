"""The mocker's knobs, with vLLM's names and Dynamo's mocker defaults."""

from __future__ import annotations

from dataclasses import dataclass, field

from dynamo_grpc.engines.core.engine_core import CoreConfig
from dynamo_grpc.engines.core.scheduler import SchedulerConfig
from dynamo_grpc.kvbm.config import KvbmConfig

from .block_io import DEFAULT_KV_BYTES_PER_TOKEN


@dataclass
class MockerConfig:
    """One typed config object; defaults match docs/worker.md."""

    block_size: int = 64
    num_gpu_blocks: int = 16384
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    #: divides every simulated step time (1000 makes a 20 ms decode step take 20 µs)
    speedup_ratio: float = 1.0
    #: mixed into every generated token; same seed + same request -> same tokens
    seed: int = 0
    vocab_size: int = 49152
    eos_token_ids: list[int] = field(default_factory=list)
    #: chance per generated token to draw EOS (unless ignore_eos); 0 runs every request to max_tokens
    eos_probability: float = 0.0
    context_length: int = 8192
    enable_prefix_caching: bool = True
    #: fraction of blocks kept free when admitting new requests (vLLM's watermark)
    watermark: float = 0.01
    #: waiting requests beyond this raise EngineOverloaded (--max-waiting-requests)
    max_waiting: int = 4096
    #: KV tiers below the simulated device cache (G2 host, G3 disk) and their modelled bandwidths
    kvbm: KvbmConfig = field(default_factory=KvbmConfig)
    #: modelled KV bytes per token (tier capacities and transfer times count these)
    kv_bytes_per_token: int = DEFAULT_KV_BYTES_PER_TOKEN
    #: seconds a finished prefill's blocks stay pinned for a decode worker's pull (--kv-lease-seconds)
    kv_lease_seconds: float = 30.0
    #: admission order of the engine's waiting queue, fcfs | lpm, and lpm's age cap (--schedule-policy,
    #: --schedule-age-cap-secs; engines/core/admission.py)
    schedule_policy: str = "fcfs"
    schedule_age_cap_s: float = SchedulerConfig.age_cap_s

    def validate(self) -> None:
        def positive(name: str) -> None:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

        for name in ("block_size", "num_gpu_blocks", "max_num_seqs", "max_num_batched_tokens", "vocab_size"):
            positive(name)
        positive("speedup_ratio")
        positive("context_length")
        if not 0.0 <= self.eos_probability <= 1.0:
            raise ValueError(f"eos_probability must be in [0, 1], got {self.eos_probability}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")
        positive("max_waiting")
        positive("kv_bytes_per_token")
        self.kvbm.validate()
        bad = [t for t in self.eos_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"eos_token_ids {bad} outside the vocabulary of {self.vocab_size}")

    def core_config(self) -> CoreConfig:
        """The engine core's share of these knobs (the rest belong to the mocker's executor)."""
        return CoreConfig(
            block_size=self.block_size,
            num_blocks=self.num_gpu_blocks,
            context_length=self.context_length,
            vocab_size=self.vocab_size,
            eos_token_ids=frozenset(self.eos_token_ids),
            enable_prefix_caching=self.enable_prefix_caching,
            max_waiting=self.max_waiting,
            kv_lease_seconds=self.kv_lease_seconds,
            scheduler=SchedulerConfig(
                self.max_num_seqs,
                self.max_num_batched_tokens,
                self.watermark,
                policy=self.schedule_policy,
                age_cap_s=self.schedule_age_cap_s,
            ),
            kvbm=self.kvbm,
        )
