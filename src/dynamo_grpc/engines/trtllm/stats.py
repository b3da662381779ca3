"""TensorRT-LLM's iteration stats as our load metrics.

``LLM.get_stats_async()`` yields one dict per engine iteration (the executor's ``IterationStats``
as JSON). We read ``numActiveRequests`` (scheduled this iteration: our ``running``),
``numQueuedRequests`` (our ``waiting``) and ``kvCacheStats.usedNumBlocks`` / ``maxNumBlocks``
(our ``active_blocks`` / ``total_blocks``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dynamo_grpc.events.kv import LoadMetrics


def load_from_stats(stat: Mapping[str, Any], total_blocks: int) -> LoadMetrics:
    """Our LoadMetrics from one iteration's stats; ``total_blocks`` when the stats lack ``maxNumBlocks``."""
    kv = stat.get("kvCacheStats") or {}
    return LoadMetrics(
        active_blocks=int(kv.get("usedNumBlocks", 0)),
        total_blocks=int(kv.get("maxNumBlocks", total_blocks)),
        waiting=int(stat.get("numQueuedRequests", 0)),
        running=int(stat.get("numActiveRequests", 0)),
    )


def tokens_per_block(stat: Mapping[str, Any]) -> int | None:
    """The block size the running engine reports, if it does."""
    kv = stat.get("kvCacheStats") or {}
    value = kv.get("tokensPerBlock")
    return None if value is None else int(value)
