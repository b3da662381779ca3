"""The engine core's own rules: one validation, refusals by name, and a crashed step vs a bad request."""

from __future__ import annotations

import math

import pytest

from dynamo_grpc import errors
from dynamo_grpc.engines.base import EngineDead, EngineRequest, SamplingParams
from dynamo_grpc.engines.core import EngineCore, ExecutorOutput, SchedulerOutput

from .conftest import MakeCore


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"frequency_penalty": 2.5}, "frequency_penalty"),
        ({"presence_penalty": -3.0}, "presence_penalty"),
        ({"stop_token_ids": [100]}, "stop_token_ids"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [1, 96]}, "allowed_token_ids"),
        ({"bad_words": [[1], []]}, "bad_words"),
        ({"bad_words": [[1, 200]]}, "bad_words"),
        ({"logit_bias": {3: 100.5}}, "logit_bias[3]"),
        ({"logit_bias": {96: 1.0}}, "logit_bias"),
    ],
)
def test_sampling_validate_names_the_field(params: dict[str, object], field: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=field.replace("[", r"\[")):
        SamplingParams(**params).validate(vocab_size=96)  # type: ignore[arg-type]


def test_sampling_validate_accepts_the_edges() -> None:
    SamplingParams(
        temperature=0.0, top_p=1.0, top_k=-1, min_p=1.0, frequency_penalty=-2.0, presence_penalty=2.0,
        logit_bias={0: -100.0, 95: 100.0}, allowed_token_ids=[95], bad_words=[[95]], min_tokens=16,
    ).validate(vocab_size=96)  # fmt: skip


def test_the_mocker_refuses_what_it_cannot_honour_and_torch_refuses_lora(make_core: MakeCore) -> None:
    core = make_core()
    mocker = core.executor.unsupported_options != frozenset()
    for name, kw in [("bad_words", {"bad_words": [[3]]}), ("logit_bias", {"logit_bias": {3: 1.0}})]:
        req = EngineRequest("r", [3, 4], SamplingParams(**kw))  # type: ignore[arg-type]
        if mocker:
            with pytest.raises(errors.UnsupportedOption, match=f"'{name}' is not supported by the mocker engine"):
                core.check(req)
        else:
            core.check(req)
    lora = EngineRequest("l", [3, 4], lora="my-adapter")
    if mocker:
        core.check(lora)  # the adapter's name goes into the block hashes
    else:
        with pytest.raises(errors.FailedPrecondition, match="my-adapter"):
            core.check(lora)


class _Crashing:
    """An executor whose step fails once (a bug, a dead device), then works."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.crashes = 1
        self.unsupported_options = frozenset()
        self.supports_lora = True
        self.refusal = ""

    def execute(self, plan: SchedulerOutput) -> ExecutorOutput:
        if self.crashes and plan.chunks:
            self.crashes -= 1
            raise RuntimeError("device lost")
        return self.inner.execute(plan)  # type: ignore[attr-defined,no-any-return]


def test_a_crashed_step_fails_its_requests_as_engine_dead_and_the_core_goes_on(make_core: MakeCore) -> None:
    core = make_core()
    core.executor = _Crashing(core.executor)
    a = core.make_request(EngineRequest("a", [3, 4, 5], SamplingParams(max_tokens=2)))
    core.add(a)
    res = core.step()
    assert [(rid, type(err)) for rid, err in res.failures] == [(a.request_id, EngineDead)]
    err = res.failures[0][1]
    assert err.spec.grpc_code == "UNAVAILABLE" and err.spec.migrate  # not a client error: migrate
    assert "device lost" in err.message
    assert core.kv.pool.num_active == 0 and not core.has_work()
    b = core.make_request(EngineRequest("b", [3, 4, 5], SamplingParams(max_tokens=2, ignore_eos=True)))
    core.add(b)
    while core.has_work():
        assert not core.step().failures
    assert b.finish_reason == "length"


def test_a_core_refuses_a_bad_geometry() -> None:
    from dynamo_grpc.engines.core import CoreConfig
    from dynamo_grpc.engines.mocker import MockerConfig
    from dynamo_grpc.engines.mocker.runner import MockerRunner

    with pytest.raises(ValueError, match="max_waiting"):
        EngineCore(CoreConfig(4, 16, 64, 96, max_waiting=0), MockerRunner(MockerConfig()))
