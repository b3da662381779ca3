"""Protobuf <-> engine dataclasses for the worker's services (no grpc here, so it is unit-testable)."""

from __future__ import annotations

from typing import Literal, get_args

from dynamo_grpc.engines.base import EngineOutput, SamplingParams
from dynamo_grpc.v1 import common_pb2

FINISH_REASONS = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "cancelled": common_pb2.FINISH_REASON_CANCELLED,
    "error": common_pb2.FINISH_REASON_ERROR,
}


def sampling_from_pb(sampling: common_pb2.SamplingOptions, stop: common_pb2.StopConditions) -> SamplingParams:
    """SamplingParams from the wire; unset optional fields keep vLLM's defaults.

    Only converts: ranges are checked once, by ``SamplingParams.validate`` in the engine core.
    """
    sp = SamplingParams(
        max_tokens=stop.max_tokens,
        min_tokens=stop.min_tokens,
        ignore_eos=stop.ignore_eos,
        stop_token_ids=list(stop.stop_token_ids),
        bad_words=[list(w.token_ids) for w in sampling.bad_words],
        allowed_token_ids=list(sampling.allowed_token_ids) or None,
        logit_bias={int(k): float(v) for k, v in sampling.logit_bias.items()},
    )
    for name in _OPTIONAL:
        if sampling.HasField(name):
            setattr(sp, name, getattr(sampling, name))
    return sp


_Optional = Literal[
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty", "seed",
    "logprobs",
]  # fmt: skip
#: SamplingOptions fields with presence that map 1:1 onto SamplingParams
_OPTIONAL: tuple[_Optional, ...] = get_args(_Optional)


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
