"""Protobuf <-> engine dataclasses for the worker's services (no grpc here, so it is unit-testable)."""

from __future__ import annotations

from dynamo_grpc.engines.base import EngineOutput, SamplingParams
from dynamo_grpc.errors import InvalidArgument
from dynamo_grpc.v1 import common_pb2

FINISH_REASONS = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "cancelled": common_pb2.FINISH_REASON_CANCELLED,
    "error": common_pb2.FINISH_REASON_ERROR,
}


#: a request field the worker refuses (INVALID_ARGUMENT)
BadRequest = InvalidArgument


def sampling_from_pb(
    sampling: common_pb2.SamplingOptions, stop: common_pb2.StopConditions, vocab_size: int
) -> SamplingParams:
    """SamplingParams from the wire; unset optional fields keep vLLM's defaults."""
    sp = SamplingParams()
    if stop.max_tokens < 1:
        raise BadRequest("stop.max_tokens must be >= 1")
    sp.max_tokens = stop.max_tokens
    sp.min_tokens = stop.min_tokens
    sp.ignore_eos = stop.ignore_eos
    bad = [t for t in stop.stop_token_ids if t >= vocab_size]
    if bad:
        raise BadRequest(f"stop_token_ids {bad} outside the vocabulary (size {vocab_size})")
    sp.stop_token_ids = list(stop.stop_token_ids)
    if sampling.HasField("temperature"):
        if sampling.temperature < 0:
            raise BadRequest(f"temperature must be >= 0, got {sampling.temperature}")
        sp.temperature = sampling.temperature
    if sampling.HasField("top_p"):
        if not 0 < sampling.top_p <= 1:
            raise BadRequest(f"top_p must be in (0, 1], got {sampling.top_p}")
        sp.top_p = sampling.top_p
    if sampling.HasField("top_k"):
        if sampling.top_k < -1:
            raise BadRequest(f"top_k must be >= -1, got {sampling.top_k}")
        sp.top_k = sampling.top_k
    if sampling.HasField("min_p"):
        if not 0 <= sampling.min_p <= 1:
            raise BadRequest(f"min_p must be in [0, 1], got {sampling.min_p}")
        sp.min_p = sampling.min_p
    if sampling.HasField("repetition_penalty"):
        if sampling.repetition_penalty <= 0:
            raise BadRequest(f"repetition_penalty must be > 0, got {sampling.repetition_penalty}")
        sp.repetition_penalty = sampling.repetition_penalty
    if sampling.HasField("frequency_penalty"):
        sp.frequency_penalty = sampling.frequency_penalty
    if sampling.HasField("presence_penalty"):
        sp.presence_penalty = sampling.presence_penalty
    if sampling.HasField("seed"):
        sp.seed = sampling.seed
    if sampling.HasField("logprobs"):
        sp.logprobs = sampling.logprobs
    return sp


def check_tokens(token_ids: list[int], vocab_size: int) -> None:
    if not token_ids:
        raise BadRequest("token_ids is empty")
    if vocab_size > 0:
        bad = next((t for t in token_ids if t >= vocab_size), None)
        if bad is not None:
            raise BadRequest(f"token id {bad} is outside the vocabulary (size {vocab_size})")


def usage_pb(out: EngineOutput, completion_tokens: int) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=out.prompt_tokens, completion_tokens=completion_tokens, cached_tokens=out.cached_tokens
    )


def logprobs_pb(out: EngineOutput) -> list[common_pb2.TokenLogprob]:
    if not out.logprobs:
        return []
    return [
        common_pb2.TokenLogprob(
            token_id=lp.token_id,
            logprob=lp.logprob,
            top=[common_pb2.TopLogprob(token_id=t, logprob=p) for t, p in lp.top],
            rank=lp.rank,
        )
        for lp in out.logprobs
    ]
