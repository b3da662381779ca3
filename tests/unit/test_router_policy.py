"""Router core: herding fix, prefix following, busy threshold, block-size refusal, active tracking."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dynamo_grpc.router.active import ActiveSequences
from dynamo_grpc.router.approx import ApproxIndexer
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.policy import Candidate, Choice, costs, not_busy, pick
from dynamo_grpc.router.router import AllBusy, NotReady, NoWorkers, RouteInput, Router, WorkerInfo
from dynamo_grpc.tokens.block_hash import block_hash_list

BS = 64


def make_router(n: int = 4, **kw: object) -> Router:
    r = Router(RouterConfig(block_size=BS, seed=7, **kw))  # type: ignore[arg-type]
    r.set_workers([WorkerInfo(f"w{i}", f"127.0.0.1:{9000 + i}", "m", BS, 1, 1000) for i in range(n)])
    r.ready = True
    return r


def test_shared_system_prompt_does_not_herd_and_longer_prefix_is_followed() -> None:
    r = make_router(4, busy_threshold=1.0)  # nothing is freed here: the default threshold would refuse
    rng = random.Random(1)
    system = [rng.randrange(50_000) for _ in range(2048)]
    placed: Counter[str] = Counter()
    for i in range(100):
        user = [rng.randrange(50_000) for _ in range(3 * BS)]
        tokens = system + user
        res = r.route(RouteInput(f"r{i}", token_ids=tokens, expected_output_tokens=128))
        placed[res.instance_id] += 1
        # the chosen worker now caches the prompt (what its KV events would say)
        r.indexer.store((res.instance_id, 0), block_hash_list(tokens, BS))
    assert len(placed) == 4, placed
    assert max(placed.values()) <= 40, placed
    # A long prefix cached on one worker only pulls a request there despite its load.
    doc = [rng.randrange(50_000) for _ in range(100 * BS)]
    r.indexer.store(("w2", 0), block_hash_list(doc, BS))
    res = r.route(RouteInput("long", token_ids=[*doc, 1, 2, 3]))
    assert res.instance_id == "w2" and res.overlap_blocks == 100


def test_overlap_reported_and_cost_breakdown() -> None:
    r = make_router(2, prefill_load_scale=2.0)
    tokens = list(range(4 * BS))
    r.indexer.store(("w1", 0), block_hash_list(tokens, BS)[:3])
    res = r.route(RouteInput("a", token_ids=tokens))
    assert (res.instance_id, res.overlap_blocks, res.prompt_blocks) == ("w1", 3, 4)
    assert res.prefill_cost == 2.0 * (4 - 3) and res.decode_cost == 4 - 3  # its 3 cached blocks are shared
    # a dry run does not add load; a real one does
    before = r.active.load(("w1", 0)).decode_blocks
    r.route(RouteInput("b", token_ids=tokens, dry_run=True))
    assert r.active.load(("w1", 0)).decode_blocks == before


def test_update_prefill_done_and_free() -> None:
    r = make_router(1)
    r.route(RouteInput("a", token_ids=list(range(2 * BS)), expected_output_tokens=BS))
    w = r.active.load(("w0", 0))
    assert (w.prefill_blocks, w.decode_blocks) == (2, 3)
    assert r.prefill_done("a", output_tokens=2 * BS)
    w = r.active.load(("w0", 0))
    assert (w.prefill_blocks, w.decode_blocks) == (0, 4)
    assert r.free("a") and not r.free("a")
    assert r.active.load(("w0", 0)).decode_blocks == 0


def test_temperature_zero_breaks_ties_randomly_and_softmax_prefers_cheap() -> None:
    rng = random.Random(0)
    ties = [Choice(k, 0, 1.0, 1.0) for k in "abc"]
    assert {pick(ties, 0.0, rng).key for _ in range(200)} == {"a", "b", "c"}
    cs = [Choice("cheap", 0, 0.0, 1.0), Choice("dear", 0, 100.0, 1.0)]
    got = Counter(pick(cs, 0.2, rng).key for _ in range(2000))
    assert got["cheap"] > got["dear"] > 0
    assert Counter(pick(cs, 0.0, rng).key for _ in range(50)) == {"cheap": 50}


def test_busy_threshold_exhausts_only_when_all_busy() -> None:
    r = make_router(2, busy_threshold=0.9)
    r.set_load(("w0", 0), 950, 1000)
    assert r.route(RouteInput("a", token_ids=list(range(BS)))).instance_id == "w1"
    r.set_load(("w1", 0), 990, 1000)
    with pytest.raises(AllBusy):
        r.route(RouteInput("b", token_ids=list(range(BS))))


def test_not_ready_no_workers_and_bad_input() -> None:
    r = Router(RouterConfig(block_size=BS))
    with pytest.raises(NotReady):
        r.route(RouteInput("a", token_ids=[1]))
    r.ready = True
    with pytest.raises(NoWorkers):
        r.route(RouteInput("a", token_ids=[1]))
    r = make_router(1)
    with pytest.raises(ValueError):
        r.route(RouteInput("", token_ids=[1]))
    with pytest.raises(NoWorkers):
        r.route(RouteInput("a", token_ids=[1], exclude=["w0"]))
    with pytest.raises(ValueError):
        RouterConfig(mode="magic").validate()


def test_block_size_mismatch_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    r = Router(RouterConfig())
    r.ready = True
    with caplog.at_level("ERROR"):
        ok = r.set_workers(
            [WorkerInfo("a", "x:1", "m", 64), WorkerInfo("b", "x:2", "m", 32), WorkerInfo("c", "x:3", "m", 64)],
            card_block_size=64,
        )
    assert [w.instance_id for w in ok] == ["a", "c"]
    assert "b" in r.refused and "block_size 32" in caplog.text
    assert {r.route(RouteInput(f"q{i}", token_ids=list(range(64)))).instance_id for i in range(40)} == {"a", "c"}
    # without a card, the first worker by id sets the size
    r2 = Router(RouterConfig())
    assert [w.instance_id for w in r2.set_workers([WorkerInfo("z", "x", "m", 16), WorkerInfo("y", "x", "m", 32)])] == [
        "y"
    ]


def test_worker_removal_forgets_blocks_and_load() -> None:
    r = make_router(2)
    tokens = list(range(2 * BS))
    r.indexer.store(("w0", 0), block_hash_list(tokens, BS))
    r.route(RouteInput("a", token_ids=tokens))
    r.set_workers([WorkerInfo("w1", "127.0.0.1:9001", "m", BS)])
    assert r.indexer.overlaps(block_hash_list(tokens, BS)) == {}
    assert "a" not in r.active
    assert r.route(RouteInput("b", token_ids=tokens)).instance_id == "w1"


def test_round_robin_and_random_modes() -> None:
    r = make_router(3, mode="round-robin")
    got = [r.route(RouteInput(f"r{i}", token_ids=list(range(BS)))).instance_id for i in range(6)]
    assert got == ["w0", "w1", "w2", "w0", "w1", "w2"]
    r = make_router(3, mode="random")
    assert len({r.route(RouteInput(f"r{i}", token_ids=list(range(BS)))).instance_id for i in range(60)}) == 3


def test_approx_mode_follows_routed_prefix_until_ttl() -> None:
    now = [0.0]
    a = ApproxIndexer(ttl_s=120, clock=lambda: now[0])
    a.record("w", [1, 2, 3])
    assert a.overlaps([1, 2, 9]) == {"w": 2}
    now[0] = 60
    a.record("w", [1])  # refresh block 1 only
    now[0] = 130
    assert a.overlaps([1, 2]) == {"w": 1}
    now[0] = 200
    assert a.overlaps([1]) == {} and len(a) == 0
    r = make_router(4, mode="approx")
    tokens = list(range(5 * BS))
    first = r.route(RouteInput("a", token_ids=tokens)).instance_id
    r.free("a")
    again = r.route(RouteInput("b", token_ids=tokens))
    assert again.instance_id == first and again.overlap_blocks == 5


def test_active_sequences_ttl_and_remote() -> None:
    now = [0.0]
    act = ActiveSequences(BS, ttl_s=10, clock=lambda: now[0])
    act.add("x", "w", 2, 3)
    now[0] = 11
    assert act.expire() == 1 and len(act) == 0
    r1, r2 = make_router(2), make_router(2)
    r1.router_id, r2.router_id = "r1", "r2"
    changes = []
    r1.on_active_change = changes.append
    r1.route(RouteInput("q", token_ids=list(range(BS))))
    for c in changes:
        r2.apply_remote(c, "r1")
        r1.apply_remote(c, "r1")  # own echo ignored
    key = (changes[0].instance_id, 0)
    assert r2.active.load(key).decode_blocks == r1.active.load(key).decode_blocks == 1
    r1.free("q")
    r2.apply_remote(changes[-1], "r1")
    assert r2.active.load(key).decode_blocks == 0


def _reference_choices(r: Router, hashes: list[int], exclude: set[str], out_tokens: int) -> list[Choice]:
    """The per-candidate reference policy (policy.costs + not_busy) over the router's current state."""
    cands = []
    for w in r.workers.values():
        if w.instance_id in exclude:
            continue
        for key in w.ranks():
            a = r.active.load(key)
            usage = r.kv_usage.get(key)
            if usage is None and w.kv_blocks:
                usage = (a.prefill_blocks + a.decode_blocks) / w.kv_blocks
            cands.append(Candidate(key, 0, a.prefill_blocks, a.decode_blocks, usage))
    overlaps = r.indexer.overlaps(hashes, touch=False)
    for c in cands:
        c.overlap = overlaps.get(c.key, 0)
    free = not_busy(cands, r.config.busy_threshold)
    prompt = len(hashes)
    return costs(free, prompt, prompt + -(-out_tokens // BS), r.config.prefill_load_scale)


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_decision_matches_reference_policy(seed: int) -> None:
    """Random loads, usage, cached prefixes, dp ranks, exclusions: the chosen rank is a reference argmin."""
    rng = random.Random(seed)
    scale = rng.choice([1.0, 0.7])
    # the reference is the bare cost: no prefill queue threshold, no predicted prefixes
    r = Router(
        RouterConfig(
            block_size=BS, seed=seed, busy_threshold=0.8, prefill_load_scale=scale, queue_threshold=0, predicted_ttl_s=0
        )
    )
    r.set_workers([WorkerInfo(f"w{i}", f"h:{i}", "m", BS, rng.choice([1, 2]), rng.choice([0, 400])) for i in range(7)])
    r.ready = True
    ranks = [k for w in r.workers.values() for k in w.ranks()]
    prompts = [[rng.randrange(1000) for _ in range(rng.randrange(1, 12) * BS)] for _ in range(6)]
    for step in range(150):
        tokens = rng.choice(prompts)[: rng.randrange(1, 12) * BS] + [rng.randrange(1000) for _ in range(BS)]
        op = rng.random()
        if op < 0.2:  # a worker caches a prefix
            key = rng.choice(ranks)
            r.indexer.store(key, block_hash_list(tokens, BS)[: rng.randrange(1, len(tokens) // BS + 1)])
        elif op < 0.3:
            r.set_load(rng.choice(ranks), rng.randrange(1000), 1000)
        elif op < 0.4 and r.active._seqs:
            rid = rng.choice(list(r.active._seqs))
            r.free(rid) if rng.random() < 0.5 else r.prefill_done(rid, rng.randrange(500))
        exclude = {f"w{rng.randrange(7)}"} if rng.random() < 0.3 else set()
        out_tokens = rng.randrange(300)
        hashes = block_hash_list(tokens, BS)
        inp = RouteInput(f"q{step}", token_ids=tokens, exclude=list(exclude), expected_output_tokens=out_tokens)
        try:
            ref = _reference_choices(r, hashes, exclude, out_tokens)
        except AllBusy:
            with pytest.raises(AllBusy):
                r.route(inp)
            continue
        res = r.route(inp)
        best = min(c.total for c in ref)
        by_key = {c.key: c for c in ref}
        got = by_key[(res.instance_id, res.dp_rank)]
        assert got.total == pytest.approx(best) and res.total_cost == pytest.approx(best)
        assert (res.overlap_blocks, res.prefill_cost, res.decode_cost) == (
            got.overlap,
            pytest.approx(got.prefill_cost),
            got.decode_cost,
        )
        assert res.address == f"h:{res.instance_id[1:]}"


def test_vectorised_softmax_samples_every_allowed_rank_and_prefers_cheap() -> None:
    r = make_router(3, temperature=0.5)
    tokens = list(range(8 * BS))
    r.indexer.store(("w1", 0), block_hash_list(tokens, BS))
    got = Counter(r.route(RouteInput(f"q{i}", token_ids=tokens, dry_run=True)).instance_id for i in range(600))
    assert set(got) == {"w0", "w1", "w2"} and got["w1"] > got["w0"] and got["w1"] > got["w2"]
    got = Counter(
        r.route(RouteInput(f"x{i}", token_ids=tokens, exclude=["w1"], dry_run=True)).instance_id for i in range(200)
    )
    assert set(got) == {"w0", "w2"}
