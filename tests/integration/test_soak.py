"""The soak benchmark's code path at CI size: 300 streamed requests (KServe + OpenAI) with client cancels,
deadlines and a worker kill -9 midway on a real mocker mesh; every request ends with a full answer or a
clear status, and every gauge is back to its idle value afterwards."""

from __future__ import annotations

import pytest

from dynamo_grpc.bench.soak import soak

pytestmark = pytest.mark.slow


@pytest.mark.xfail(
    strict=True,
    reason="known leak (frontend/openai/app.py, not this branch): a streamed OpenAI request whose client goes "
    "away leaves pipeline.generate() unclosed, so its route stays in the embedded router's active sequences "
    "(dynamo_router_active_sequences 0 -> 6 per 80 OpenAI cancels; KServe cancels leak nothing)",
)
def test_soak_ends_every_request_and_leaks_nothing() -> None:
    res = soak(300, concurrency=16, settle_s=15.0)
    outcomes = res["outcomes"]
    assert res["broken"] == 0, res["examples"]
    assert sum(outcomes.values()) == 300
    assert outcomes.get("kserve:complete", 0) + outcomes.get("openai:complete", 0) > 150
    assert outcomes.get("kserve:client_cancel", 0) + outcomes.get("openai:client_cancel", 0) > 0
    assert outcomes.get("kserve:deadline", 0) + outcomes.get("openai:deadline", 0) > 0
    assert res["leaks"] == [], res["table"]
