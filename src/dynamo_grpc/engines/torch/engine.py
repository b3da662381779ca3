"""TorchEngine: the engine core with the torch executor (our Llama model over a paged KV cache).

The core (``engines/core``) schedules, manages KV blocks and emits events; the executor
(``runner.py``: plan → model inputs → forward → ``sampler.py``) runs the model. The loop steps on
a dedicated thread (a forward pass holds the GIL for long stretches of C++ and would stall the
asyncio loop); see ``engines/core/driver.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from dynamo_grpc.engines.core.driver import CoreEngine
from dynamo_grpc.engines.core.engine_core import CoreConfig, EngineCore
from dynamo_grpc.engines.core.scheduler import SchedulerConfig
from dynamo_grpc.kvbm.config import KvbmConfig
from dynamo_grpc.kvbm.stats import kvbm_stats
from dynamo_grpc.models import ModelCard, default_model_path, load_model_source

from .exact_gemv import ExactBlocks, kernels, status
from .kv_cache import KvCache, num_blocks_for_bytes
from .model import LlamaModel
from .runner import ModelRunner
from .weights import load_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: ``weights`` modes: (compute and KV cache dtype, matmul weight format of ``linear.py``)
WEIGHT_MODES = {
    "fp32": ("float32", "dense"),
    "bf16": ("bfloat16", "dense"),
    "int8": ("bfloat16", "int8"),
    "int4": ("bfloat16", "int4"),
    "w4a8": ("float32", "w4a8"),
}
DEFAULT_KV_CACHE_BYTES = 512 << 20


class TorchEngine(CoreEngine):
    """A real Llama-family engine on CPU (or any torch device the weights fit)."""

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        block_size: int = 64,
        num_blocks: int | None = None,
        kv_cache_bytes: int | None = None,
        max_num_seqs: int = 32,
        max_num_batched_tokens: int = 2048,
        dtype: str | None = None,
        weights: str | None = None,
        num_threads: int | None = None,
        enable_prefix_caching: bool = True,
        max_waiting: int = 4096,
        watermark: float = 0.01,
        served_name: str | None = None,
        kvbm: KvbmConfig | None = None,
        kv_lease_seconds: float = 30.0,
        block_kernels: bool = True,
        schedule_policy: str = "fcfs",
        schedule_age_cap_s: float = SchedulerConfig.age_cap_s,
    ) -> None:
        if weights is not None:
            if weights not in WEIGHT_MODES:
                raise ValueError(f"weights must be one of {sorted(WEIGHT_MODES)}, got {weights!r}")
            mode_dtype, fmt = WEIGHT_MODES[weights]
            if dtype is not None and dtype != mode_dtype:
                raise ValueError(f"weights={weights!r} computes in {mode_dtype}; it conflicts with dtype={dtype!r}")
            dtype = mode_dtype
        else:
            fmt = "dense"
        dtype = dtype or "float32"
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.weights = weights or {"float32": "fp32", "bfloat16": "bf16"}.get(dtype, dtype)
        if num_blocks is not None and kv_cache_bytes is not None:
            raise ValueError("give num_blocks or kv_cache_bytes, not both")
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        if num_threads is not None:
            if num_threads <= 0:
                raise ValueError("num_threads must be positive")
            torch.set_num_threads(num_threads)
        self.num_threads = num_threads or torch.get_num_threads()
        path = Path(model_path) if model_path is not None else default_model_path()
        card, self.tokenizer_json = load_model_source(path, served_name)
        self.dtype = DTYPES[dtype]
        # quantised formats start from the file's fp32 values (int4: its Q4_1 blocks as they are)
        # fp32 keeps a GGUF's blocks too when the block kernels are built (exact_gemv.py: same weights, fewer bytes)
        blocks = block_kernels and fmt == "dense" and self.dtype == torch.float32 and kernels() is not None
        ckpt = load_checkpoint(
            path,
            self.dtype if fmt == "dense" else torch.float32,
            keep_q4=fmt in ("int4", "w4a8") or blocks,
            keep_q8=blocks or fmt == "w4a8",
        )
        self.config = ckpt.config
        self.model = LlamaModel(ckpt, self.dtype, fmt)
        #: how fp32 few-row matmuls run: "block kernels" (the file's blocks), else "dense: <why>"
        self.fp32_kernels = "n/a"
        if self.weights == "fp32":
            used = any(isinstance(v, ExactBlocks) for layer in self.model.layers for v in layer.values())
            why = status() if block_kernels else "block_kernels=False"
            self.fp32_kernels = "block kernels" if used else f"dense: {why if not blocks else 'no Q4_1/Q8_0 blocks'}"
        if num_blocks is None:
            num_blocks = num_blocks_for_bytes(
                self.config, block_size, self.dtype, kv_cache_bytes or DEFAULT_KV_CACHE_BYTES
            )
        self.card: ModelCard = dataclasses.replace(
            card,
            block_size=block_size,
            kv_blocks=num_blocks,
            num_layers=self.config.num_hidden_layers,
            num_kv_heads=self.config.num_key_value_heads,
            head_dim=self.config.head_dim,
            kv_dtype=dtype,
        )
        eos = card.eos_token_ids or self.config.eos_token_ids
        self.eos_token_ids = frozenset(eos)

        self.kv = KvCache(self.config, num_blocks, block_size, self.dtype)
        self.runner = ModelRunner(self.model, self.kv)
        core = EngineCore(
            CoreConfig(
                block_size=block_size,
                num_blocks=num_blocks,
                context_length=card.context_length,
                vocab_size=self.config.vocab_size,
                eos_token_ids=self.eos_token_ids,
                enable_prefix_caching=enable_prefix_caching,
                max_waiting=max_waiting,
                scheduler=SchedulerConfig(
                    max_num_seqs,
                    max_num_batched_tokens,
                    watermark,
                    policy=schedule_policy,
                    age_cap_s=schedule_age_cap_s,
                ),
                kvbm=kvbm or KvbmConfig(),
                kv_lease_seconds=kv_lease_seconds,
            ),
            self.runner,
        )
        super().__init__(core, threaded=True)

    def _on_loop_thread(self) -> None:
        torch.set_num_threads(self.num_threads)  # the loop thread runs the model

    def stats(self) -> dict[str, Any]:
        """Counters for benchmarks and metrics (prefix hit rate, preemptions, step time)."""
        with self._state:
            kv = self.core.kv
            st = self.core.stats
            return {
                "prefix_hit_tokens": kv.hit_tokens,
                "prefix_query_tokens": kv.queried_tokens,
                "prefix_hit_rate": kv.hit_rate,
                "cached_blocks": kv.pool.num_cached,
                "preemptions": self.core.scheduler.num_preemptions,
                "steps": st.steps,
                "step_seconds": st.execute_s,
                "kv_cache_bytes": self.kv.nbytes,
                "weight_bytes": self.model.nbytes,
                **kvbm_stats(self.core.kv.tiers),
                "weights": self.weights,
                "fp32_kernels": self.fp32_kernels,
            }
