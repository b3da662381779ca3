"""A worker whose first Replay is not in yet ("fresh") is left out of routing while a settled worker of its role
can take the request, and routed to when it is the only one: a fresh disaggregated mesh's decode worker, or a
pool's single worker, must not turn a request into "no live worker" (seen as a start-up flake in the suite)."""

from __future__ import annotations

from typing import cast

from dynamo_grpc.discovery import Discovery
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.node import RouterNode
from dynamo_grpc.router.router import RouteInput, WorkerInfo


def node_with(*workers: tuple[str, str]) -> RouterNode:
    node = RouterNode(RouterConfig(mode="kv", model="m"), cast(Discovery, object()), "r", share_active=False)
    node.router.set_workers(
        [WorkerInfo(iid, f"127.0.0.1:{9 + i}", "m", 16, 1, 64, "", role) for i, (iid, role) in enumerate(workers)]
    )
    node.router.ready = True
    return node


def pick(node: RouterNode, phase: str) -> str:
    inp = RouteInput(request_id=f"r-{phase}", model="m", token_ids=list(range(40)), phase=phase, dry_run=True)
    return node.router.route(inp).instance_id


def test_the_only_worker_of_a_role_is_routed_to_while_its_replay_is_pending() -> None:
    node = node_with(("p", "prefill"), ("d", "decode"))
    node._fresh = {"d"}
    node.router.usable_changed()
    assert pick(node, "decode") == "d"
    assert pick(node, "prefill") == "p"


def test_a_fresh_worker_waits_while_a_settled_one_of_its_role_serves() -> None:
    node = node_with(("a", "both"), ("b", "both"))
    node._fresh = {"b"}
    node.router.usable_changed()
    assert {pick(node, "aggregated") for _ in range(5)} == {"a"}
    assert not node._routable("b")
    node._fresh = set()  # its Replay arrived
    node.router.usable_changed()
    assert node._routable("b")
