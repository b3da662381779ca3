"""The one scheduler, run against both executors: the mocker must behave like the real engine.

Every test drives ``EngineCore.step()`` (schedule → execute → update) with the mocker's simulator
and with the torch model runner on a tiny Llama; the plans, finish reasons and block counts must
be the same, since only the executor differs. Tokens are the executor's own, except where a stop
rule needs a known token (``Forced`` then overwrites what the executor sampled).
"""

from __future__ import annotations

from dynamo_grpc.engines.base import EngineRequest, SamplingParams
from dynamo_grpc.engines.core import EngineCore, ExecutorOutput, SchedulerOutput
from dynamo_grpc.engines.core.engine_core import StepResult
from dynamo_grpc.engines.core.executor import Executor
from dynamo_grpc.engines.core.request import Request, Status
from dynamo_grpc.events.kv import KvRemoved, KvStored

from .conftest import VOCAB, MakeCore

BS = 4


class Forced:
    """Runs the real executor, then reports ``token`` as every sampled token."""

    def __init__(self, inner: Executor, token: int) -> None:
        self.inner = inner
        self.token = token
        self.unsupported_options = inner.unsupported_options
        self.supports_lora = inner.supports_lora
        self.refusal = inner.refusal

    def execute(self, plan: SchedulerOutput) -> ExecutorOutput:
        out = self.inner.execute(plan)
        out.sampled = dict.fromkeys(out.sampled, self.token)
        return out


def _add(core: EngineCore, rid: str, n: int, max_tokens: int = 4, base: int = 2, **kw: object) -> Request:
    tokens = [2 + (base + i) % (VOCAB - 2) for i in range(n)]
    req = core.make_request(EngineRequest(rid, tokens, SamplingParams(max_tokens=max_tokens, **kw)))  # type: ignore[arg-type]
    core.add(req)
    return req


def _step(core: EngineCore) -> StepResult:
    res = core.step()
    assert not res.failures, res.failures
    return res


def _chunks(core: EngineCore, res: StepResult) -> list[tuple[str, int, int]]:
    """(client id, start, new tokens) per scheduled chunk."""
    assert res.plan is not None
    ext = {r.request_id: r.external_id for r in core.scheduler.requests.values()}
    return [(ext.get(c.request_id, "?"), c.start, c.num_new_tokens) for c in res.plan.chunks]


def _run(core: EngineCore, max_steps: int = 10_000) -> list[StepResult]:
    steps = []
    for _ in range(max_steps):
        if not core.has_work():
            return steps
        steps.append(_step(core))
    raise AssertionError("did not finish")


def test_max_num_seqs_caps_the_running_batch(make_core: MakeCore) -> None:
    core = make_core(num_blocks=64, max_seqs=2)
    reqs = [_add(core, f"r{i}", 6, base=10 * i, ignore_eos=True) for i in range(5)]
    steps = _run(core)
    assert max(len(s.plan.chunks) for s in steps if s.plan) == 2
    assert all(r.status is Status.FINISHED and r.finish_reason == "length" for r in reqs)
    assert core.kv.pool.num_active == 0


def test_chunked_prefill_respects_the_token_budget(make_core: MakeCore) -> None:
    core = make_core(budget=8)
    r = _add(core, "a", 20, ignore_eos=True)
    chunks = []
    while not r.num_output_tokens:
        res = _step(core)
        assert res.plan is not None and res.plan.num_batched_tokens <= 8
        chunks.append([(s, n) for _, s, n in _chunks(core, res)])
    assert chunks == [[(0, 8)], [(8, 8)], [(16, 4)]]
    assert _chunks(core, _step(core)) == [("a", 20, 1)]  # then one token per step


def test_decodes_and_a_new_prefill_share_a_step(make_core: MakeCore) -> None:
    core = make_core(budget=8)
    a = _add(core, "a", 3, max_tokens=10, ignore_eos=True)
    _step(core)  # a prefilled, first token sampled
    _add(core, "b", 20, max_tokens=2, base=30, ignore_eos=True)
    res = _step(core)
    assert _chunks(core, res) == [("a", 3, 1), ("b", 0, 7)]
    assert res.plan is not None and (res.plan.num_decodes, res.plan.num_prefill_tokens) == (1, 7)
    assert a.num_output_tokens == 2


def test_stop_rules_max_tokens_stop_ids_eos_and_min_tokens(make_core: MakeCore) -> None:
    core = make_core(eos=frozenset({7}))
    core.executor = Forced(core.executor, 7)
    a = _add(core, "a", 3, max_tokens=2, ignore_eos=True)
    b = _add(core, "b", 3, max_tokens=10, stop_token_ids=[7], ignore_eos=True)
    c = _add(core, "c", 3, max_tokens=10)
    d = _add(core, "d", 3, max_tokens=3, min_tokens=2)
    _run(core)
    got = {r.external_id: (r.finish_reason, r.num_output_tokens) for r in (a, b, c, d)}
    assert got == {"a": ("length", 2), "b": ("stop", 1), "c": ("stop", 1), "d": ("stop", 2)}
    assert core.kv.pool.num_active == 0 and not core.has_work()


def test_request_stops_at_the_context_length(make_core: MakeCore) -> None:
    core = make_core(context_length=12)
    r = _add(core, "r", 8, max_tokens=100, ignore_eos=True)
    _run(core)
    assert r.finish_reason == "length" and r.num_tokens == 12


def test_prefix_hit_skips_prefill(make_core: MakeCore) -> None:
    core = make_core()
    a = _add(core, "a", 17, max_tokens=1)
    _run(core)
    assert a.is_finished
    b = _add(core, "b", 17, max_tokens=1)
    res = _step(core)
    # 4 full blocks of 17 tokens are cached: only the 17th token is computed
    assert [(s, n) for _, s, n in _chunks(core, res)] == [(16, 1)]
    assert b.num_cached_tokens == 16 and core.kv.hit_tokens == 16


def test_preemption_under_memory_pressure_finishes_everything_without_leaks(make_core: MakeCore) -> None:
    core = make_core(num_blocks=6)  # each grows to 16 tokens = 4 blocks; 8 needed, 6 exist
    a = _add(core, "a", 8, max_tokens=8, ignore_eos=True)
    b = _add(core, "b", 8, max_tokens=8, base=50, ignore_eos=True)
    preempted: list[str] = []
    for res in _run(core):
        assert res.plan is not None
        preempted += res.plan.preempted_ids
        assert core.kv.pool.num_active <= 6
    assert preempted and preempted[0] == b.request_id  # the newest running request goes first
    assert a.finish_reason == b.finish_reason == "length"
    assert a.num_output_tokens == b.num_output_tokens == 8
    assert b.num_preemptions >= 1 and core.scheduler.num_preemptions >= 1
    assert core.kv.pool.num_active == 0 and not core.scheduler.requests


def test_a_preempted_request_recomputes_from_its_cached_prefix(make_core: MakeCore) -> None:
    core = make_core(num_blocks=5)
    _add(core, "a", 8, max_tokens=8, ignore_eos=True)
    b = _add(core, "b", 8, max_tokens=4, base=50, ignore_eos=True)
    restarts = []
    while core.has_work():
        res = _step(core)
        restarts += [(s, n) for rid, s, n in _chunks(core, res) if rid == "b" and b.num_preemptions and s > 0 and n > 1]
    assert b.num_preemptions >= 1
    assert restarts, "b should resume after its cached blocks, not from token 0"


def test_the_watermark_keeps_blocks_free_for_running_requests(make_core: MakeCore) -> None:
    for watermark, admitted in ((0.0, True), (0.25, False)):
        core = make_core(num_blocks=16, watermark=watermark)  # 0.25: 4 blocks kept free
        _add(core, "a", 16, max_tokens=8, ignore_eos=True)  # 4 blocks, then a 5th
        _step(core)
        b = _add(core, "b", 29, base=40, ignore_eos=True)  # 8 blocks: 16 - 5 free = 11 < 8 + 4 kept free
        _step(core)
        assert (b.status is Status.RUNNING) is admitted, watermark
    # with nothing running, the watermark does not apply: the head is always admitted
    core = make_core(num_blocks=16, watermark=0.5)
    c = _add(core, "c", 40, ignore_eos=True)
    _step(core)
    assert c.status is Status.RUNNING


def test_abort_frees_blocks_wherever_the_request_is(make_core: MakeCore) -> None:
    core = make_core(max_seqs=1)
    a, b = _add(core, "a", 9, ignore_eos=True), _add(core, "b", 9, base=50, ignore_eos=True)
    _step(core)
    assert a.status is Status.RUNNING and b.status is Status.WAITING
    assert core.kv.pool.num_active == 3
    assert core.abort(a.request_id) and core.abort(b.request_id)
    assert core.kv.pool.num_active == 0 and not core.has_work()
    assert a.finish_reason == "cancelled" and core.stats.cancelled == 2
    assert not core.abort("nope")
    # the aborted prompt's full blocks stayed cached (announced once) and are evicted later
    res = _step(core)
    assert res.plan is not None and res.plan.finished_ids == [a.request_id]  # the executor forgets it
    _add(core, "c", 60, base=20, ignore_eos=True)
    res = _step(core)
    assert any(isinstance(e, KvRemoved) for e in res.events)


def test_duplicate_client_ids_are_separate_requests(make_core: MakeCore) -> None:
    core = make_core()
    one = _add(core, "same", 6, max_tokens=3, ignore_eos=True)
    two = _add(core, "same", 6, max_tokens=5, base=40, ignore_eos=True)
    assert one.request_id != two.request_id and one.external_id == two.external_id == "same"
    outputs: dict[str, int] = {}
    for res in _run(core):
        for rid, out in res.outputs:
            outputs[rid] = outputs.get(rid, 0) + len(out.token_ids)
    assert outputs == {one.request_id: 3, two.request_id: 5}
    assert core.abort(one.request_id) is False  # finished: nothing to abort, the other is untouched


def test_each_step_announces_its_events_once(make_core: MakeCore) -> None:
    core = make_core()
    _add(core, "a", 10, max_tokens=3, ignore_eos=True)
    stored = [b.block_hash for res in _run(core) for e in res.events if isinstance(e, KvStored) for b in e.blocks]
    assert len(stored) == len(set(stored)) == 3  # 12 tokens computed: 3 full blocks
    assert core.kv.take_events() == []  # nothing left behind for a later step
    assert {b.block_hash for st in core.cached_blocks() for b in st.blocks} == set(stored)
