"""The soak benchmark's code path at CI size: 300 streamed requests (KServe + OpenAI) with client cancels,
deadlines and a worker kill -9 midway on a real mocker mesh; every request ends with a full answer or a
clear status, and every gauge is back to its idle value afterwards (one run shared by the tests)."""

from __future__ import annotations

from typing import Any

import pytest

from dynamo_grpc.bench.soak import soak

pytestmark = pytest.mark.slow

ACTIVE = "dynamo_router_active_sequences"


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    # polled until idle; up to 40 s because a departed worker's channel may wait out its 30 s drop grace
    # for a call still on it (frontend/engine_client.ChannelPool.drop) before its fd closes
    return soak(300, concurrency=16, settle_s=40.0)


def test_every_request_ends_with_an_answer_or_a_status(result: dict[str, Any]) -> None:
    outcomes = result["outcomes"]
    assert result["broken"] == 0, result["examples"]
    assert sum(outcomes.values()) == 300
    assert outcomes.get("kserve:complete", 0) + outcomes.get("openai:complete", 0) > 150
    assert outcomes.get("kserve:client_cancel", 0) + outcomes.get("openai:client_cancel", 0) > 0
    assert outcomes.get("kserve:deadline", 0) + outcomes.get("openai:deadline", 0) > 0


def test_workers_and_frontend_process_are_back_to_idle(result: dict[str, Any]) -> None:
    """KV blocks in use, in-flight streams, asyncio tasks and fds exactly back; RSS within 10 %."""
    assert [leak for leak in result["leaks"] if ACTIVE not in leak] == [], result["table"]
    assert len(result["idle"]) == 3  # the frontend and the two workers that lived through the run


def test_router_active_sequences_are_back_to_idle(result: dict[str, Any]) -> None:
    assert [leak for leak in result["leaks"] if ACTIVE in leak] == [], result["table"]
