"""The TensorRT-LLM engine: ``tensorrt_llm.LLM`` (its LLM API) behind the Engine interface.

TensorRT-LLM schedules and caches by itself, so the adapter implements :class:`Engine` directly
rather than as an executor under our scheduler. Importing this package never imports
``tensorrt_llm``: :func:`api.load_api` does, when a worker is built with ``--engine trtllm``.
"""

from .api import EXTRA_HINT, TrtllmApi, TrtllmMissing, load_api

__all__ = ["EXTRA_HINT", "TrtllmApi", "TrtllmMissing", "load_api"]
