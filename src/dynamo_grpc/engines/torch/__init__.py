"""A real Llama-family engine in PyTorch: the engine core with a model runner as its executor.

Scheduling, KV blocks and events are ``engines/core`` (no torch); this package is the executor
(model, weights, paged KV tensors, runner, sampler). ``TorchEngine`` is imported lazily because it
loads torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .engine import TorchEngine

__all__ = ["TorchEngine"]


def __getattr__(name: str) -> Any:
    if name == "TorchEngine":
        from .engine import TorchEngine

        return TorchEngine
    raise AttributeError(name)
