"""The LLM model's KServe schema, once: what ModelMetadata and ModelConfig advertise and what parsing accepts.

Inputs follow Triton's LLM backends (the vLLM backend's `text_input`/`sampling_parameters`/`stream`, the
TensorRT-LLM ensemble's scalar tensors). An input is either in `INPUTS` (honoured, advertised, parsed) or
refused with `UnsupportedOption` naming it: the known-but-unimplemented ones in `REFUSED_INPUTS` with a
reason, any other name as unknown. Request parameters follow the same rule (`PARAMETERS`,
`REFUSED_PARAMETERS`; vLLM sampling keys are accepted as parameters too).
"""

from __future__ import annotations

from dataclasses import dataclass

from dynamo_grpc.frontend.request import VLLM_KEYS

INT_TYPES = ("INT32", "INT64", "INT16", "INT8", "UINT32", "UINT64", "UINT16", "UINT8")
FLOAT_TYPES = ("FP32", "FP64", "FP16", "BF16")
BYTES = ("BYTES",)
BOOL = ("BOOL",)


@dataclass(frozen=True)
class InputSpec:
    """One input: accepted datatypes (the first is advertised), advertised dims, and what it does."""

    name: str
    datatypes: tuple[str, ...]
    dims: tuple[int, ...]
    means: str

    @property
    def datatype(self) -> str:
        return self.datatypes[0]


def _scalar(name: str, types: tuple[str, ...], means: str) -> InputSpec:
    return InputSpec(name, types, (1,), means)


#: TRT-LLM-ensemble scalar inputs: tensor name -> vLLM sampling key it sets
SCALAR_KEYS: dict[str, str] = {
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "runtime_top_p": "top_p",
    "top_k": "top_k",
    "runtime_top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "random_seed": "seed",
    "repetition_penalty": "repetition_penalty",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "min_tokens": "min_tokens",
    "min_length": "min_tokens",
    "ignore_eos": "ignore_eos",
}
_SCALAR_TYPES = {"int": INT_TYPES, "float": FLOAT_TYPES, "bool": BOOL}

#: BOOL inputs that add an output when true and drop a default one when false (TRT-LLM ensemble, vLLM backend)
RETURN_FLAGS: dict[str, str] = {
    "return_logprobs": "logprobs",
    "return_log_probs": "logprobs",
    "return_cumulative_logprob": "cumulative_logprob",
    "return_finish_reason": "finish_reason",
    "return_num_input_tokens": "num_input_tokens",
    "return_num_output_tokens": "num_output_tokens",
}
#: inputs honoured only with this value (this server's fixed behaviour); other values are refused by name
ONLY_VALUE: dict[str, bool | int] = {"beam_width": 1, "return_context_logits": False, "return_generation_logits": False}


def _inputs() -> dict[str, InputSpec]:
    specs = [
        InputSpec("text_input", BYTES, (1,), "the prompt (or, with parameter chat_template, chat messages)"),
        InputSpec("input_ids", INT_TYPES, (-1,), "a pre-tokenised prompt (instead of text_input)"),
        InputSpec("messages", BYTES, (1,), "chat messages as JSON, rendered with the model's template"),
        InputSpec("stream", BOOL, (1,), "decoupled responses (ModelStreamInfer only)"),
        InputSpec("sampling_parameters", BYTES, (1,), "vLLM SamplingParams as JSON"),
        InputSpec("exclude_input_in_output", BOOL, (1,), "do not lead text_output with the prompt"),
        InputSpec("stop", BYTES, (-1,), "stop strings"),
        InputSpec("stop_words", BYTES, (-1,), "stop strings (TRT-LLM name)"),
        InputSpec("stop_token_ids", INT_TYPES, (-1,), "token ids that end generation"),
        InputSpec("bad_words", BYTES, (-1,), "words never generated"),
        InputSpec("allowed_token_ids", INT_TYPES, (-1,), "the only token ids that may be generated"),
        InputSpec("lora_name", BYTES, (1,), "the LoRA adapter to generate with"),
        *(_scalar(n, _SCALAR_TYPES[VLLM_KEYS[k]], f"sampling {k}") for n, k in SCALAR_KEYS.items()),
        *(_scalar(n, BOOL, f"return output {o}") for n, o in RETURN_FLAGS.items()),
        _scalar("beam_width", INT_TYPES, "1 only (no beam search)"),
        _scalar("return_context_logits", BOOL, "false only (logits are not returned)"),
        _scalar("return_generation_logits", BOOL, "false only (logits are not returned)"),
    ]
    return {s.name: s for s in specs}


INPUTS: dict[str, InputSpec] = _inputs()

#: known inputs of Triton's LLM backends that this server refuses, with the reason
REFUSED_INPUTS: dict[str, str] = {
    "end_id": "a custom end-of-sequence id is not supported; use stop_token_ids",
    "pad_id": "padding ids have no meaning for single-sequence requests",
    "length_penalty": "beam search is not implemented",
    "embedding_bias_words": "embedding bias is not supported; use sampling_parameters.logit_bias",
    "embedding_bias_weights": "embedding bias is not supported; use sampling_parameters.logit_bias",
    "num_return_sequences": "one sequence per request",
    "prompt_embedding_table": "prompt tuning is not supported",
    "prompt_vocab_size": "prompt tuning is not supported",
    "lora_weights": "LoRA weights are loaded by workers; name one with lora_name",
    "lora_config": "LoRA weights are loaded by workers; name one with lora_name",
}

#: Triton request parameters honoured (besides vLLM sampling keys)
PARAMETERS: dict[str, str] = {
    "chat_template": "render text_input as chat messages with the model's template",
    "stream": "as the stream input",
    "timeout": "deadline in microseconds (as Triton); the earlier of it and the gRPC deadline applies",
    "triton_enable_empty_final_response": "the final flag rides on an extra empty response",
}
#: Triton request parameters refused, with the reason
REFUSED_PARAMETERS: dict[str, str] = {
    "priority": "request priorities are not implemented (requests are served in arrival order)",
    "sequence_id": "this is not a sequence-batching model",
    "sequence_start": "this is not a sequence-batching model",
    "sequence_end": "this is not a sequence-batching model",
}

#: per-tensor parameters honoured (any other, e.g. `classification`, is refused; `shared_memory_*` is UNIMPLEMENTED)
TENSOR_PARAMETERS: dict[str, str] = {
    "binary_data": "HTTP's binary encoding hint; gRPC tensors are always binary",
    "binary_data_size": "checked against the raw contents' length (kserve's SDK sends it)",
}

#: outputs an LLM model produces: name -> (datatype, dims)
OUTPUTS: dict[str, tuple[str, tuple[int, ...]]] = {
    "text_output": ("BYTES", (-1,)),
    "finish_reason": ("BYTES", (-1,)),
    "num_input_tokens": ("INT32", (1,)),
    "num_output_tokens": ("INT32", (1,)),
    "cached_tokens": ("INT32", (1,)),
    # only when asked for: per new token {token_id: {logprob, rank, decoded_token}} as JSON, and the sum
    "logprobs": ("BYTES", (-1,)),
    "cumulative_logprob": ("FP32", (1,)),
}
