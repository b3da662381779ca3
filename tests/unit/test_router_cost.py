"""The cost's balance between pending prefill and decode load (docs/router.md, "Tail latency on traces
without reuse"): a prompt still to prefill delays the next first token; a sequence being decoded barely."""

from __future__ import annotations

import json
import logging
import random

import pytest

from dynamo_grpc.frontend.main import build_parser as frontend_parser
from dynamo_grpc.router.config import RouterConfig
from dynamo_grpc.router.flags import router_config_from_args
from dynamo_grpc.router.main import build_parser as router_parser
from dynamo_grpc.router.router import RouteInput, Router, WorkerInfo
from dynamo_grpc.tokens.block_hash import block_hash_list

BS = 64


def _router(**kw: object) -> Router:
    r = Router(RouterConfig(block_size=BS, seed=3, predicted_ttl_s=0, **kw))  # type: ignore[arg-type]
    r.set_workers([WorkerInfo(f"w{i}", f"127.0.0.1:{9000 + i}", "m", BS, 1, 16384) for i in range(2)])
    r.ready = True
    return r


def _prompt(rng: random.Random, tokens: int) -> list[int]:
    return [rng.randrange(50_000) for _ in range(tokens)]


def _place(r: Router, rid: str, tokens: list[int], on: str, prefilled: bool) -> None:
    other = "w1" if on == "w0" else "w0"
    res = r.route(RouteInput(rid, token_ids=tokens, expected_output_tokens=64, exclude=[other]))
    assert res.instance_id == on
    if prefilled:
        r.prefill_done(rid, output_tokens=1)


def _long_decode_vs_pending_prefill(r: Router) -> str:
    """w1 decodes one 4k-token request; w0 has a 1k-token prompt still to prefill. Where does a 1k prompt go?"""
    rng = random.Random(0)
    _place(r, "long", _prompt(rng, 4096), "w1", prefilled=True)
    _place(r, "queued", _prompt(rng, 1000), "w0", prefilled=False)
    return r.route(RouteInput("new", token_ids=_prompt(rng, 1000), expected_output_tokens=64)).instance_id


def test_a_request_does_not_queue_behind_a_prefill_to_avoid_a_decoding_worker() -> None:
    assert _long_decode_vs_pending_prefill(_router()) == "w1"
    # the old default weighed the 66 decode blocks of the long sequence above 16 blocks of queued prefill
    assert _long_decode_vs_pending_prefill(_router(prefill_load_scale=2.0)) == "w0"


def test_with_no_prefill_pending_anywhere_decode_load_decides() -> None:
    r = _router()
    rng = random.Random(1)
    _place(r, "short", _prompt(rng, 500), "w0", prefilled=True)
    _place(r, "long", _prompt(rng, 4096), "w1", prefilled=True)
    assert r.route(RouteInput("new", token_ids=_prompt(rng, 1000), expected_output_tokens=64)).instance_id == "w0"
    # once the short one ends and the new one is decoding there too, w0 still holds less
    r.free("short")
    r.prefill_done("new", output_tokens=1)
    assert r.route(RouteInput("next", token_ids=_prompt(rng, 1000), expected_output_tokens=64)).instance_id == "w0"


def test_a_cached_prefix_is_still_worth_a_short_queue() -> None:
    """Waiting behind 16 blocks of prefill to skip 50 is the faster first token: the cache still wins."""
    r = _router()
    rng = random.Random(2)
    doc = _prompt(rng, 50 * BS)
    r.indexer.store(("w0", 0), block_hash_list(doc, BS))
    _place(r, "queued", _prompt(rng, 1000), "w0", prefilled=False)
    res = r.route(RouteInput("follow", token_ids=[*doc, *_prompt(rng, 2 * BS)], expected_output_tokens=64))
    assert (res.instance_id, res.overlap_blocks) == ("w0", 50)
    # but not a queue longer than what the cache saves: 3 such prompts pending (48 blocks) + this one's 2 new
    # blocks against 52 to prefill on the idle worker is close; 4 (64 blocks) is not
    _place(r, "q2", _prompt(rng, 1000), "w0", prefilled=False)
    _place(r, "q3", _prompt(rng, 1000), "w0", prefilled=False)
    _place(r, "q4", _prompt(rng, 1000), "w0", prefilled=False)
    res = r.route(RouteInput("late", token_ids=[*doc, *_prompt(rng, 2 * BS)], expected_output_tokens=64))
    assert res.instance_id == "w1"


@pytest.mark.parametrize("parser", [router_parser, frontend_parser], ids=["router", "frontend"])
def test_the_router_service_and_the_embedded_router_share_the_default(parser) -> None:  # type: ignore[no-untyped-def]
    assert router_config_from_args(parser().parse_args([])).prefill_load_scale == 8.0


def test_each_decision_is_logged_with_what_the_router_believed(caplog: pytest.LogCaptureFixture) -> None:
    r = _router()
    rng = random.Random(4)
    _place(r, "queued", _prompt(rng, 1000), "w0", prefilled=False)
    with caplog.at_level(logging.DEBUG, logger="dynamo_grpc.router.decisions"):
        res = r.route(RouteInput("new", token_ids=_prompt(rng, 1000), expected_output_tokens=64))
        r.prefill_done("new")
    lines = [json.loads(rec.getMessage()) for rec in caplog.records if rec.name == "dynamo_grpc.router.decisions"]
    assert lines[0]["rid"] == "new" and lines[0]["chosen"] == f"{res.instance_id}/0" == "w1/0"
    assert lines[0]["ranks"] == {"w0/0": [15.0, 16.0, 0.0], "w1/0": [0.0, 0.0, 0.0]}  # prefill, decode, reported
    assert lines[1] == {"rid": "new", "t": lines[1]["t"], "prefill_done": True}
