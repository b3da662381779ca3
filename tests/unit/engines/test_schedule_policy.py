"""The engine core's admission order (``--schedule-policy``): fcfs against lpm on the same requests.

lpm admits the waiting request with the longest cached prefix first (SGLang's policy), so the blocks a
finished request frees go to the request that reuses the cache, where fcfs would hand them to an older cold
prompt and evict the prefix: the difference a user sees is the cached tokens. The age cap gives an old
request its turn back, host-tier hits rank below device hits, and a long queue falls back to arrival order.
Run over both executors (the mocker's simulator and the torch runner on a tiny Llama).
"""

from __future__ import annotations

import argparse
from collections import deque
from pathlib import Path

import pytest

from dynamo_grpc.engines.base import EngineRequest, SamplingParams
from dynamo_grpc.engines.core import CoreConfig, EngineCore, SchedulerConfig
from dynamo_grpc.engines.core.admission import lpm_order
from dynamo_grpc.engines.core.flags import add_schedule_flags, schedule_policy_from_args
from dynamo_grpc.engines.core.request import Request, Status
from dynamo_grpc.envflags import env_defaults
from dynamo_grpc.kvbm import KvbmConfig

from .conftest import VOCAB, MakeCore, _executor

BS = 4


def _tokens(seed: int, n: int) -> list[int]:
    return [2 + (seed * 37 + 5 * k) % (VOCAB - 2) for k in range(n)]


W = _tokens(1, 16)  # 4 full blocks, cached once it ran


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _add(core: EngineCore, rid: str, tokens: list[int], max_tokens: int) -> Request:
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    req = core.make_request(EngineRequest(rid, tokens, sp))
    core.add(req)
    return req


def _step(core: EngineCore) -> None:
    res = core.step()
    assert not res.failures, res.failures


def _freed_blocks_scenario(core: EngineCore, clock: Clock, wait_s: float = 0.0) -> tuple[Request, Request]:
    """16 blocks. W ran (its 4 blocks cached, free); R holds the other 12. C (cold, older) and W2 (= W + 4
    tokens) arrive and cannot fit; R finishes and frees its 12 blocks: both fit now, and the first admitted
    takes the free queue's head, which holds W's cached blocks."""
    core.scheduler.clock = clock
    _add(core, "w", W, 1)
    for _ in range(3):
        _step(core)
    assert not core.has_work() and core.kv.pool.num_cached == 4
    r = _add(core, "r", _tokens(9, 47), 2)  # 12 blocks; its 48th token fits in them
    _step(core)  # R prefilled: 4 blocks free, W's cached ones
    c = _add(core, "c", _tokens(3, 20), 2)
    clock.now += 0.5
    w2 = _add(core, "w2", [*W, *_tokens(4, 4)], 2)
    clock.now += wait_s
    _step(core)  # R decodes its last token and finishes; C and W2 need 5 blocks each, 4 are free
    assert r.status is Status.FINISHED and c.status is Status.WAITING and w2.status is Status.WAITING
    _step(core)  # both admitted
    assert c.status is Status.RUNNING and w2.status is Status.RUNNING
    return c, w2


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_freed_blocks_go_to_the_request_with_the_longest_cached_prefix(make_core: MakeCore, policy: str) -> None:
    core = make_core(num_blocks=16, budget=64)
    core.scheduler.config.policy = policy
    c, w2 = _freed_blocks_scenario(core, Clock())
    first = core.scheduler.running[0]
    if policy == "lpm":
        assert first is w2 and w2.num_cached_tokens == 16  # W's 4 blocks reused
        assert core.scheduler.num_overtaken == 1 and core.scheduler.num_aged == 0
    else:
        assert first is c and w2.num_cached_tokens == 0  # C, older, took the free queue's head: W's blocks
        assert core.scheduler.num_overtaken == 0
    assert c.num_cached_tokens == 0


def test_past_the_age_cap_the_oldest_goes_first(make_core: MakeCore) -> None:
    core = make_core(num_blocks=16, budget=64)
    cfg = core.scheduler.config
    cfg.policy, cfg.age_cap_s = "lpm", 5.0
    c, w2 = _freed_blocks_scenario(core, Clock(), wait_s=5.0)  # C has waited 5.5 s, W2 5 s: both aged
    assert core.scheduler.running[0] is c and w2.num_cached_tokens == 0  # arrival order, as fcfs
    assert core.scheduler.num_aged == 2 and core.scheduler.num_overtaken == 0


def _req(rid: str, arrival: float, status: Status = Status.WAITING) -> Request:
    r = Request(rid, [2, 3, 4])
    r.arrival_s, r.status = arrival, status
    return r


def test_waiting_queue_order() -> None:
    """Longest credit first, arrival breaking ties; preempted requests keep the front; past the cap the aged
    go first by arrival; a queue longer than max_sorted keeps arrival order (SGLang's fallback)."""
    credit = {"cold-old": 0.0, "warm": 3.0, "host": 2.25, "cold-new": 0.0, "warm-tie": 3.0, "pre": 0.0}
    reqs = deque(
        [
            _req("pre", 5.0, Status.PREEMPTED),
            _req("cold-old", 0.0),
            _req("warm", 2.0),
            _req("host", 1.0),
            _req("cold-new", 3.0),
            _req("warm-tie", 4.0),
        ]
    )

    def order(now: float, cap: float, max_sorted: int = 128) -> list[str]:
        o = lpm_order(reqs, lambda r: credit[r.request_id], now, cap, max_sorted)
        return [r.request_id for r in o.queue]

    assert order(now=5.0, cap=10.0) == ["pre", "warm", "warm-tie", "host", "cold-old", "cold-new"]
    assert order(now=11.5, cap=10.0) == ["pre", "cold-old", "host", "warm", "warm-tie", "cold-new"]
    assert order(now=11.5, cap=0.0) == ["pre", "warm", "warm-tie", "host", "cold-old", "cold-new"]  # no cap
    assert order(now=5.0, cap=10.0, max_sorted=5) == ["pre", "cold-old", "host", "warm", "cold-new", "warm-tie"]


def test_a_host_tier_prefix_counts_at_its_weight(request: pytest.FixtureRequest) -> None:
    """W's blocks in G2 earn 0.75 each, on the device 1.0: a host copy ranks between a device hit and nothing."""
    cfg = CoreConfig(
        block_size=BS,
        num_blocks=8,
        context_length=256,
        vocab_size=VOCAB,
        scheduler=SchedulerConfig(8, 64, 0.0, policy="lpm"),
        kvbm=KvbmConfig(host_bytes=16 << 20),  # 32 mocker blocks of 512 KiB
    )
    core = EngineCore(cfg, _executor("mocker", request, 8, BS))
    probe = core.make_request(EngineRequest("p", [*W, 7], SamplingParams()))
    assert core.kv.prefix_credit(probe, 0.75, 0.25) == 0.0
    _add(core, "w", W, 1)
    while core.has_work():
        _step(core)
    assert core.kv.prefix_credit(probe, 0.75, 0.25) == 4.0  # on the device
    for seed in (5, 6):  # two cold prompts take every device block: W's go to host memory
        _add(core, f"x{seed}", _tokens(seed, 28), 1)
        while core.has_work():
            _step(core)
    assert core.kv.pool.longest_prefix(probe.block_hashes) == []
    assert core.kv.prefix_credit(probe, 0.75, 0.25) == 3.0  # 4 blocks in G2 at 0.75
    assert core.kv.prefix_credit(probe, 0.5, 0.25) == 2.0


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--engine", default="mocker")
    add_schedule_flags(p)
    return env_defaults(p).parse_args(list(argv))


def test_flags_and_their_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    assert schedule_policy_from_args(_parse()).policy == "fcfs"
    sp = schedule_policy_from_args(_parse("--schedule-policy", "lpm", "--schedule-age-cap-secs", "2.5"))
    assert (sp.policy, sp.age_cap_s) == ("lpm", 2.5)
    assert schedule_policy_from_args(_parse("--schedule-policy", "lpm")).age_cap_s == SchedulerConfig.age_cap_s
    with pytest.raises(ValueError, match="--schedule-age-cap-secs 2: only read with --schedule-policy lpm"):
        schedule_policy_from_args(_parse("--schedule-age-cap-secs", "2"))
    with pytest.raises(ValueError, match="--schedule-age-cap-secs must be >= 0"):
        schedule_policy_from_args(_parse("--schedule-policy", "lpm", "--schedule-age-cap-secs", "-1"))
    with pytest.raises(ValueError, match="--schedule-policy lpm: not supported with --engine trtllm"):
        schedule_policy_from_args(_parse("--engine", "trtllm", "--schedule-policy", "lpm"))
    with pytest.raises(SystemExit):
        _parse("--schedule-policy", "sjf")
    with pytest.raises(ValueError, match="policy must be one of fcfs, lpm"):
        SchedulerConfig(policy="sjf").validate()
    monkeypatch.setenv("DYN_SCHEDULE_POLICY", "lpm")
    monkeypatch.setenv("DYN_SCHEDULE_AGE_CAP_SECS", "7")
    sp = schedule_policy_from_args(_parse())
    assert (sp.policy, sp.age_cap_s) == ("lpm", 7.0)


def test_the_worker_builds_its_engine_with_the_policy(tmp_path: Path) -> None:
    """`dynamo-grpc worker --schedule-policy lpm` reaches the mocker's scheduler."""
    from dynamo_grpc.worker.main import build_engine, build_parser

    args = build_parser().parse_args(["--schedule-policy", "lpm", "--schedule-age-cap-secs", "3", "--no-consul"])
    engine, _, _ = build_engine(args)
    sched = engine.core.scheduler  # type: ignore[attr-defined]
    assert (sched.config.policy, sched.config.age_cap_s) == ("lpm", 3.0)
