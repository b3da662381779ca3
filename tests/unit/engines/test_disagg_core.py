"""Disaggregation inside the engine core: a prefill leases its blocks, a second core reserves blocks,
receives the bytes straight into them and continues.

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
from dynamo_grpc.engines.core.kv_manager import KvReservation
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


def _write(core: EngineCore, res: KvReservation, data: bytes) -> None:
    """What a pull does on the decode side: the bytes go into the reservation's blocks, through the
    cache's own writable views (the torch cache; the mocker holds no bytes)."""
    views = getattr(core.executor, "import_views", None)
    if views is not None:
        kv_socket.write_views(views(res.fill_block_ids), data)


def _prompt(n: int, base: int = 3) -> list[int]:
    return [2 + (base + 7 * k) % 90 for k in range(n)]


def _handoff(
    prefill: EngineCore, decode: EngineCore, prompt: list[int], sp: SamplingParams
) -> tuple[list[int], list[object], KvReservation]:
    """Prefill on one core; the other reserves blocks, receives the lease's blocks it lacks into them, continues."""
    first_sp = SamplingParams(**{**sp.__dict__, "max_tokens": 1})
    first, out, _ = _run(prefill, EngineRequest("p", prompt, first_sp, hold_kv=True))
    assert out.lease is not None and out.lease.num_tokens == len(prompt)
    res = decode.reserve_import(prompt, None)
    assert res is not None
    lease = prefill.leases.begin_pull(out.lease.lease_id)
    _write(decode, res, _export(prefill, lease.block_ids[res.first_block :]))
    prefill.leases.end_pull(out.lease.lease_id)
    assert prefill.kv.pool.num_active == 0  # pulled: the prefill side's blocks are back
    assert not decode.kv.take_events()  # nothing announced before the request runs
    imp = KvImport(res.first_block, len(prompt), res)
    rest, _, events = _run(decode, EngineRequest("d", prompt, sp, prefilled=first, kv_import=imp))
    return first + rest, events, res


@pytest.mark.parametrize(
    ("n", "seeded"),
    [(10, False), (12, False), (17, False), (10, True), (12, True), (17, True)],  # partial, exact, several + partial
)
def test_a_handoff_gives_the_aggregated_tokens(make_core: MakeCore, n: int, seeded: bool) -> None:
    sp = SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.8 if seeded else 0.0, seed=11 if seeded else None)
    prompt = _prompt(n)
    agg, _, _ = _run(make_core(), EngineRequest("a", prompt, sp))
    decode = make_core()
    disagg, events, res = _handoff(make_core(), decode, prompt, sp)
    assert disagg == agg
    assert res.first_block == 0 and len(res.fill_block_ids) == -(-n // 4)  # the partial last block too
    assert len(res.blocks) == -(-(n + 1) // 4)  # and the first generated token's slot
    # the decoder announced the pulled blocks and holds them: a follow-up sharing the prefix is a local hit
    stored = [b.block_hash for e in events if isinstance(e, KvStored) for b in e.blocks]
    assert len(stored) >= n // 4
    _, follow, _ = _run(decode, EngineRequest("f", [*prompt, 5, 6, 7], SamplingParams(max_tokens=1)))
    assert follow.cached_tokens >= (n // 4) * 4
    assert decode.kv.pool.num_active == 0 and not decode.kv.reservations


def test_the_decoder_reserves_and_pulls_only_what_it_lacks(make_core: MakeCore) -> None:
    sp = SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.0)
    prompt = _prompt(14)
    agg, _, _ = _run(make_core(), EngineRequest("a", prompt, sp))
    decode = make_core()
    _run(decode, EngineRequest("warm", prompt[:9], SamplingParams(max_tokens=1)))  # caches blocks 0 and 1
    disagg, _, res = _handoff(make_core(), decode, prompt, sp)
    assert res.first_block == 2 and len(res.fill_block_ids) == 2
    assert disagg == agg


def test_a_reservation_pins_its_prefix_and_takes_its_blocks_from_the_free_pool(make_core: MakeCore) -> None:
    """While a pull runs, nothing else can evict the cached prefix it continues or use its blocks."""
    core = make_core(num_blocks=6)
    prompt = _prompt(9)
    _run(core, EngineRequest("warm", prompt[:8], SamplingParams(max_tokens=1)))  # blocks 0-1 cached, free
    res = core.reserve_import(prompt, None)
    assert res is not None and res.first_block == 2 and len(res.blocks) == 3
    assert core.kv.pool.num_active == 3 and core.kv.num_reserved_blocks == 3
    assert core.reserve_import(_prompt(16, base=9), None) is None  # 4 blocks wanted, 3 free: nothing taken
    assert core.kv.pool.num_active == 3
    # a request that fills the other 3 blocks evicts nothing the reservation holds
    _run(core, EngineRequest("other", _prompt(11, base=5), SamplingParams(max_tokens=1)))
    head = res.blocks[0]
    assert head.block_hash is not None and core.kv.pool.lookup(head.block_hash) is head  # still cached
    assert core.kv.cancel(res) and not core.kv.cancel(res)  # idempotent
    assert core.kv.pool.num_active == 0


def test_a_cancelled_reservation_frees_its_blocks_and_registers_nothing(make_core: MakeCore) -> None:
    """A pull cut midway: the reserved blocks hold half-written KV; cancelling frees them unannounced,
    and a request that still carries the cancelled reservation prefills locally (same tokens)."""
    sp = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0)
    prompt = _prompt(11)
    agg, _, _ = _run(make_core(), EngineRequest("a", prompt, sp))
    prefill, decode = make_core(), make_core()
    first_sp = SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0)
    first, out, _ = _run(prefill, EngineRequest("p", prompt, first_sp, hold_kv=True))
    assert out.lease is not None
    res = decode.reserve_import(prompt, None)
    assert res is not None
    lease = prefill.leases.begin_pull(out.lease.lease_id)
    half = _export(prefill, lease.block_ids[:1])
    views = getattr(decode.executor, "import_views", None)
    if views is not None:
        kv_socket.write_views(views(res.fill_block_ids[:1]), half)  # one block of three arrived
    prefill.leases.end_pull(out.lease.lease_id)
    cached = decode.kv.pool.num_cached
    assert decode.kv.cancel(res)
    assert decode.kv.pool.num_active == 0 and decode.kv.pool.num_cached == cached == 0
    assert not [e for e in decode.kv.take_events() if isinstance(e, KvStored)]
    imp = KvImport(res.first_block, len(prompt), res)
    rest, _, _ = _run(decode, EngineRequest("d", prompt, sp, prefilled=first, kv_import=imp))
    assert first + rest == agg  # recomputed, not read from the half-written blocks


def test_an_aborted_request_frees_the_blocks_it_claimed(make_core: MakeCore) -> None:
    core = make_core(num_blocks=8, budget=4)
    running = core.make_request(EngineRequest("r", _prompt(20, base=2), SamplingParams(max_tokens=50)))
    core.add(running)
    core.step()  # takes the step budget: the import waits in the queue
    res = core.reserve_import(_prompt(9), None)
    assert res is not None
    req = core.make_request(
        EngineRequest("d", _prompt(9), SamplingParams(max_tokens=3), prefilled=[4], kv_import=KvImport(0, 9, res))
    )
    core.add(req)
    assert not core.kv.reservations and len(req.blocks) == 3  # claimed: the request owns them now
    assert not core.kv.cancel(res)  # a late cancel (the servicer's finally) changes nothing
    assert core.abort(req.request_id)
    assert core.abort(running.request_id)
    assert core.kv.pool.num_active == 0


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


def test_a_request_waits_while_a_pull_holds_the_blocks_it_needs(make_core: MakeCore) -> None:
    """Nothing runs and the head does not fit only because a pull in flight holds blocks: it waits (it is not
    refused as a prompt that can never fit), and runs once the reservation is gone."""
    core = make_core(num_blocks=6)
    res = core.reserve_import(_prompt(15), None)  # 4 of 6 blocks
    assert res is not None
    r = core.make_request(EngineRequest("w", _prompt(12, base=8), SamplingParams(max_tokens=2, ignore_eos=True)))
    core.add(r)
    step = core.step()
    assert not step.failures and not step.ran and r.request_id in core.scheduler.requests
    assert core.kv.cancel(res)
    tokens, _, _ = _run_added(core, r.request_id)
    assert len(tokens) == 2


def test_a_pulled_request_goes_ahead_of_requests_still_waiting_for_blocks(make_core: MakeCore) -> None:
    """It holds every block it needs: behind a head that waits for blocks it would hold them hostage."""
    core = make_core(num_blocks=8)
    big = core.make_request(EngineRequest("big", _prompt(30, base=4), SamplingParams(max_tokens=1)))
    res = core.reserve_import(_prompt(9), None)  # 3 blocks: 5 left, the 30-token prompt needs 8
    assert res is not None
    core.add(big)
    assert not core.step().ran
    pulled = core.make_request(
        EngineRequest(
            "d", _prompt(9), SamplingParams(max_tokens=3, ignore_eos=True), prefilled=[4], kv_import=KvImport(0, 9, res)
        )
    )
    core.add(pulled)
    assert [q.request_id for q in core.scheduler.waiting] == [pulled.request_id, big.request_id]
    tokens, _, _ = _run_added(core, pulled.request_id)
    assert len(tokens) == 2  # after the prefilled one: it ran, freed its blocks, and the big one ran after it
    assert core.kv.pool.num_active == 0 and not core.scheduler.requests


def _run_added(core: EngineCore, rid: str) -> tuple[list[int], EngineOutput | None, list[object]]:
    tokens: list[int] = []
    last: EngineOutput | None = None
    while core.has_work():
        res = core.step()
        assert not res.failures, res.failures
        for i, out in res.outputs:
            if i == rid:
                tokens.extend(out.token_ids)
                last = out
    return tokens, last, []
