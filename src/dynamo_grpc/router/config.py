"""The router's configuration: one typed object whose defaults are the documented ones (docs/router.md)."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("kv", "round-robin", "random", "approx")


@dataclass
class RouterConfig:
    """Everything the router's flags set."""

    #: "kv" (events), "approx" (no events: remember what we routed), "round-robin", "random"
    mode: str = "kv"
    #: tokens per KV block; 0 = take it from the workers' Meta / model card
    block_size: int = 0
    #: bound on indexed block hashes; past it the least recently used are pruned to 80 %; 0 = unbounded
    max_indexed_blocks: int = 4_000_000
    #: 0 = argmin of cost (random tie-break); > 0 = softmax sampling over normalised costs
    temperature: float = 0.0
    #: weight of new prefill blocks against active decode blocks in the cost
    prefill_load_scale: float = 1.0
    #: a worker rank whose active/total KV blocks exceed this is busy; all busy -> RESOURCE_EXHAUSTED.
    #: 1.0 disables it
    busy_threshold: float = 1.0
    #: approx mode: how long a routed prefix is assumed cached
    approx_ttl_s: float = 120.0
    #: active sequences with no Update for this long are dropped (lost FREE)
    active_ttl_s: float = 900.0
    #: Consul namespace tag
    namespace: str = "dynamo"
    #: model served; "" = any model seen in discovery (one router per model is typical)
    model: str = ""
    #: anti-entropy Replay period per worker (catches a lost last message)
    resync_interval_s: float = 2.0
    #: seed for tie-breaks and sampling (None = random)
    seed: int | None = None

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.block_size < 0:
            raise ValueError("block_size must be >= 0")
        if self.max_indexed_blocks < 0:
            raise ValueError("max_indexed_blocks must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.prefill_load_scale < 0:
            raise ValueError("prefill_load_scale must be >= 0")
        if not 0 < self.busy_threshold <= 1.0:
            raise ValueError("busy_threshold must be in (0, 1]")
