"""Our SamplingParams -> TensorRT-LLM's (checked against the stand-in of its 1.1 LLM API: same field names)."""

from __future__ import annotations

import pytest

from dynamo_grpc import errors
from dynamo_grpc.engines.base import EngineRequest, SamplingParams
from dynamo_grpc.engines.trtllm.sampling import check_supported, to_trtllm_kwargs
from tests.unit.trtllm.standin import tensorrt_llm as standin


def _kw(eos: tuple[int, ...] = (1,), **sp: object) -> dict[str, object]:
    req = EngineRequest("r", [3, 4], SamplingParams(**sp))  # type: ignore[arg-type]
    check_supported(req)
    return to_trtllm_kwargs(req, eos)


def test_greedy_is_its_top_k_1_and_every_name_exists_in_its_sampling_params() -> None:
    kw = _kw(temperature=0.0, max_tokens=9, min_tokens=2, stop_token_ids=[7], ignore_eos=True, seed=5)
    assert kw == {
        "max_tokens": 9, "ignore_eos": True, "detokenize": False, "end_id": 1, "pad_id": 1, "top_k": 1,
        "min_tokens": 2, "seed": 5, "stop_token_ids": [7],
    }  # fmt: skip
    assert standin.SamplingParams(**kw)._greedy_decoding  # its greedy rule: top_k 1 (or unset), top_p unset


def test_sampling_fields_map_by_name() -> None:
    kw = _kw(
        temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1, frequency_penalty=0.5,
        presence_penalty=-0.5, logprobs=0, bad_words=[[5], [9]],
    )  # fmt: skip
    assert kw["temperature"] == 0.7 and kw["top_p"] == 0.9 and kw["top_k"] == 40 and kw["min_p"] == 0.05
    assert (kw["repetition_penalty"], kw["frequency_penalty"], kw["presence_penalty"]) == (1.1, 0.5, -0.5)
    assert kw["logprobs"] == 1  # its 0 means none; ours means the sampled token's: ask for 1
    assert kw["bad_token_ids"] == [5, 9]
    sp = standin.SamplingParams(**kw)
    assert not sp._greedy_decoding


def test_top_k_disabled_and_top_p_one_still_samples() -> None:
    kw = _kw(temperature=1.0, top_k=0)
    assert "top_k" not in kw and kw["top_p"] == 1.0
    assert not standin.SamplingParams(**kw)._greedy_decoding  # unset top_k AND top_p would be its greedy


def test_a_second_eos_id_stops_generation_unless_eos_is_ignored() -> None:
    kw = _kw(eos=(128009, 128001), stop_token_ids=[7])
    assert (kw["end_id"], kw["stop_token_ids"]) == (128009, [7, 128001])
    assert _kw(eos=(128009, 128001), ignore_eos=True).get("stop_token_ids") is None


@pytest.mark.parametrize(
    ("sp", "option"),
    [
        ({"allowed_token_ids": [3, 4]}, "allowed_token_ids"),
        ({"logit_bias": {3: 1.0}}, "logit_bias"),
        ({"bad_words": [[5, 6]]}, "bad_words"),
    ],
)
def test_options_it_cannot_honour_are_refused_by_name(sp: dict[str, object], option: str) -> None:
    with pytest.raises(errors.UnsupportedOption) as exc:
        _kw(**sp)
    assert exc.value.option == option and "trtllm" in exc.value.message


def test_a_lora_request_is_refused() -> None:
    with pytest.raises(errors.FailedPrecondition, match="LoRA"):
        check_supported(EngineRequest("r", [3], lora="my-adapter"))
