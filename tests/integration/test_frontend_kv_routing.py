"""KV-aware routing seen from a KServe client, with the router in the frontend and as its own service.

Three mocker workers. A long prompt lands on some worker; once that worker's KV events are in,
follow-up requests that share the prompt's prefix go to the same worker (the response's `worker_id`),
while unrelated long prompts are spread by load. Both `--router-mode kv` (in-process index) and
`kv-service` (a `dynamo-router` process) must behave the same way.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections import Counter

import grpc
import pytest

from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.mesh import Mesh, MeshConfig
from tests.helpers.token_requests import prompt, token_request

pytestmark = pytest.mark.slow


async def worker_of(stub: pb_grpc.GRPCInferenceServiceStub, model: str, ids: list[int]) -> str:
    resp = await stub.ModelInfer(token_request(model, ids), timeout=30)
    return resp.parameters["worker_id"].string_param


@pytest.mark.parametrize("mode", ["kv", "kv-service"])
def test_shared_prefix_follows_its_worker(mode: str) -> None:
    cfg = MeshConfig(workers=3, speedup_ratio=1000.0, router_mode=mode, ready_timeout_s=90.0)
    with Mesh(cfg) as mesh:
        assert bool(mesh.router_grpc) == (mode == "kv-service")
        model = mesh.models[0]

        async def go() -> None:
            async with grpc.aio.insecure_channel(mesh.frontend_grpc) as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                base = prompt(1, 640)
                home = await worker_of(stub, model, base)
                assert home
                await asyncio.sleep(1.0)  # the worker's store events reach the index
                for k in range(6):
                    follower = await worker_of(stub, model, [*base, 5, 6, 7 + k])
                    assert follower == home, f"request {k} sharing 10 cached blocks went to {follower}, not {home}"
                # unrelated prompts at once: the load term spreads them
                spread = await asyncio.gather(*(worker_of(stub, model, prompt(100 + s, 640)) for s in range(9)))
                assert len(Counter(spread)) >= 2, spread

        asyncio.run(go())


@pytest.mark.parametrize(
    ("mode", "flags"),
    [("round-robin", ["--router-seed", "1"]), ("kv", ["--no-router-kv-events", "--router-ttl-secs", "60"])],
    ids=["round-robin", "approx"],
)
def test_embedded_router_honours_the_router_flags(mode: str, flags: list[str]) -> None:
    """The frontend's router takes `dynamo-grpc router`'s flags: round-robin cycles, approx needs no events."""
    cfg = MeshConfig(
        workers=3, speedup_ratio=1000.0, router_mode=mode, frontend_args=flags, http_port=0, ready_timeout_s=90.0
    )
    with Mesh(cfg) as mesh:
        assert not mesh.router_grpc
        model = mesh.models[0]
        # the mesh is ready with one usable worker; a worker is usable once its card is in KV and trusted
        deadline = time.monotonic() + 30
        live = f'dynamo_frontend_live_workers{{model="{model}"}} 3.0'
        while live not in urllib.request.urlopen(f"http://{mesh.frontend_http}/metrics", timeout=10).read().decode():
            assert time.monotonic() < deadline, "3 workers not live in the frontend"
            time.sleep(0.1)

        async def go() -> list[str]:
            async with grpc.aio.insecure_channel(mesh.frontend_grpc) as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                base = prompt(3, 640)
                return [await worker_of(stub, model, [*base, 9, k]) for k in range(6)]

        got = asyncio.run(go())
        with urllib.request.urlopen(f"http://{mesh.frontend_http}/metrics", timeout=10) as r:
            metrics = r.read().decode()
        internal = "approx" if mode == "kv" else mode
        assert f'dynamo_router_decisions_total{{mode="{internal}",model="{model}"}} 6.0' in metrics
        assert "dynamo_router_events_applied_total{" not in metrics  # neither mode follows KV events
        if mode == "round-robin":  # the same prompt, yet every worker in turn
            assert got[:3] == got[3:] and len(set(got)) == 3, got
        else:  # no KV events are read: what was routed is assumed cached, so the prefix stays home
            assert len(set(got)) == 1, got
