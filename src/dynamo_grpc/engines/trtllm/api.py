"""The part of TensorRT-LLM's LLM API the adapter uses, imported lazily in one place.

The adapter follows the LLM API of TensorRT-LLM 1.1 (``tensorrt_llm.LLM``,
``tensorrt_llm.SamplingParams``, ``tensorrt_llm.llmapi.KvCacheConfig`` with ``tokens_per_block``,
``tensorrt_llm.llmapi.DisaggregatedParams``). Tests hand :class:`TrtllmApi` a stand-in module.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

#: the one-line hint a machine without TensorRT-LLM gets
EXTRA_HINT = (
    "--engine trtllm needs TensorRT-LLM: install the 'trtllm' extra on a GPU host "
    "(pip install 'dynamo-grpc[trtllm]', which pulls tensorrt_llm)"
)


class TrtllmMissing(RuntimeError):
    """``tensorrt_llm`` is not importable here; the message names the extra to install."""


@dataclass(frozen=True)
class TrtllmApi:
    """The classes the adapter calls, taken from ``tensorrt_llm`` (or a stand-in with the same shapes)."""

    LLM: Any
    SamplingParams: Any
    KvCacheConfig: Any
    DisaggregatedParams: Any
    version: str

    @classmethod
    def from_module(cls, root: ModuleType, llmapi: ModuleType) -> TrtllmApi:
        return cls(
            LLM=root.LLM,
            SamplingParams=root.SamplingParams,
            KvCacheConfig=llmapi.KvCacheConfig,
            DisaggregatedParams=llmapi.DisaggregatedParams,
            version=str(getattr(root, "__version__", "unknown")),
        )


def load_api(name: str = "tensorrt_llm") -> TrtllmApi:
    """Import TensorRT-LLM (or the module ``name``); :class:`TrtllmMissing` when it is not installed."""
    try:
        root = importlib.import_module(name)
        llmapi = importlib.import_module(f"{name}.llmapi")
    except ImportError as e:
        raise TrtllmMissing(f"{EXTRA_HINT}; import failed: {e}") from e
    return TrtllmApi.from_module(root, llmapi)
