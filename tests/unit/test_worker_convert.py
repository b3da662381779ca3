"""The worker's protobuf → SamplingParams conversion: every field arrives, nothing is checked twice."""

from __future__ import annotations

import pytest

from dynamo_grpc.engines.base import SamplingParams
from dynamo_grpc.v1 import common_pb2
from dynamo_grpc.worker.convert import sampling_from_pb


def test_every_sampling_option_is_converted() -> None:
    opts = common_pb2.SamplingOptions(
        temperature=0.5, top_p=0.9, top_k=7, min_p=0.1, repetition_penalty=1.2, frequency_penalty=0.3,
        presence_penalty=-0.4, seed=11, logprobs=3,
        bad_words=[common_pb2.TokenSequence(token_ids=[4, 5]), common_pb2.TokenSequence(token_ids=[9])],
        allowed_token_ids=[4, 5, 9], logit_bias={4: -2.5, 9: 100.0},
    )  # fmt: skip
    stop = common_pb2.StopConditions(max_tokens=12, min_tokens=2, ignore_eos=True, stop_token_ids=[3])
    sp = sampling_from_pb(opts, stop)
    floats = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
    assert [getattr(sp, f) for f in floats] == pytest.approx([0.5, 0.9, 0.1, 1.2, 0.3, -0.4])  # float32 on the wire
    assert (sp.min_tokens, sp.ignore_eos, sp.stop_token_ids) == (2, True, [3])
    assert (sp.bad_words, sp.allowed_token_ids, sp.logit_bias) == ([[4, 5], [9]], [4, 5, 9], {4: -2.5, 9: 100.0})
    assert sp.seed == 11 and sp.logprobs == 3 and sp.top_k == 7 and sp.max_tokens == 12


def test_unset_options_keep_the_defaults_and_out_of_range_values_pass_through_to_validate() -> None:
    sp = sampling_from_pb(common_pb2.SamplingOptions(), common_pb2.StopConditions(max_tokens=0))
    default = SamplingParams()
    assert (sp.temperature, sp.top_p, sp.top_k, sp.seed, sp.logprobs) == (
        default.temperature, default.top_p, default.top_k, None, None,
    )  # fmt: skip
    assert sp.allowed_token_ids is None and sp.bad_words == [] and sp.logit_bias == {}
    assert sp.max_tokens == 0  # refused by SamplingParams.validate in the engine, not here
