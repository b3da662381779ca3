"""Disaggregation inside the engine core: a prefill leases its blocks, a second core installs them and continues.

Both executors run the same checks: the mocker moves no bytes (its chunks are empty), the torch runner
moves the real K/V tensors of a tiny random Llama, so its continuation is token-identical to
aggregated serving only if the bytes landed in the right slots (greedy and seeded sampling).
"""

from __future__ import annotations

import pytest

from dynamo_grpc import errors
from dynamo_grpc.engines.base import EngineOutput, EngineRequest, KvImport, SamplingParams
from dynamo_grpc.engines.core import EngineCore
from dynamo_grpc.engines.core.block_pool import BlockPool
from dynamo_grpc.engines.core.leases import LeaseTable
from dynamo_grpc.events.kv import KvStored
from dynamo_grpc.worker import kv_socket
from tests.unit.engines.conftest import MakeCore


def _run(core: EngineCore, req: EngineRequest) -> tuple[list[int], EngineOutput, list[object]]:
    r = core.make_request(req)
    core.add(r)
    tokens: list[int] = []
    last: EngineOutput | None = None
    events: list[object] = []
    while core.has_work():
        res = core.step()
        assert not res.failures, res.failures
        events.extend(res.events)
        for rid, out in res.outputs:
            if rid == r.request_id:
                tokens.extend(out.token_ids)
                last = out
    assert last is not None
    return tokens, last, events


def _export(core: EngineCore, block_ids: list[int]) -> bytes:
    export = getattr(core.executor, "export_blocks", None)
    return export(block_ids) if export is not None else b""


def _prompt(n: int, base: int = 3) -> list[int]:
    return [2 + (base + 7 * k) % 90 for k in range(n)]


def _handoff(
    prefill: EngineCore,
    decode: EngineCore,
    prompt: list[int],
    sp: SamplingParams,
    first_block: int = 0,
    pooled: bool = False,
) -> tuple[list[int], list[object]]:
    """Prefill on one core, pull its lease's blocks from ``first_block``, continue on the other.

    ``pooled``: the bytes arrive as the data socket hands them over, a writable view of a kept receive
    buffer, which the torch cache reads in place instead of copying."""
    first_sp = SamplingParams(**{**sp.__dict__, "max_tokens": 1})
    first, out, _ = _run(prefill, EngineRequest("p", prompt, first_sp, hold_kv=True))
    assert out.lease is not None and out.lease.num_tokens == len(prompt)
    lease = prefill.leases.begin_pull(out.lease.lease_id)
    ids = lease.block_ids[first_block:]
    data = _export(prefill, ids)
    if pooled:
        view = kv_socket.ReceivePool(1 << 20).take(len(data))
        view[:] = data
        data = view  # type: ignore[assignment]
    imp = KvImport(first_block, len(prompt), [(first_block, len(ids), data)])
    prefill.leases.end_pull(out.lease.lease_id)
    assert prefill.kv.pool.num_active == 0  # pulled: the prefill side's blocks are back
    rest, _, events = _run(decode, EngineRequest("d", prompt, sp, prefilled=first, kv_import=imp))
    return first + rest, events


@pytest.mark.parametrize(
    ("n", "seeded", "pooled"),
    [(10, False, False), (12, False, False), (17, False, False), (10, True, False), (12, True, False)]
    + [(17, True, False), (17, False, True), (10, True, True)],  # partial last block, exact blocks, several + partial
)
def test_a_handoff_gives_the_aggregated_tokens(make_core: MakeCore, n: int, seeded: bool, pooled: bool) -> None:
    sp = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.8 if seeded else 0.0, seed=11 if seeded else None)
    prompt = _prompt(n)
    agg, _, _ = _run(make_core(), EngineRequest("a", prompt, sp))
    decode = make_core()
    disagg, events = _handoff(make_core(), decode, prompt, sp, pooled=pooled)
    assert disagg == agg
    # the decoder announced the pulled blocks and holds them: a follow-up sharing the prefix is a local hit
    stored = [b.block_hash for e in events if isinstance(e, KvStored) for b in e.blocks]
    assert len(stored) >= n // 4
    _, follow, _ = _run(decode, EngineRequest("f", [*prompt, 5, 6, 7], SamplingParams(max_tokens=1)))
    assert follow.cached_tokens >= (n // 4) * 4
    assert decode.kv.pool.num_active == 0


@pytest.mark.parametrize("first_block", [2, 0])  # 0: it pulled blocks it turned out to hold; they are skipped
def test_the_decoder_pulls_only_what_it_lacks(make_core: MakeCore, first_block: int) -> None:
    sp = SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.0)
    prompt = _prompt(14)
    agg, _, _ = _run(make_core(), EngineRequest("a", prompt, sp))
    decode = make_core()
    _run(decode, EngineRequest("warm", prompt[:9], SamplingParams(max_tokens=1)))  # caches blocks 0 and 1
    disagg, _ = _handoff(make_core(), decode, prompt, sp, first_block=first_block)
    assert disagg == agg


def test_an_import_whose_prefix_was_evicted_is_recomputed(make_core: MakeCore) -> None:
    """The decoder said it held block 0 but lost it before admission: it prefills locally, same tokens."""
    sp = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0)
    prompt = _prompt(11)
    agg, _, _ = _run(make_core(), EngineRequest("a", prompt, sp))
    disagg, _ = _handoff(make_core(), make_core(), prompt, sp, first_block=1)
    assert disagg == agg


def test_a_cancelled_prefill_leaves_no_lease(make_core: MakeCore) -> None:
    core = make_core(budget=8)
    _, out, _ = _run(core, EngineRequest("p", _prompt(30), SamplingParams(max_tokens=1), hold_kv=True))
    assert out.lease is not None and core.leases.num_active == 1 and core.kv.pool.num_active == 8
    assert core.leases.release(out.lease.lease_id)
    assert core.kv.pool.num_active == 0
    r2 = core.make_request(EngineRequest("q", _prompt(30, base=5), SamplingParams(max_tokens=1), hold_kv=True))
    core.add(r2)
    core.step()  # mid-prefill (8 of 30 tokens)
    assert core.abort(r2.request_id)
    assert core.leases.num_active == 0 and core.kv.pool.num_active == 0


def test_a_prefill_with_a_first_token_but_no_kv_is_refused_cleanly(make_core: MakeCore) -> None:
    core = make_core()
    with pytest.raises(errors.InvalidArgument, match="covers 5 tokens but the prompt has 6"):
        core.check(EngineRequest("d", _prompt(6), prefilled=[3], kv_import=KvImport(0, 5)))


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _table(seconds: float = 30.0) -> tuple[LeaseTable, BlockPool, _Clock]:
    pool = BlockPool(8)
    clock = _Clock()
    return LeaseTable(pool, seconds, clock), pool, clock


def test_a_lease_is_pulled_once_then_its_blocks_are_free() -> None:
    t, pool, _ = _table()
    t.create("L", pool.allocate(3), 10, [1, 2])
    assert pool.num_active == 3 and t.num_blocks == 3
    assert t.begin_pull("L").block_ids == [0, 1, 2]
    with pytest.raises(errors.FailedPrecondition, match="being pulled"):
        t.begin_pull("L")
    assert t.end_pull("L")
    assert pool.num_active == 0 and t.num_active == 0
    with pytest.raises(errors.FailedPrecondition, match="already pulled"):
        t.begin_pull("L")
    assert not t.release("L")  # release stays idempotent
    assert t.stats.pulled == 1 and t.stats.refused == 2


def test_unknown_released_and_expired_leases_are_not_found() -> None:
    t, pool, clock = _table(5.0)
    with pytest.raises(errors.NotFound, match="no KV lease 'x'"):
        t.begin_pull("x")
    t.create("R", pool.allocate(1), 4, [])
    assert t.release("R") and not t.release("R")
    with pytest.raises(errors.NotFound, match="released"):
        t.begin_pull("R")
    t.create("E", pool.allocate(2), 8, [])
    t.create("P", pool.allocate(2), 8, [])
    t.begin_pull("P")
    clock.t = 5.0
    assert t.expire() == 1  # E; P is being pulled and does not expire under the pull
    with pytest.raises(errors.NotFound, match="expired"):
        t.begin_pull("E")
    assert pool.num_active == 2
    t.end_pull("P")
    assert pool.num_active == 0 and t.stats.expired == 1


def test_a_lease_past_its_expiry_is_refused_even_before_the_sweep() -> None:
    t, pool, clock = _table(1.0)
    t.create("E", pool.allocate(2), 8, [])
    clock.t = 2.0
    with pytest.raises(errors.NotFound, match="expired"):
        t.begin_pull("E")
    assert pool.num_active == 0
