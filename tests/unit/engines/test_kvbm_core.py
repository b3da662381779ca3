"""KV tiers inside the engine core, on both executors: offload on eviction, onboard on a prefix hit.

The torch executor moves the real K/V tensors (tiny random Llama), so a prefix onboarded from G2
or G3 must give the same greedy tokens as one found in G1 or recomputed; the mocker keeps the
same bookkeeping and charges the modelled transfer time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dynamo_grpc.engines.base import EngineRequest, SamplingParams
from dynamo_grpc.engines.core import CoreConfig, EngineCore, SchedulerConfig
from dynamo_grpc.events.kv import KvEvent, KvRemoved, KvStored
from dynamo_grpc.kvbm import KvbmConfig
from dynamo_grpc.kvbm.disk import SUFFIX

from .conftest import VOCAB, _executor

BS = 4
G1_BLOCKS = 8


def _prompt(seed: int, n: int = 17) -> list[int]:
    return [2 + (seed * 31 + 7 * k) % (VOCAB - 2) for k in range(n)]


A, B, C = _prompt(1), _prompt(2), _prompt(3)


@pytest.fixture(params=["mocker", "torch"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make(request: pytest.FixtureRequest, kind: str, kvbm: KvbmConfig | None = None) -> EngineCore:
    cfg = CoreConfig(
        block_size=BS,
        num_blocks=G1_BLOCKS,
        context_length=256,
        vocab_size=VOCAB,
        scheduler=SchedulerConfig(8, 64, 0.0),
        kvbm=kvbm or KvbmConfig(),
    )
    return EngineCore(cfg, _executor(kind, request, G1_BLOCKS, BS))


def run(core: EngineCore, prompt: list[int], events: list[KvEvent] | None = None) -> tuple[list[int], int]:
    """Greedy tokens and cached prompt tokens of one request run to its end."""
    req = core.make_request(EngineRequest("r", prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)))
    core.add(req)
    toks: list[int] = []
    cached = -1
    for _ in range(100):
        res = core.step()
        assert not res.failures, res.failures
        if events is not None:
            events.extend(res.events)
        for _, out in res.outputs:
            toks.extend(out.token_ids)
            cached = out.cached_tokens
            if out.finish_reason:
                return toks, cached
    raise AssertionError("request did not finish")


def evict_a(core: EngineCore, events: list[KvEvent] | None = None) -> None:
    """B and C take every device block, so none of A's stays in G1."""
    run(core, B, events)
    run(core, C, events)
    req = core.make_request(EngineRequest("x", A, SamplingParams()))
    req.update_block_hashes(BS)
    a_hashes = set(req.block_hashes)
    assert not any(core.kv.pool.lookup(h) for h in a_hashes), "A should be gone from G1"


def flush(core: EngineCore) -> None:
    assert core.kv.tiers is not None
    if core.kv.tiers.disk is not None:
        core.kv.tiers.disk.flush()


def test_recompute_baseline_and_g1_hit(request: pytest.FixtureRequest, kind: str) -> None:
    core = make(request, kind)
    first, cached = run(core, A)
    assert cached == 0
    again, cached = run(core, A)
    assert again == first and cached == 16  # G1 hit: 4 full blocks (one token is always computed)
    evict_a(core)
    third, cached = run(core, A)
    assert third == first and cached == 0  # no tiers: an evicted block is gone


def test_onboard_from_host_gives_the_same_tokens(request: pytest.FixtureRequest, kind: str) -> None:
    core = make(request, kind, KvbmConfig(host_bytes=64 * _block_bytes(request, kind)))
    events: list[KvEvent] = []
    first, _ = run(core, A, events)
    evict_a(core, events)
    removed_dev = {h for e in events if isinstance(e, KvRemoved) and e.medium == "device" for h in e.block_hashes}
    stored_host = {b.block_hash for e in events if isinstance(e, KvStored) and e.medium == "host" for b in e.blocks}
    assert removed_dev and removed_dev <= stored_host  # every eviction became an offload
    events.clear()
    again, cached = run(core, A, events)
    assert again == first
    assert cached == 16
    tiers = core.kv.tiers
    assert tiers is not None and tiers.stats.host.hit_tokens == 16 and tiers.stats.host.onboards == 4
    onboarded = [b.block_hash for e in events if isinstance(e, KvStored) and e.medium == "device" for b in e.blocks]
    assert len(onboarded) >= 4  # back in G1, announced as device blocks


def test_onboard_from_disk_and_through_host(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> None:
    nb = _block_bytes(request, kind)
    for host_blocks in (0, 2):  # G1 -> G3 directly, and G1 -> G2 (tiny) -> G3
        d = tmp_path / f"g3-{host_blocks}"
        core = make(request, kind, KvbmConfig(host_bytes=host_blocks * nb, disk_dir=str(d), disk_bytes=1 << 30))
        first, _ = run(core, A)
        evict_a(core)
        flush(core)
        if host_blocks:
            run(core, _prompt(4))  # push A's blocks out of the small host pool too
            flush(core)
        again, cached = run(core, A)
        assert again == first and cached == 16
        tiers = core.kv.tiers
        assert tiers is not None and tiers.stats.disk.hit_tokens > 0
        core.close()


def test_a_corrupt_disk_block_is_recomputed(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> None:
    core = make(request, kind, KvbmConfig(disk_dir=str(tmp_path), disk_bytes=1 << 30))
    first, _ = run(core, A)
    evict_a(core)
    flush(core)
    req = core.make_request(EngineRequest("x", A, SamplingParams()))
    req.update_block_hashes(BS)
    third = tmp_path / f"{req.block_hashes[2]:016x}{SUFFIX}"
    data = bytearray(third.read_bytes())
    data[len(data) // 2] ^= 0xFF
    third.write_bytes(bytes(data))
    events: list[KvEvent] = []
    again, cached = run(core, A, events)
    assert again == first
    assert cached == 8  # blocks 0 and 1 onboarded; block 2 is corrupt: it and 3 are recomputed
    tiers = core.kv.tiers
    assert tiers is not None and tiers.disk is not None and tiers.disk.stats.corrupt == 1
    assert not third.exists()
    gone = [h for e in events if isinstance(e, KvRemoved) and e.medium == "disk" for h in e.block_hashes]
    assert req.block_hashes[2] in gone
    core.close()


def test_restart_reuses_the_disk_directory(request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> None:
    cfg = KvbmConfig(disk_dir=str(tmp_path), disk_bytes=1 << 30)
    core = make(request, kind, cfg)
    first, _ = run(core, A)
    evict_a(core)
    core.close()  # flushes the writer; the files stay
    fresh = make(request, kind, cfg)
    announced = {b.block_hash for e in fresh.cached_blocks() if e.medium == "disk" for b in e.blocks}
    req = fresh.make_request(EngineRequest("x", A, SamplingParams()))
    req.update_block_hashes(BS)
    assert set(req.block_hashes[:4]) <= announced  # the dump announces what the directory holds
    again, cached = run(fresh, A)
    assert again == first and cached == 16
    fresh.close()


def test_mocker_charges_the_modelled_transfer_time(request: pytest.FixtureRequest) -> None:
    core = make(request, "mocker", KvbmConfig(host_bytes=1 << 40, host_gbps=1.0))
    run(core, A)
    evict_a(core)
    before = core.stats.simulated_s
    run(core, A)
    with_tiers = core.stats.simulated_s - before
    plain = make(request, "mocker")
    run(plain, A)
    evict_a(plain)
    before = plain.stats.simulated_s
    run(plain, A)
    recompute = plain.stats.simulated_s - before
    io = core.kv.tiers.io if core.kv.tiers else None
    assert io is not None
    onboard_s = 4 * io.block_nbytes / 1e9
    # the onboarded 16 tokens are not prefilled, but their 4 blocks cost bytes / 1 GB/s
    assert with_tiers == pytest.approx(recompute - _prefill_saving() + onboard_s, rel=1e-6)


def _prefill_saving() -> float:
    from dynamo_grpc.engines.mocker.timing import prefill_ms

    return (prefill_ms(17) - prefill_ms(1)) / 1000


def _block_bytes(request: pytest.FixtureRequest, kind: str) -> int:
    ex = _executor(kind, request, 1, BS)
    return int(ex.block_io().block_nbytes)  # type: ignore[attr-defined]


class _BrokenIO:
    """The mocker's BlockIO whose onboarding copy fails (a device error mid-transfer)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def from_host(self, pairs: object) -> None:
        raise OSError("DMA failed")


def test_a_failed_onboard_fails_the_step_and_leaves_no_bad_block(request: pytest.FixtureRequest) -> None:
    core = make(request, "mocker", KvbmConfig(host_bytes=1 << 40))
    run(core, A)
    evict_a(core)
    assert core.kv.tiers is not None
    core.kv.tiers.io = _BrokenIO(core.kv.tiers.io)  # type: ignore[assignment]
    req = core.make_request(EngineRequest("r", A, SamplingParams(temperature=0, max_tokens=3)))
    core.add(req)
    res = core.step()
    assert [type(e).__name__ for _, e in res.failures] == ["EngineDead"]
    assert core.kv.pool.num_active == 0  # the request's blocks are back in the pool
    req.update_block_hashes(BS)
    assert not any(core.kv.pool.lookup(h) for h in req.block_hashes)  # nothing half-copied stays cached
    gone = {h for e in res.events if isinstance(e, KvRemoved) and e.medium == "device" for h in e.block_hashes}
    assert set(req.block_hashes[:4]) <= gone
    core.kv.tiers.io = core.kv.tiers.io.inner  # type: ignore[attr-defined]
    _, cached = run(core, A)  # the host copies are intact: the next request onboards them
    assert cached == 16


def test_cancel_after_onboarding_frees_every_block(request: pytest.FixtureRequest) -> None:
    core = make(request, "mocker", KvbmConfig(host_bytes=1 << 40))
    run(core, A)
    evict_a(core)
    req = core.make_request(EngineRequest("r", [*A, 5, 6, 7, 8], SamplingParams(max_tokens=30, ignore_eos=True)))
    core.add(req)
    res = core.step()  # onboards A's prefix, prefills the rest, samples the first token
    assert res.outputs and res.outputs[0][1].cached_tokens == 16
    assert core.kv.pool.num_active > 0
    assert core.abort(req.request_id)
    assert core.kv.pool.num_active == 0


def test_live_events_and_a_replayed_dump_give_the_router_the_same_tiers(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """What a subscriber builds from the live events equals what it rebuilds from the worker's dump."""
    from dynamo_grpc.events.codec import make_batch
    from dynamo_grpc.router.config import RouterConfig
    from dynamo_grpc.router.router import Router, WorkerInfo
    from dynamo_grpc.router.sync import IndexSink

    def router() -> tuple[Router, IndexSink]:
        r = Router(RouterConfig(block_size=BS, seed=1))
        r.set_workers([WorkerInfo("w", "127.0.0.1:1", block_size=BS)])
        return r, IndexSink(r)

    nb = _block_bytes(request, "mocker")
    core = make(request, "mocker", KvbmConfig(host_bytes=3 * nb, disk_dir=str(tmp_path), disk_bytes=1 << 30))
    live, sink = router()
    events: list[KvEvent] = []
    for p in (A, B, C, A, _prompt(5), _prompt(6)):
        run(core, p, events)
    flush(core)
    events.extend(core.kv.take_events())  # G3 writes that finished after the last step
    sink.apply_batch(make_batch("w", 0, 1, 1, BS, events, 0.0))
    replayed, rsink = router()
    rsink.apply_batch(make_batch("w", 0, 1, 1, BS, core.cached_blocks(), 0.0))
    media = {t: replayed.tiers.tiers_of(("w", 0))[t] for t in ("device", "host", "disk")}
    assert media == {t: live.tiers.tiers_of(("w", 0))[t] for t in ("device", "host", "disk")}
    assert media["host"] == 3 and media["disk"] > 0 and media["device"] > 0
    for p in (A, B, C, _prompt(5)):
        req = core.make_request(EngineRequest("x", p, SamplingParams()))
        req.update_block_hashes(BS)
        assert replayed.tiers.overlaps(req.block_hashes) == live.tiers.overlaps(req.block_hashes)
    core.close()
