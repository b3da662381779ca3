"""What readers of the discovery plane accept (discovery/validate.py) and the one worker view
(discovery/usable.py) the registry and the router share."""

from __future__ import annotations

import pytest

from dynamo_grpc.discovery.usable import WorkerView
from dynamo_grpc.discovery.validate import (
    InvalidRegistration,
    RegistrationFilter,
    card_problem,
    check_registration,
    seal_card,
)
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.router import NoWorkers, RouteInput, Router, WorkerInfo

GOOD = {"grpc_address": "127.0.0.1:5001", "zmq_endpoint": "tcp://127.0.0.1:5002", "dp_size": "2",
        "block_size": "16", "kv_blocks": "1024", "model": "m"}  # fmt: skip


def test_a_worker_registration_passes() -> None:
    check_registration("w1", 5001, GOOD)
    check_registration("w2", 5001, {**GOOD, "grpc_address": "[::1]:5001", "zmq_endpoint": "ipc:///tmp/x"})


@pytest.mark.parametrize(
    ("iid", "port", "meta", "field"),
    [
        ("w", 1, {**GOOD, "dp_size": "2000000"}, "dp_size"),
        ("w", 1, {**GOOD, "dp_size": "0"}, "dp_size"),
        ("w", 1, {**GOOD, "dp_size": "lots"}, "dp_size"),
        ("w", 1, {**GOOD, "block_size": "1048576"}, "block_size"),
        ("w", 1, {**GOOD, "kv_blocks": "-1"}, "kv_blocks"),
        ("w", 1, {**GOOD, "grpc_address": "127.0.0.1:70000"}, "grpc_address"),
        ("w", 1, {**GOOD, "grpc_address": "no-port"}, "grpc_address"),
        ("w", 1, {**GOOD, "grpc_address": "bad host!:1"}, "grpc_address"),
        ("w", 1, {**GOOD, "zmq_endpoint": "http://x:1"}, "zmq_endpoint"),
        ("w", 1, {**GOOD, "zmq_endpoint": "tcp://x:0"}, "zmq_endpoint"),
        ("w", 1, {**GOOD, **{f"k{i}": "v" for i in range(70)}}, "Meta"),
        ("w", 1, {**GOOD, "x": "v" * 600}, "Meta[x]"),
        ("a/b", 1, GOOD, "ID"),
        ("w" * 300, 1, GOOD, "ID"),
        ("w", 70000, GOOD, "Port"),
    ],
)
def test_out_of_bounds_registrations_name_the_field(iid: str, port: int, meta: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidRegistration) as err:
        check_registration(iid, port, meta)
    assert err.value.field == field
    assert f"skipped: {field}:" in str(err.value)


class _Inst:
    def __init__(self, iid: str, meta: dict[str, str]) -> None:
        self.instance_id, self.port, self.meta = iid, 5001, meta


def test_filter_keeps_the_good_and_counts_each_bad_once() -> None:
    f = RegistrationFilter()
    snap = [_Inst("ok", GOOD), _Inst("rogue", {**GOOD, "dp_size": "2000000"})]
    assert [i.instance_id for i in f.valid(snap)] == ["ok"]
    assert [i.instance_id for i in f.valid(snap)] == ["ok"]
    assert f.skipped_total == 1 and list(f.reasons) == ["rogue"]
    assert [i.instance_id for i in f.valid(snap[:1])] == ["ok"] and f.reasons == {}


def test_a_card_is_trusted_only_sealed_and_held_by_the_registrations_session() -> None:
    card = seal_card({"name": "m", "block_size": 16})
    meta = {"card_session": "s1"}
    assert card_problem({**card, "_kv_session": "s1"}, meta) is None
    assert card_problem(card, None) is None
    assert "checksum" in str(card_problem({**card, "block_size": 32, "_kv_session": "s1"}, meta))
    assert "checksum" in str(card_problem({"name": "m", "block_size": 16}, meta))  # a plain PUT: no checksum
    assert "session s1" in str(card_problem({**card, "_kv_session": "s2"}, meta))
    assert "session s1" in str(card_problem({**card, "_kv_session": ""}, meta))  # written without a session
    assert "names no card_session" in str(card_problem({**card, "_kv_session": "s1"}, {}))


def test_a_worker_skipped_by_one_source_is_skipped_by_the_router_until_every_source_clears_it() -> None:
    view = WorkerView()
    r = Router(RouterConfig(mode="round-robin", block_size=16))
    r.ready = True
    r.usable = view.usable
    view.on_change(r.usable_changed)
    r.set_workers([WorkerInfo("a", "127.0.0.1:1"), WorkerInfo("b", "127.0.0.1:2")])
    route = lambda i: r.route(RouteInput(f"r{i}", token_ids=[1] * 16, dry_run=True)).instance_id  # noqa: E731
    assert {route(i) for i in range(4)} == {"a", "b"}
    view.skip("b", "events", "no Replay")
    view.skip("b", "card", "checksum")
    assert {route(i) for i in range(4)} == {"a"}
    view.clear("b", "events")
    assert {route(i) for i in range(4)} == {"a"}  # the card source still says no
    view.skip("a", "registration", "dp_size")
    with pytest.raises(NoWorkers):
        route(0)
    view.clear("b", "card")
    view.retain("registration", set())  # "a" left the snapshot: its skip is forgotten
    assert {route(i) for i in range(4)} == {"a", "b"}
    assert view.skips_total == {"events": 1, "card": 1, "registration": 1}
