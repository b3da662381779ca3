"""The request pipeline against a scripted worker stream: detokenisation, stop strings, migration, cleanup.

A fake worker is used where a real process adds nothing: it lets a test decide exactly which tokens arrive
in which chunks and where a worker dies. The conformance suite covers the same paths with real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import pytest

from dynamo_grpc import errors
from dynamo_grpc.engines.base import SamplingParams
from dynamo_grpc.errors import WorkerLost
from dynamo_grpc.frontend.limits import Limits
from dynamo_grpc.frontend.models import ModelRegistry, ServedModel
from dynamo_grpc.frontend.pipeline import Chunk, Pipeline
from dynamo_grpc.frontend.request import LlmRequest
from dynamo_grpc.frontend.routing import Pick, WorkerEndpoint
from dynamo_grpc.models import ModelCard, default_model_path, load_model_source
from dynamo_grpc.tokens.tokenizer import Tokenizer
from dynamo_grpc.v1 import common_pb2, worker_pb2

MODEL = "m"


@pytest.fixture(scope="module")
def source() -> tuple[ModelCard, Tokenizer]:
    card, data = load_model_source(default_model_path(), MODEL)
    return card, Tokenizer.from_card(card, data)


Step = list[int] | Exception | str  # token ids | raise | "end" (stream ends without finish) / "finish"


@dataclass
class FakeWorkers:
    """Per address, a script of steps; records every request and whether its stream was closed."""

    scripts: dict[str, list[Step]]
    requests: list[tuple[str, worker_pb2.DecodeRequest]] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)
    timeouts: list[float | None] = field(default_factory=list)

    async def decode(
        self, address: str, request: worker_pb2.DecodeRequest, timeout: float | None = None
    ) -> AsyncIterator[worker_pb2.DecodeResponse]:
        self.requests.append((address, request))
        self.timeouts.append(timeout)
        try:
            for step in self.scripts[address]:
                if isinstance(step, Exception):
                    raise step
                if step == "end":
                    return
                if step == "error":
                    yield worker_pb2.DecodeResponse(finish_reason=common_pb2.FINISH_REASON_ERROR)
                    return
                if step == "finish":
                    yield worker_pb2.DecodeResponse(
                        finish_reason=common_pb2.FINISH_REASON_LENGTH,
                        usage=common_pb2.Usage(prompt_tokens=len(request.token_ids), cached_tokens=64),
                    )
                    return
                assert isinstance(step, list)
                yield worker_pb2.DecodeResponse(token_ids=step)
        finally:
            self.closed.append(address)


Policy = Callable[[list[WorkerEndpoint]], WorkerEndpoint]


def round_robin() -> Policy:
    """Cycle through the live workers."""
    counter = itertools.count()
    return lambda live: live[next(counter) % len(live)]


class LocalRouter:
    """A policy over the live workers of each model, no per-request state: the smallest `Router` the pipeline takes."""

    def __init__(self, policy: Policy | None = None) -> None:
        self._policy = policy or round_robin()

    async def route(
        self,
        request_id: str,
        model: str,
        token_ids: Sequence[int],
        workers: Sequence[WorkerEndpoint],
        exclude: set[str],
        expected_output_tokens: int,
        lora: str,
    ) -> Pick:
        live = sorted((w for w in workers if w.instance_id not in exclude), key=lambda w: w.instance_id)
        if not live:
            raise errors.Unavailable(f"no live worker serves model '{model}'")
        w = self._policy(live)
        return Pick(w.instance_id, w.address)

    def prefill_done(self, request_id: str, output_tokens: int) -> None:
        pass

    def free(self, request_id: str, output_tokens: int) -> None:
        pass

    async def close(self) -> None:
        pass


class RecordingRouter(LocalRouter):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    async def route(
        self,
        request_id: str,
        model: str,
        token_ids: Sequence[int],
        workers: Sequence[WorkerEndpoint],
        exclude: set[str],
        expected_output_tokens: int,
        lora: str,
    ) -> Pick:
        pick = await super().route(request_id, model, token_ids, workers, exclude, expected_output_tokens, lora)
        self.events.append(("route", f"{request_id}->{pick.instance_id}"))
        return pick

    def prefill_done(self, request_id: str, output_tokens: int) -> None:
        self.events.append(("prefill_done", request_id))

    def free(self, request_id: str, output_tokens: int) -> None:
        self.events.append(("free", request_id))


def make(
    source: tuple[ModelCard, Tokenizer], scripts: dict[str, list[Step]], limit: int = 3, limits: Limits | None = None
):
    card, tok = source

    async def no_fetch(*a: str) -> bytes:
        raise AssertionError("no fetch in unit tests")

    async def no_cards(model: str) -> dict:
        return {}

    reg = ModelRegistry(no_fetch, no_cards)
    reg.add(ServedModel(MODEL, card, tok, [WorkerEndpoint(f"w{i}", a) for i, a in enumerate(sorted(scripts))]))
    workers = FakeWorkers(scripts)
    router = RecordingRouter()
    return Pipeline(reg, router, workers, migration_limit=limit, limits=limits), workers, router


def req(prompt: str = "Hello there", max_tokens: int = 16, stop: list[str] | None = None) -> LlmRequest:
    return LlmRequest(
        prompt=prompt,
        messages=None,
        stream=True,
        sampling=SamplingParams(max_tokens=max_tokens, seed=1),
        stop=stop or [],
    )


async def run(p: Pipeline, r: LlmRequest) -> list[Chunk]:
    prepared = p.prepare(MODEL, r)
    return [c async for c in p.generate(prepared, r, "r1")]


async def test_multi_token_character_never_split(source) -> None:
    _, tok = source
    ids = tok.encode(" snowman ☃ and 🤖 robot")
    steps: list[Step] = [[i] for i in ids] + ["finish"]
    p, _workers, router = make(source, {"a:1": steps})
    chunks = await run(p, req(max_tokens=len(ids)))
    assert "".join(c.text for c in chunks) == tok.decode(ids)
    assert all("\ufffd" not in c.text for c in chunks)
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == len(ids)
    assert chunks[-1].cached_tokens == 64 and chunks[-1].worker_id == "w0"
    assert router.events[-1][0] == "free" and router.events[-1][1].endswith(":r1")
    assert [e for e in router.events if e[0] == "prefill_done"] == [("prefill_done", router.events[-1][1])]


async def test_stop_string_cancels_worker_stream(source) -> None:
    _, tok = source
    ids = tok.encode(" one two STOP three four")
    steps: list[Step] = [[i] for i in ids] + [[1] * 50, "finish"]
    p, workers, router = make(source, {"a:1": steps})
    chunks = await run(p, req(stop=["STOP"], max_tokens=100))
    assert "".join(c.text for c in chunks) == " one two "
    assert chunks[-1].finish_reason == "stop"
    assert workers.closed == ["a:1"]
    # The worker was told about the stop strings too; the frontend cut the stream at the first sight.
    assert list(workers.requests[0][1].stop.stop) == ["STOP"]
    assert router.events[-1][0] == "free" and router.events[-1][1].endswith(":r1")


async def test_migration_resends_prompt_plus_generated(source) -> None:
    _, tok = source
    ids = tok.encode(" alpha beta gamma delta epsilon zeta")
    first, rest = ids[:3], ids[3:]
    scripts: dict[str, list[Step]] = {
        "a:1": [[first[0]], first[1:3], WorkerLost("connection reset")],
        "b:2": [[i] for i in rest] + ["finish"],
    }
    p, workers, router = make(source, scripts)
    r = req(max_tokens=len(ids))
    prepared = p.prepare(MODEL, r)
    chunks = [c async for c in p.generate(prepared, r, "r1")]
    assert "".join(c.text for c in chunks) == tok.decode(ids)
    assert chunks[-1].completion_tokens == len(ids) and chunks[-1].worker_id == "w1"
    (_, a_req), (_, b_req) = workers.requests
    assert list(b_req.token_ids) == [*prepared.prompt_ids, *first]
    assert b_req.stop.max_tokens == a_req.stop.max_tokens - 3
    assert b_req.sampling.seed == 1
    rid = router.events[0][1].split("->")[0]
    assert rid.endswith(":r1") and ("route", f"{rid}.m1->w1") in router.events
    assert ("free", rid) in router.events and router.events[-1] == ("free", f"{rid}.m1")


async def test_stream_ending_without_finish_migrates(source) -> None:
    scripts: dict[str, list[Step]] = {"a:1": [[10, 11], "end"], "b:2": [[12], "finish"]}
    p, workers, _ = make(source, scripts)
    chunks = await run(p, req(max_tokens=3))
    assert chunks[-1].completion_tokens == 3 and [a for a, _ in workers.requests] == ["a:1", "b:2"]


async def test_migration_limit(source) -> None:
    scripts: dict[str, list[Step]] = {"a:1": [WorkerLost("gone")], "b:2": [WorkerLost("gone")]}
    p, _, router = make(source, scripts, limit=1)
    with pytest.raises(errors.Unavailable) as ei:
        await run(p, req())
    assert "migration limit 1" in ei.value.message
    rid = router.events[0][1].split("->")[0]
    assert [e for e in router.events if e[0] == "free"] == [("free", rid), ("free", f"{rid}.m1")]


async def test_no_worker_left_after_loss(source) -> None:
    p, _, _ = make(source, {"a:1": [WorkerLost("gone")]})
    with pytest.raises(errors.Unavailable):
        await run(p, req())


async def test_worker_refusal_is_not_migrated(source) -> None:
    err = errors.PromptTooLong("prompt needs more KV blocks than the worker has")
    p, workers, _ = make(source, {"a:1": [err], "b:2": [[1], "finish"]})
    with pytest.raises(errors.PromptTooLong):
        await run(p, req())
    assert len(workers.requests) == 1


async def test_client_cancel_closes_worker_stream_and_frees(source) -> None:
    p, workers, router = make(source, {"a:1": [[5]] * 100 + ["finish"]})
    r = req(max_tokens=100)
    gen = p.generate(p.prepare(MODEL, r), r, "r1")
    async with contextlib.aclosing(gen):
        async for _ in gen:
            break
    assert workers.closed == ["a:1"] and router.events[-1][0] == "free"


async def test_prompt_over_context_and_unknown_model(source) -> None:
    card, _ = source
    p, _, _ = make(source, {"a:1": ["finish"]})
    with pytest.raises(errors.PromptTooLong, match="context length"):
        p.prepare(MODEL, req(prompt=" hello" * (card.context_length + 10)))
    with pytest.raises(errors.ModelNotFound, match="nope"):
        p.prepare("nope", req())


async def test_max_tokens_clamped_to_context(source) -> None:
    card, _tok = source
    p, _, _ = make(source, {"a:1": ["finish"]})
    prompt = " hello" * (card.context_length - 20)
    prepared = p.prepare(MODEL, req(prompt=prompt, max_tokens=1000))
    assert prepared.max_tokens == card.context_length - len(prepared.prompt_ids)


async def test_chat_messages_rendered_with_card_template(source) -> None:
    _card, tok = source
    p, _workers, _ = make(source, {"a:1": [[5], "finish"]})
    r = LlmRequest(
        prompt=None, messages=[{"role": "user", "content": "hi"}], stream=False, sampling=SamplingParams(max_tokens=2)
    )
    prepared = p.prepare(MODEL, r)
    assert "<|im_start|>user\nhi<|im_end|>" in prepared.prompt_text
    assert prepared.prompt_ids == tok.encode(prepared.prompt_text)


async def test_input_ids_bypass_tokenizer(source) -> None:
    p, _, _ = make(source, {"a:1": ["finish"]})
    r = LlmRequest(prompt=None, messages=None, stream=True, sampling=SamplingParams(), token_ids=[1, 2, 3])
    assert p.prepare(MODEL, r).prompt_ids == [1, 2, 3]
    r.token_ids = [10**9]
    with pytest.raises(errors.InvalidArgument, match="outside vocabulary"):
        p.prepare(MODEL, r)


def routes_and_frees(router: RecordingRouter) -> tuple[list[str], list[str]]:
    routed = [e[1].split("->")[0] for e in router.events if e[0] == "route"]
    freed = [e[1] for e in router.events if e[0] == "free"]
    return routed, freed


async def test_overloaded_worker_is_rerouted_once_not_counted_as_migration(source) -> None:
    scripts: dict[str, list[Step]] = {"a:1": [errors.Overloaded("queue full")], "b:2": [[5, 6], "finish"]}
    p, workers, router = make(source, scripts, limit=0)  # no migration allowed: a re-route is not one
    r = req(max_tokens=2)
    prepared = p.prepare(MODEL, r)
    chunks = [c async for c in p.generate(prepared, r, "r1")]
    assert chunks[-1].worker_id == "w1" and chunks[-1].completion_tokens == 2
    assert prepared.timings.migrations == 0
    routed, freed = routes_and_frees(router)
    assert len(routed) == 2 and routed[1] == routed[0] + ".r" and freed == routed
    # the second request did not exclude w0 for good: exclusion is per request
    assert [a for a, _ in workers.requests] == ["a:1", "b:2"]


@pytest.mark.parametrize("n_workers", [1, 2])
async def test_every_worker_full_is_overloaded(source, n_workers: int) -> None:
    scripts: dict[str, list[Step]] = {f"w:{i}": [errors.Overloaded(f"queue {i} full")] for i in range(n_workers)}
    p, workers, router = make(source, scripts)
    with pytest.raises(errors.Overloaded) as ei:
        await run(p, req())
    assert len(workers.requests) == n_workers  # one re-route at most, whatever the worker count
    status, headers, _ = errors.to_http(ei.value)
    assert status == 429 and headers["Retry-After"]
    routed, freed = routes_and_frees(router)
    assert freed == routed


async def test_error_finish_is_internal_and_not_migrated(source) -> None:
    p, workers, _ = make(source, {"a:1": [[5], "error"], "b:2": [[1], "finish"]})
    with pytest.raises(errors.Internal):
        await run(p, req())
    assert len(workers.requests) == 1


FAILURES: dict[str, tuple[dict[str, list[Step]], type[BaseException] | None]] = {
    "refused": ({"a:1": [errors.InvalidArgument("'bad_words' is not supported")]}, errors.InvalidArgument),
    "too_long": ({"a:1": [errors.PromptTooLong("too long")]}, errors.PromptTooLong),
    "migration_limit": ({"a:1": [[5], WorkerLost("x")], "b:2": [WorkerLost("y")]}, errors.Unavailable),
    "all_full": ({"a:1": [errors.Overloaded("full")], "b:2": [errors.Overloaded("full")]}, errors.Overloaded),
    "full_after_tokens": ({"a:1": [[5], errors.Overloaded("full")], "b:2": ["finish"]}, errors.Overloaded),
    "error_finish": ({"a:1": ["error"]}, errors.Internal),
    "lost_then_done": ({"a:1": [[5], "end"], "b:2": [[6], "finish"]}, None),
    "deadline": ({"a:1": [[5], errors.DeadlineExceeded("deadline")]}, errors.DeadlineExceeded),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
async def test_every_route_is_freed_exactly_once(source, case: str) -> None:
    scripts, raised = FAILURES[case]
    p, _, router = make(source, scripts, limit=1)
    if raised is None:
        await run(p, req(max_tokens=2))
    else:
        with pytest.raises(raised):
            await run(p, req(max_tokens=2))
    routed, freed = routes_and_frees(router)
    assert routed and sorted(freed) == sorted(routed) and len(set(freed)) == len(freed)


async def test_request_timeout_bounds_the_worker_call(source) -> None:
    p, workers, _ = make(source, {"a:1": [[5], "finish"]})
    r = req(max_tokens=1)
    r.timeout_s = 0.5
    prepared = p.prepare(MODEL, r)
    [c async for c in p.generate(prepared, r, "r1", timeout=30.0)]
    assert workers.timeouts[0] is not None and workers.timeouts[0] <= 0.5


async def test_bad_words_allowed_ids_and_logit_bias_reach_the_worker(source) -> None:
    _, tok = source
    p, workers, _ = make(source, {"a:1": [[5], "finish"]})
    r = req(max_tokens=1)
    r.bad_words, r.allowed_token_ids, r.logit_bias = ["hello"], [5, 6], {7: -5.0}
    await run(p, r)
    sampling = workers.requests[0][1].sampling
    seqs = [list(s.token_ids) for s in sampling.bad_words]
    assert tok.encode("hello", add_special_tokens=False) in seqs
    assert tok.encode(" hello", add_special_tokens=False) in seqs  # mid-sentence form, as vLLM
    assert list(sampling.allowed_token_ids) == [5, 6] and dict(sampling.logit_bias) == {7: -5.0}
    for field_name, value in (("allowed_token_ids", [10**9]), ("logit_bias", {10**9: 1.0})):
        bad = req()
        setattr(bad, field_name, value)
        with pytest.raises(errors.InvalidArgument, match=f"{field_name}: token id 1000000000 outside vocabulary"):
            p.prepare(MODEL, bad)


async def test_prompt_bytes_refused_before_tokenising(source) -> None:
    p, _, router = make(source, {"a:1": ["finish"]}, limits=Limits(max_input_bytes=1000))
    with pytest.raises(
        errors.PromptTooLong, match="1001 bytes; this server accepts at most 1000 \\(--max-input-bytes\\)"
    ):
        await p.prepare_async(MODEL, req(prompt="x" * 1001))
    with pytest.raises(errors.PromptTooLong, match="1002 bytes"):  # UTF-8 bytes, not characters
        await p.prepare_async(MODEL, req(prompt="é" * 501))
    r = req(prompt="x")
    r.prompt, r.messages = None, [{"role": "user", "content": "y" * 2000}]
    with pytest.raises(errors.PromptTooLong, match="--max-input-bytes"):
        await p.prepare_async(MODEL, r)
    r.messages = [{"role": "user", "content": ""}] * 100  # many empty turns still cost template markup
    with pytest.raises(errors.PromptTooLong, match="--max-input-bytes"):
        await p.prepare_async(MODEL, r)
    assert (await p.prepare_async(MODEL, req(prompt="x" * 1000))).prompt_ids
    assert router.events == []  # nothing was routed


async def test_big_prompt_is_tokenised_off_the_event_loop(source) -> None:
    """While a big prompt is tokenised the loop keeps running other work (the tokenizer is in a thread)."""
    p, _, _ = make(source, {"a:1": ["finish"]}, limits=Limits(max_input_bytes=8 << 20))
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    t = asyncio.create_task(ticker())
    with pytest.raises(errors.PromptTooLong, match="context length"):
        await p.prepare_async(MODEL, req(prompt="hello world " * 200_000))
    done.set()
    await t
    assert ticks > 1  # a loop blocked by tokenising would not have ticked at all


async def test_max_prompt_tokens_refused_before_routing(source) -> None:
    p, _, router = make(source, {"a:1": ["finish"]}, limits=Limits(max_prompt_tokens=5))
    with pytest.raises(errors.PromptTooLong, match="at most 5 \\(--max-prompt-tokens\\)"):
        await run(p, req(prompt=" hello" * 10))
    assert router.events == []
    await run(p, req(prompt="hi", max_tokens=1))


async def test_worker_side_request_ids_are_unguessable_and_keep_the_client_id(source) -> None:
    p, workers, _ = make(source, {"a:1": [[5], "finish"], "b:2": [[5], "finish"]})
    for _ in range(2):
        r = req(max_tokens=1)
        [c async for c in p.generate(p.prepare(MODEL, r), r, "same-client-id")]
    ids = [rq.request_id for _, rq in workers.requests]
    assert len(set(ids)) == 2  # two clients using one id never collide on a worker
    for rid in ids:
        key, _, client = rid.partition(":")
        assert client == "same-client-id" and len(key) == 32 and int(key, 16) >= 0
