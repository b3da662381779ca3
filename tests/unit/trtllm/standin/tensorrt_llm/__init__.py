"""A STAND-IN for ``tensorrt_llm`` (TensorRT-LLM cannot be installed on our CPU machines).

It reproduces the documented signatures and object shapes of TensorRT-LLM 1.1's LLM API that the
adapter uses — ``LLM(model, skip_tokenizer_init, kv_cache_config, max_batch_size, max_num_tokens,
max_seq_len)``, ``LLM.generate_async(inputs, sampling_params, streaming, disaggregated_params)``
returning a ``RequestOutput`` (async-iterable when streaming, ``abort()``, ``outputs[0].token_ids``
cumulative, ``finish_reason``, ``finished``, ``disaggregated_params``), ``get_stats_async`` /
``get_stats`` (IterationStats dicts: ``numActiveRequests``, ``numQueuedRequests``, ``kvCacheStats``),
``get_kv_cache_events_async`` / ``get_kv_cache_events`` (``{"event_id", "data": {"type": created |
stored | removed | updated, ...}, "window_size"}``), ``SamplingParams`` (field names of
``tensorrt_llm/sampling_params.py``), ``llmapi.KvCacheConfig`` (with ``tokens_per_block``) and
``llmapi.DisaggregatedParams``. Behind it runs a small paged-KV executor with block reuse, LRU
eviction and its OWN block hashes (not ours), so the adapter's translation is really exercised.
Events and stats are flushed once per executor iteration (so even "created" is readable only after the
first one). Nothing here is TensorRT-LLM code; tokens are a deterministic function of the sequence.
"""

from . import llmapi
from ._llm import LLM, CompletionOutput, Logprob, RequestOutput
from ._params import DisaggregatedParams, KvCacheConfig, SamplingParams

__version__ = "1.1.0-standin"
#: seconds per executor iteration (tests that need a request to stay running raise it)
STEP_SECONDS = 0.001
#: whether a generation-only request's output starts with the context phase's first_gen_tokens (the adapter
#: handles both; which one TensorRT-LLM does is to be confirmed on a GPU host)
GEN_ONLY_REPEATS_FIRST_TOKENS = True

__all__ = [
    "LLM",
    "CompletionOutput",
    "DisaggregatedParams",
    "KvCacheConfig",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
    "llmapi",
]
