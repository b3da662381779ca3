"""The global router with real processes: consul-dev, mocker workers in pools, `dynamo-grpc global-router`, and a
frontend that finds it in Consul (`--router-mode kv-service`, no special mode).

Pools by prompt length: `short` [0,128) tokens (one worker), `long` [128,∞) (two workers), and a `xl` worker that
no pool uses until a reload adds it. One mesh for the module; the tests run in file order (the reload is last).
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.consul_http import passing_instances
from dynamo_grpc.launch.mesh import Mesh, MeshConfig
from dynamo_grpc.transport.addresses import METRICS_META
from dynamo_grpc.v1 import router_pb2, router_pb2_grpc
from tests.helpers.token_requests import prompt, token_request

pytestmark = pytest.mark.slow

BS = 16
POOLS = """
default_pool: short
pools:
  - name: short
    input_tokens: [0, 128]
    busy_threshold: 0.5
  - name: long
    input_tokens: [128, null]
"""
RELOADED = """
default_pool: short
pools:
  - name: short
    input_tokens: [0, 128]
    busy_threshold: 0.5
  - name: xl
    input_tokens: [128, null]
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    config = tmp_path_factory.mktemp("pools") / "pools.yaml"
    config.write_text(POOLS)
    cfg = MeshConfig(
        workers=4,
        worker_pools=["short", "long", "long", "xl"],
        pools_config=config,
        router_mode="kv-service",
        speedup_ratio=2.0,  # slow enough for one request to keep the short worker busy while we look
        worker_args=["--block-size", str(BS), "--num-gpu-blocks", "40"],  # 640 tokens of KV per worker
        ready_timeout_s=120.0,
    )
    with Mesh(cfg) as m:
        yield m


def pools_of_workers(m: Mesh) -> dict[str, str]:
    out = {}
    for e in passing_instances(m.consul, "dynamo-worker", token=m.consul_token):
        svc = e["Service"]
        out[svc["ID"]] = next(t[5:] for t in svc["Tags"] if t.startswith("pool="))
    return out


def config_path(m: Mesh) -> Path:
    assert m.config.pools_config is not None
    return m.config.pools_config


def metrics(m: Mesh) -> str:
    router = passing_instances(m.consul, "dynamo-router", token=m.consul_token)[0]["Service"]
    assert "role=global-router" in router["Tags"]
    with urllib.request.urlopen(f"http://{router['Meta'][METRICS_META]}/metrics", timeout=10) as r:
        return str(r.read().decode())


def route(m: Mesh, ids: list[int], pool: str = "", rid: str = "probe") -> router_pb2.RouteResponse:
    with grpc.insecure_channel(m.router_grpc) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        resp: router_pb2.RouteResponse = stub.Route(
            router_pb2.RouteRequest(request_id=rid, model=m.models[0], token_ids=ids, pool=pool, dry_run=True),
            timeout=10,
        )
        return resp


def test_prompts_land_only_in_their_pool_and_the_cache_stays_in_it(mesh: Mesh) -> None:
    pools = pools_of_workers(mesh)
    model = mesh.models[0]
    long_prompt = prompt(1, 320)

    async def go() -> tuple[list[str], list[str]]:
        async with grpc.aio.insecure_channel(mesh.frontend_grpc) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)

            async def worker(ids: list[int]) -> str:
                resp = await stub.ModelInfer(token_request(model, ids), timeout=60)
                pool = "short" if len(ids) < 128 else "long"
                # the decision travels to the client in the final response's parameters
                reason = resp.parameters["route_reason"].string_param
                assert resp.parameters["route_pool"].string_param == pool, reason
                assert reason.startswith(f"input {len(ids)} tokens in ") and reason.endswith(f"-> pool {pool}")
                return str(resp.parameters["worker_id"].string_param)

            # two at a time: six short prompts at once would fill more than half the short worker's 40 blocks
            # (its busy threshold) on a slow box, and spill over, which the next test counts on its own
            shorts: list[str] = []
            longs: list[str] = []
            for i in range(0, 6, 2):
                shorts += await asyncio.gather(*(worker(prompt(10 + i + j, 40 + 8 * (i + j))) for j in range(2)))
            for i in range(0, 6, 2):
                longs += await asyncio.gather(*(worker(prompt(30 + i + j, 200 + 20 * (i + j))) for j in range(2)))
            longs.append(await worker(long_prompt))
            return shorts, longs

    shorts, longs = asyncio.run(go())
    assert {pools[w] for w in shorts} == {"short"}, shorts
    assert {pools[w] for w in longs} == {"long"}, longs
    # the long prompt's blocks are cached in the long pool: they draw it there, never to the short pool
    deadline = time.monotonic() + 10
    while (d := route(mesh, long_prompt)).overlap_blocks < len(long_prompt) // BS and time.monotonic() < deadline:
        time.sleep(0.1)
    assert d.pool == "long" and d.overlap_blocks == len(long_prompt) // BS
    assert d.reason == "input 320 tokens in [128,∞) -> pool long"
    pinned = route(mesh, long_prompt, pool="short")
    assert pinned.pool == "short" and pools[pinned.worker.instance_id] == "short"
    assert pinned.overlap_blocks == 0 and pinned.reason == "pinned to pool short by the request"


def test_unknown_pool_is_invalid_argument(mesh: Mesh) -> None:
    with pytest.raises(grpc.RpcError) as e:
        route(mesh, prompt(2, 20), pool="gpu-a100")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pool 'gpu-a100' is not configured (pools: short, long)" in (e.value.details() or "")


def test_busy_short_pool_spills_over_to_long(mesh: Mesh) -> None:
    pools = pools_of_workers(mesh)
    model = mesh.models[0]

    async def go() -> str:
        async with grpc.aio.insecure_channel(mesh.frontend_grpc) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            # 100 prompt tokens + 520 generated: past 320 tokens the short worker holds > 50 % of its 40 blocks
            hog = asyncio.create_task(infer(stub, token_request(model, prompt(3, 100), 520)))
            try:
                deadline = time.monotonic() + 60
                while not _above(metrics(mesh), "short", 0.5):
                    assert time.monotonic() < deadline, "the short worker never got busy"
                    assert not hog.done(), "the long request ended before the short pool got busy"
                    await asyncio.sleep(0.05)
                resp = await stub.ModelInfer(token_request(model, prompt(4, 30)), timeout=60)
                assert resp.parameters["route_pool"].string_param == "long"
                assert "spilled over to pool long" in resp.parameters["route_reason"].string_param
                return str(resp.parameters["worker_id"].string_param)
            finally:
                hog.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await hog

    spilled = asyncio.run(go())
    assert pools[spilled] == "long", spilled
    text = metrics(mesh)
    assert 'dynamo_global_router_spill_overs_out_total{pool="short"} 1.0' in text
    assert 'dynamo_global_router_spill_overs_in_total{pool="long"} 1.0' in text


async def infer(stub: pb_grpc.GRPCInferenceServiceStub, req: pb.ModelInferRequest) -> pb.ModelInferResponse:
    resp: pb.ModelInferResponse = await stub.ModelInfer(req, timeout=120)
    return resp


def _above(text: str, pool: str, threshold: float) -> bool:
    for line in text.splitlines():
        if line.startswith(f'dynamo_global_router_kv_load{{pool="{pool}"}}'):
            return float(line.split()[-1]) > threshold
    return False


def test_reload_adds_a_pool_and_drains_the_removed_one_without_a_failed_request(mesh: Mesh) -> None:
    pools = pools_of_workers(mesh)
    model = mesh.models[0]

    async def go() -> tuple[str, str]:
        async with grpc.aio.insecure_channel(mesh.frontend_grpc) as ch:
            stub = pb_grpc.GRPCInferenceServiceStub(ch)
            # in flight on the long pool while it is removed: it must finish
            in_flight = asyncio.create_task(infer(stub, token_request(model, prompt(5, 200), 200)))
            await asyncio.sleep(0.3)
            config_path(mesh).write_text(RELOADED)
            deadline = time.monotonic() + 30
            while 'dynamo_global_router_draining{pool="long"} 1.0' not in metrics(mesh):
                assert time.monotonic() < deadline, "the reload was not picked up"
                await asyncio.sleep(0.1)
            # the new pool takes requests once its worker's KV events are replayed (until then: spill-over)
            while (d := route(mesh, prompt(6, 300))).pool != "xl":
                assert time.monotonic() < deadline, f"the added pool never took a request: {d.reason}"
                await asyncio.sleep(0.1)
            assert d.reason == "input 300 tokens in [128,∞) -> pool xl"
            after = await stub.ModelInfer(token_request(model, prompt(6, 300)), timeout=60)
            first = await in_flight
            return str(first.parameters["worker_id"].string_param), str(after.parameters["worker_id"].string_param)

    first, after = asyncio.run(go())
    assert pools[first] == "long" and pools[after] == "xl"
    deadline = time.monotonic() + 30
    while 'pool="long"' in metrics(mesh):  # drained: its router is closed once its request was freed
        assert time.monotonic() < deadline, "the removed pool never drained"
        time.sleep(0.2)
