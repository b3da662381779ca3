"""The router's configuration: one typed object whose defaults are the documented ones (docs/router.md)."""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("kv", "round-robin", "random", "approx")
QUEUE_POLICIES = ("fcfs", "wspt", "cache-aware")


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
    #: weight of new prefill blocks against active decode blocks in the cost. A block of prefill queued on a
    #: worker delays the next first token by a prefill's worth of compute; a block of decode context barely
    #: (docs/router.md, "Tail latency on traces without reuse"): at 2, a worker decoding one long sequence
    #: looked dearer than one with a whole prompt still to prefill. 8 was best of 2–16 on the Azure and
    #: Mooncake slices in simulated time (`bench replay-sim`), where no box noise hides a 5 % change
    prefill_load_scale: float = 8.0
    #: a worker rank whose active/total KV blocks exceed this is busy (skipped; all busy -> the router
    #: queue, or RESOURCE_EXHAUSTED without one). 1.0 disables it
    busy_threshold: float = 0.95
    #: a rank whose pending prefill tokens exceed this many times ``max_num_batched_tokens`` is busy too
    #: (Dynamo's --router-queue-threshold); 0 disables it. Off by default: at 2 it cost TTFT on the Azure code
    #: trace and most of the cache hits on the Mooncake slice (docs/router.md, "Defaults, measured")
    queue_threshold: float = 0.0
    #: the workers' prefill budget per engine step, the unit of ``queue_threshold``
    max_num_batched_tokens: int = 8192
    #: requests that may wait in the router while every rank is busy; past it RESOURCE_EXHAUSTED; 0 = no queue
    queue_size: int = 1024
    #: order of the router queue: fcfs (arrival), wspt (fewest uncached prompt tokens first) or cache-aware
    #: (when a worker has room, the waiting request with the most KV cached there, credited by tier; kv/approx)
    queue_policy: str = "fcfs"
    #: cache-aware: a request that has waited this long in the router queue goes first, whatever is cached
    #: where (the bound on how long better-cached requests may overtake it); 0 = no cap
    queue_age_cap_s: float = 30.0
    #: kv mode: seconds a routed prompt counts as cached on its worker before that worker's KV events
    #: confirm it (predicted prefixes: a burst sharing a new prefix stays together); 0 disables it
    predicted_ttl_s: float = 5.0
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
    #: overlap credit of a block a worker holds in host memory (G2) / on disk (G3); a device block is 1
    host_overlap_weight: float = 0.75
    disk_overlap_weight: float = 0.25

    def problems(self) -> list[tuple[str, str]]:
        """(field, what is wrong) for every out-of-range field: the one place these rules live."""
        rules = [
            ("mode", self.mode in MODES, f"one of {', '.join(MODES)}"),
            ("block_size", self.block_size >= 0, ">= 0"),
            ("max_indexed_blocks", self.max_indexed_blocks >= 0, ">= 0"),
            ("temperature", self.temperature >= 0, ">= 0"),
            ("prefill_load_scale", self.prefill_load_scale >= 0, ">= 0"),
            ("busy_threshold", 0 < self.busy_threshold <= 1.0, "in (0, 1]"),
            ("queue_threshold", self.queue_threshold >= 0, ">= 0"),
            ("max_num_batched_tokens", self.max_num_batched_tokens > 0, "> 0"),
            ("queue_size", self.queue_size >= 0, ">= 0"),
            ("queue_policy", self.queue_policy in QUEUE_POLICIES, f"one of {', '.join(QUEUE_POLICIES)}"),
            (
                "queue_policy",
                self.queue_policy != "cache-aware" or self.mode in ("kv", "approx"),
                "fcfs or wspt with --router-mode " + self.mode + " (cache-aware needs a KV index: kv or approx)",
            ),
            ("queue_age_cap_s", self.queue_age_cap_s >= 0, ">= 0"),
            (
                "queue_age_cap_s",
                self.queue_policy == "cache-aware" or self.queue_age_cap_s == RouterConfig.queue_age_cap_s,
                f"left at its default ({RouterConfig.queue_age_cap_s:g}) unless the queue policy is cache-aware",
            ),
            ("predicted_ttl_s", self.predicted_ttl_s >= 0, ">= 0"),
            ("approx_ttl_s", self.approx_ttl_s > 0, "> 0"),
            ("resync_interval_s", self.resync_interval_s >= 0, ">= 0"),
            ("host_overlap_weight", 0 <= self.host_overlap_weight <= 1.0, "in [0, 1]"),
            ("disk_overlap_weight", 0 <= self.disk_overlap_weight <= 1.0, "in [0, 1]"),
        ]
        return [(f, f"must be {rule}, got {getattr(self, f)!r}") for f, ok, rule in rules if not ok]

    def validate(self) -> None:
        bad = self.problems()
        if bad:
            raise ValueError("; ".join(f"{field} {msg}" for field, msg in bad))
