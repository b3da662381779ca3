"""Stand-in for ``tensorrt_llm.llmapi`` (see the package docstring)."""

from ._llm import LLM, RequestOutput
from ._params import DisaggregatedParams, KvCacheConfig, SamplingParams

__all__ = ["LLM", "DisaggregatedParams", "KvCacheConfig", "RequestOutput", "SamplingParams"]
