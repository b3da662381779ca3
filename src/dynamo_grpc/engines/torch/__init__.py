"""A real Llama-family engine in PyTorch: paged KV cache, continuous batching, prefix caching.

The block pool, KV manager and scheduler do not import the model (or torch), so they are
usable and testable on their own; ``TorchEngine`` is imported lazily because it loads torch.
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
