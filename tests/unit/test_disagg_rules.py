"""The disaggregation rules alone: roles per phase, the frontend's remote/local decision, phase-aware routing."""

from __future__ import annotations

import pytest

from dynamo_grpc.discovery.worker_roles import role_of, roles_for
from dynamo_grpc.frontend.disagg import DisaggConfig, decide
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.router import NoWorkers, RouteInput, Router, WorkerInfo


def test_a_registration_says_its_role_by_tag() -> None:
    assert role_of(["namespace=dynamo", "role=prefill"]) == "prefill"
    assert role_of([], {"role": "decode"}) == "decode"
    assert role_of(["role=worker"]) == "both"  # the old tag, or none: aggregated
    assert role_of(None) == "both"


@pytest.mark.parametrize(
    ("phase", "present", "want"),
    [
        ("prefill", {"prefill", "decode"}, {"prefill"}),
        ("decode", {"prefill", "decode"}, {"decode"}),
        ("aggregated", {"both", "decode"}, {"both"}),
        ("aggregated", {"prefill", "decode"}, {"decode"}),  # decode workers prefill locally
        ("decode", {"both"}, {"both"}),
        ("prefill", {"decode"}, set()),
    ],
)
def test_each_phase_goes_to_its_pool_then_to_who_can_do_it(phase: str, present: set[str], want: set[str]) -> None:
    assert roles_for(phase, present) == want


def test_an_unknown_phase_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="phase must be one of aggregated, prefill, decode, got 'mixed'"):
        roles_for("mixed", {"both"})


def test_the_decision_rule() -> None:
    cfg = DisaggConfig(max_local_prefill_tokens=512, prefill_queue_threshold=8192)
    assert decide(512, 0, cfg).reason == "short"  # at the limit: local
    assert decide(513, 0, cfg).remote
    assert decide(4000, 8192, cfg).reason == "prefill_queue_full"
    assert decide(4000, 8191, cfg).remote
    everything = DisaggConfig(max_local_prefill_tokens=0)
    assert decide(1, 0, everything).remote  # --max-local-prefill-tokens 0: every prompt goes remote
    with pytest.raises(ValueError, match="--prefill-queue-threshold"):
        DisaggConfig(prefill_queue_threshold=0).validate()


def test_the_kv_router_picks_within_the_phase_pool() -> None:
    r = Router(RouterConfig(block_size=4, seed=1))
    r.set_workers(
        [
            WorkerInfo("p0", "a:1", "m", 4, 1, 100, role="prefill"),
            WorkerInfo("d0", "a:2", "m", 4, 1, 100, role="decode"),
            WorkerInfo("d1", "a:3", "m", 4, 1, 100, role="decode"),
        ]
    )
    r.ready = True
    picks = {r.route(RouteInput(f"r{i}", token_ids=[1, 2, 3, 4, 5], phase="decode")).instance_id for i in range(8)}
    assert picks == {"d0", "d1"}
    assert r.route(RouteInput("p", token_ids=[1, 2, 3, 4, 5], phase="prefill")).instance_id == "p0"
    with pytest.raises(NoWorkers):
        r.route(RouteInput("q", token_ids=[1, 2], phase="prefill", exclude=["p0"]))
