"""Scheduler of the torch engine (chunked prefill, prefix hits, preemption), without a model."""

from __future__ import annotations

from dynamo_grpc.engines.base import SamplingParams
from dynamo_grpc.engines.torch.kv_manager import KvCacheManager
from dynamo_grpc.engines.torch.request import Request, Status
from dynamo_grpc.engines.torch.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from dynamo_grpc.events.kv import KvRemoved, KvStored

BS = 4


def _sched(num_blocks: int = 16, max_seqs: int = 8, budget: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_seqs, budget), KvCacheManager(num_blocks, BS))


def _req(rid: str, n: int, max_tokens: int = 4, base: int = 0, **kw: object) -> Request:
    return Request(rid, [base + i for i in range(n)], SamplingParams(max_tokens=max_tokens, **kw))  # type: ignore[arg-type]


def _step(s: Scheduler, token: int = 1) -> SchedulerOutput:
    """Fake model: every request that reaches its end samples ``token``."""
    out = s.schedule()
    sampled = {x.request.request_id: token for x in out.seqs if x.samples}
    s.update(out, sampled)
    return out


def test_chunked_prefill_respects_the_token_budget() -> None:
    s = _sched(budget=8)
    r = _req("a", 20)
    s.add(r)
    chunks = []
    while not r.output_token_ids:
        out = _step(s)
        chunks.append([(x.start, x.num_new_tokens) for x in out.seqs])
        assert out.num_batched_tokens <= 8
    assert chunks == [[(0, 8)], [(8, 8)], [(16, 4)]]
    # then one token per step
    out = _step(s)
    assert [(x.start, x.num_new_tokens) for x in out.seqs] == [(20, 1)]


def test_decodes_and_new_prefill_share_a_step() -> None:
    s = _sched(budget=10)
    s.add(_req("a", 5))
    _step(s)
    s.add(_req("b", 30, base=100))
    out = _step(s)
    assert [(x.request.request_id, x.num_new_tokens) for x in out.seqs] == [("a", 1), ("b", 9)]


def test_max_num_seqs_limits_running() -> None:
    s = _sched(max_seqs=2)
    for i in range(3):
        s.add(_req(f"r{i}", 3, base=10 * i))
    out = _step(s)
    assert {x.request.request_id for x in out.seqs} == {"r0", "r1"}
    assert len(s.waiting) == 1


def test_finish_on_max_tokens_stop_and_eos() -> None:
    s = _sched()
    a = _req("a", 3, max_tokens=2)
    b = _req("b", 3, max_tokens=10, stop_token_ids=[7])
    c = Request("c", [1, 2, 3], SamplingParams(max_tokens=10), eos_token_ids=frozenset({7}))
    d = Request("d", [1, 2, 3], SamplingParams(max_tokens=3, min_tokens=2), eos_token_ids=frozenset({7}))
    for r in (a, b, c, d):
        s.add(r)
    finished = []
    for _ in range(4):
        out = s.schedule()
        finished += s.update(out, {x.request.request_id: 7 for x in out.seqs if x.samples})
    reasons = {f.request.request_id: (f.reason, len(f.request.output_token_ids)) for f in finished}
    assert reasons == {"a": ("length", 2), "b": ("stop", 1), "c": ("stop", 1), "d": ("stop", 2)}
    assert s.kv.pool.num_active == 0 and not s.has_work()


def test_prefix_hit_skips_prefill() -> None:
    s = _sched(budget=64)
    a = _req("a", 17, max_tokens=1)
    s.add(a)
    while not a.is_finished:
        _step(s)
    b = _req("b", 17, max_tokens=1)
    s.add(b)
    out = _step(s)
    # 4 full blocks of 17 tokens are cached: only the 17th token is computed
    assert [(x.start, x.num_new_tokens) for x in out.seqs] == [(16, 1)]
    assert b.num_cached_tokens == 16
    assert s.kv.hit_tokens == 16


def test_preemption_by_recompute_when_blocks_run_out() -> None:
    s = _sched(num_blocks=6, budget=64)
    a = _req("a", 8, max_tokens=8)  # each grows to 16 tokens = 4 blocks; 8 needed, 6 exist
    b = _req("b", 8, max_tokens=8, base=50)
    s.add(a)
    s.add(b)
    preempted: list[str] = []
    for _ in range(40):
        if not s.has_work():
            break
        out = _step(s, token=3)
        preempted += out.preempted
        assert s.kv.pool.num_active <= 6
    assert preempted and preempted[0] == "b"  # the newest running request goes first
    assert a.is_finished and b.is_finished
    assert len(a.output_token_ids) == 8 and len(b.output_token_ids) == 8
    assert b.num_preemptions >= 1
    assert s.kv.pool.num_active == 0


def test_preempted_request_recomputes_from_its_cached_prefix() -> None:
    s = _sched(num_blocks=5, budget=64)
    a = _req("a", 8, max_tokens=8)
    b = _req("b", 8, max_tokens=4, base=50)
    s.add(a)
    s.add(b)
    seen_restart = False
    for _ in range(40):
        if not s.has_work():
            break
        out = s.schedule()
        for x in out.seqs:
            if x.request is b and b.num_preemptions and x.start > 0 and x.num_new_tokens > 1:
                seen_restart = True
        s.update(out, {x.request.request_id: 3 for x in out.seqs if x.samples})
    assert b.num_preemptions >= 1
    assert seen_restart, "b should resume after its cached blocks, not from token 0"


def test_abort_frees_blocks_everywhere() -> None:
    s = _sched(max_seqs=1)
    a, b = _req("a", 9), _req("b", 9, base=100)
    s.add(a)
    s.add(b)
    _step(s)
    used = s.kv.pool.num_active
    assert used == 3 and a.status is Status.RUNNING
    s.abort("a")
    s.abort("b")  # still waiting
    assert s.kv.pool.num_active == 0 and not s.has_work()
    assert a.finish_reason == "cancelled"
    assert s.abort("nope") is None
    # the aborted prompt's full blocks stayed cached and evictable
    events = s.kv.take_events()
    assert [type(e) for e in events] == [KvStored]
    s.add(_req("c", 60, base=1000))
    _step(s)
    assert any(isinstance(e, KvRemoved) for e in s.kv.take_events())


def test_decode_groups_split_by_length() -> None:
    from dynamo_grpc.engines.torch.runner import split_by_length

    assert split_by_length([]) == []
    assert split_by_length([3, 3, 3]) == [3]  # one length: one group
    assert split_by_length([1, 1, 1, 1, 40, 40]) == [4, 6]  # short ones are not padded to 40
    lens = sorted((i * 37) % 300 + 1 for i in range(200))  # many distinct lengths: quantile groups
    cuts = split_by_length(lens)
    assert cuts[-1] == 200 and len(cuts) <= 4 and cuts == sorted(set(cuts))
