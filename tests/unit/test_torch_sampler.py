"""Sampler of the torch engine on hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch

from dynamo_grpc.engines.base import SamplingParams
from dynamo_grpc.engines.torch.sampler import SampleRow, make_generator, sample

V = 8


def _row(sp: SamplingParams, prompt: list[int] | None = None, out: list[int] | None = None) -> SampleRow:
    return SampleRow(sp, prompt or [], out or [], frozenset({7}), make_generator(sp.seed))


def _logits(*vals: float) -> torch.Tensor:
    x = torch.full((V,), -10.0)
    x[: len(vals)] = torch.tensor(vals)
    return x


def test_greedy_and_top_k_1_pick_the_argmax() -> None:
    logits = torch.stack([_logits(0.1, 3.0, 1.0), _logits(5.0, 1.0)])
    toks, lps = sample(logits, [_row(SamplingParams(temperature=0.0)), _row(SamplingParams(top_k=1))])
    assert toks == [1, 0]
    assert lps == [None, None]


def test_seeded_sampling_is_reproducible_and_batch_independent() -> None:
    logits = _logits(1.0, 1.0, 1.0, 1.0, 1.0).unsqueeze(0)
    sp = SamplingParams(temperature=1.0, seed=1234)
    a = [sample(logits, [r])[0][0] for r in [_row(sp)] for _ in range(20)]
    row = _row(sp)
    b = [sample(logits, [row])[0][0] for _ in range(20)]
    row2 = _row(sp)
    other = _row(SamplingParams(temperature=1.0, seed=99))
    c = [sample(torch.cat([logits, logits]), [other, row2])[0][1] for _ in range(20)]
    assert b == c  # same seed, same stream of draws, whatever else is in the batch
    assert len(set(b)) > 1  # and it really samples
    assert a[0] == b[0]


def test_top_k_top_p_min_p_restrict_the_support() -> None:
    logits = _logits(3.0, 2.9, 2.8, 0.0).unsqueeze(0)
    for sp, allowed in [
        (SamplingParams(top_k=2, seed=1), {0, 1}),
        (SamplingParams(top_p=0.3, seed=1), {0}),
        (SamplingParams(min_p=0.5, seed=1), {0, 1, 2}),
    ]:
        row = _row(sp)
        got = {sample(logits, [row])[0][0] for _ in range(200)}
        assert got <= allowed, (sp, got)
        assert len(got) == len(allowed) or sp.top_p < 1


def test_penalties_follow_vllm_semantics() -> None:
    # repetition penalty divides a positive logit of a seen token, making token 1 win
    logits = _logits(2.0, 2.5).unsqueeze(0)
    assert sample(logits, [_row(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[1])])[0] == [0]
    # a negative logit is multiplied (pushed further down)
    logits = _logits(-1.0, -1.5, -1.2).unsqueeze(0)
    assert sample(logits, [_row(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[0])])[0] == [2]
    # frequency penalty counts outputs only; presence is flat
    logits = _logits(3.0, 2.0).unsqueeze(0)
    sp = SamplingParams(temperature=0, frequency_penalty=0.6)
    assert sample(logits, [_row(sp, prompt=[0, 0, 0], out=[0])])[0] == [0]
    assert sample(logits, [_row(sp, out=[0, 0])])[0] == [1]
    sp = SamplingParams(temperature=0, presence_penalty=1.5)
    assert sample(logits, [_row(sp, out=[0])])[0] == [1]


def test_min_tokens_masks_eos_and_stop_ids() -> None:
    logits = _logits(0, 0, 0, 0, 0, 0, 1.0, 9.0).unsqueeze(0)  # EOS (7) is the argmax, then 6
    sp = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[6])
    assert sample(logits, [_row(sp, out=[1])])[0] == [0]
    assert sample(logits, [_row(sp, out=[1, 1])])[0] == [7]
    sp = SamplingParams(temperature=0, min_tokens=2, ignore_eos=True)
    assert sample(logits, [_row(sp)])[0] == [7]


def test_logprobs_are_raw_log_softmax() -> None:
    logits = _logits(1.0, 2.0, 3.0).unsqueeze(0)
    toks, lps = sample(logits, [_row(SamplingParams(temperature=0, logprobs=2))])
    ref = torch.log_softmax(logits[0], -1)
    lp = lps[0]
    assert lp is not None and toks == [2] and lp.token_id == 2
    assert lp.logprob == pytest.approx(float(ref[2]))
    assert [t for t, _ in lp.top] == [2, 1]
    assert math.isclose(lp.top[1][1], float(ref[1]), rel_tol=1e-6)


def test_allowed_token_ids_mask_every_other_token() -> None:
    logits = _logits(9.0, 1.0, 2.0, 3.0).unsqueeze(0)
    greedy = SamplingParams(temperature=0.0, allowed_token_ids=[1, 2])
    assert sample(logits, [_row(greedy)])[0] == [2]
    sampled = SamplingParams(temperature=5.0, seed=3, allowed_token_ids=[1, 2])
    row = _row(sampled)
    assert {sample(logits, [row])[0][0] for _ in range(50)} <= {1, 2}


def test_bad_words_ban_the_last_token_only_after_the_rest_of_the_word() -> None:
    logits = _logits(9.0, 8.0, 1.0).unsqueeze(0)
    sp = SamplingParams(temperature=0.0, bad_words=[[0], [5, 1]])
    assert sample(logits, [_row(sp, out=[3])])[0] == [1]  # [0] is always banned; 1 only after 5
    assert sample(logits, [_row(sp, out=[3, 5])])[0] == [2]  # the output ends with 5: 1 is banned too
    assert sample(logits, [_row(sp, prompt=[5])])[0] == [1]  # the prompt does not count, only the output


def test_logit_bias_is_added_before_sampling_and_logprobs_stay_raw() -> None:
    logits = _logits(2.0, 1.0).unsqueeze(0)
    sp = SamplingParams(temperature=0.0, logit_bias={1: 1.5, 0: -100.0}, logprobs=0)
    toks, lps = sample(logits, [_row(sp)])
    assert toks == [1]
    raw = torch.log_softmax(logits[0], dim=-1)
    assert lps[0] is not None and lps[0].logprob == pytest.approx(float(raw[1]))
    assert lps[0].rank == 2  # rank in the model's own distribution
