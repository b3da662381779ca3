"""The adapter's settings, checked once before TensorRT-LLM is built."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass
class TrtllmConfig:
    """What the worker's flags set; names follow the worker's flags, comments name the LLM API field."""

    model: Path  # LLM(model=...): a HF checkpoint dir (PyTorch backend) or a built engine dir
    block_size: int = 64  # KvCacheConfig.tokens_per_block: our model card's block size
    num_blocks: int | None = None  # KvCacheConfig.max_tokens = num_blocks * block_size (None: by GPU memory)
    free_gpu_memory_fraction: float | None = None  # KvCacheConfig.free_gpu_memory_fraction
    max_num_seqs: int = 256  # LLM(max_batch_size=...)
    max_num_batched_tokens: int = 8192  # LLM(max_num_tokens=...)
    max_waiting: int = 4096  # ours: requests beyond max_num_seqs before Overloaded
    enable_prefix_caching: bool = True  # KvCacheConfig.enable_block_reuse
    event_buffer_max_size: int = 16384  # KvCacheConfig.event_buffer_max_size (events kept between polls)
    #: seconds each get_stats_async / get_kv_cache_events_async poll waits before it is reopened
    poll_timeout_s: float = 2.0

    def validate(self) -> None:
        """Raise ValueError naming the setting TensorRT-LLM cannot run with."""
        bs = self.block_size
        if bs < 2 or bs & (bs - 1):
            raise ValueError(
                f"--block-size {bs}: TensorRT-LLM's tokens_per_block must be a power of two greater than 1"
            )
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "event_buffer_max_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"--num-gpu-blocks must be >= 1, got {self.num_blocks}")
        f = self.free_gpu_memory_fraction
        if f is not None and not 0 < f <= 1:
            raise ValueError(f"free_gpu_memory_fraction must be in (0, 1], got {f}")
        built = engine_tokens_per_block(self.model)
        if built is not None and built != bs:
            raise ValueError(
                f"{self.model} is a TensorRT engine built with tokens_per_block={built}, but the model card's "
                f"block size is {bs}: rebuild the engine with --tokens_per_block {bs} or run with --block-size {built}"
            )


def engine_tokens_per_block(model: Path) -> int | None:
    """``tokens_per_block`` baked into a built TensorRT engine dir (its config.json), or None for a checkpoint."""
    cfg = model / "config.json"
    if not cfg.is_file():
        return None
    try:
        doc = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    plugin = (doc.get("build_config") or {}).get("plugin_config") or {}
    value = plugin.get("tokens_per_block")
    return None if value is None else int(value)
