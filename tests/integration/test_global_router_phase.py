"""The phase inside a pool, with real processes: consul-dev, a pool of one `role=prefill` and one `role=decode`
mocker worker, `dynamo-grpc global-router`, and a disaggregating frontend (`--max-local-prefill-tokens 0`) that
finds it in Consul.

The global router picks the pool by the grid, then passes `RouteRequest.phase` to the pool's router: a prefill
lands on the pool's prefill worker and a decode on its decode worker (before, the pool routed every phase as
aggregated, so the frontend's prefill went to the decode worker).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest

from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.consul_http import passing_instances
from dynamo_grpc.launch.mesh import Mesh, MeshConfig
from dynamo_grpc.v1 import router_pb2, router_pb2_grpc
from tests.helpers.token_requests import prompt, token_request

pytestmark = pytest.mark.slow

POOLS = """
default_pool: main
pools:
  - name: main
    input_tokens: [0, null]
    context_tokens: [0, null]
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    config = tmp_path_factory.mktemp("pools") / "pools.yaml"
    config.write_text(POOLS)
    cfg = MeshConfig(
        workers=2,
        worker_pools=["main", "main"],
        worker_roles=["prefill", "decode"],
        pools_config=config,
        router_mode="kv-service",
        speedup_ratio=1000.0,  # timing does not matter here
        worker_args=["--block-size", "16", "--num-gpu-blocks", "512"],
        frontend_args=["--max-local-prefill-tokens", "0"],  # every request disaggregated
        ready_timeout_s=180.0,
    )
    with Mesh(cfg) as m:
        yield m


def roles_of_workers(m: Mesh) -> dict[str, str]:
    """Consul service ID -> the worker's role tag (the global router's workers are these IDs)."""
    out = {}
    for e in passing_instances(m.consul, "dynamo-worker", token=m.consul_token):
        svc = e["Service"]
        out[svc["ID"]] = next(t[5:] for t in svc["Tags"] if t.startswith("role="))
    return out


def test_route_requests_of_each_phase_land_on_the_workers_of_that_role(mesh: Mesh) -> None:
    roles = roles_of_workers(mesh)
    assert sorted(roles.values()) == ["decode", "prefill"]
    with grpc.insecure_channel(mesh.router_grpc) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        for phase, role in [
            (router_pb2.ROUTE_PHASE_PREFILL, "prefill"),
            (router_pb2.ROUTE_PHASE_DECODE, "decode"),
            (router_pb2.ROUTE_PHASE_UNSPECIFIED, "decode"),  # aggregated: no `both` worker, decode serves it
        ]:
            for seed in range(4):
                resp = stub.Route(
                    router_pb2.RouteRequest(
                        request_id=f"p{phase}-{seed}",
                        model=mesh.models[0],
                        token_ids=prompt(seed, 40 + 50 * seed),
                        phase=phase,
                        dry_run=True,
                    ),
                    timeout=10,
                )
                assert resp.pool == "main"
                assert roles[resp.worker.instance_id] == role, (phase, resp.reason)


def test_a_disaggregated_frontend_prefills_on_the_pools_prefill_worker(mesh: Mesh) -> None:
    roles = roles_of_workers(mesh)
    model = mesh.models[0]

    async def go() -> list[pb.ModelInferResponse]:
        async with grpc.aio.insecure_channel(mesh.frontend_grpc) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            return [await stub.ModelInfer(token_request(model, prompt(s, 100 + 40 * s)), timeout=60) for s in range(4)]

    for resp in asyncio.run(go()):
        assert resp.parameters["disaggregated"].bool_param
        assert roles[resp.parameters["prefill_worker_id"].string_param] == "prefill"
        assert roles[resp.parameters["worker_id"].string_param] == "decode"
        assert resp.parameters["route_pool"].string_param == "main"
