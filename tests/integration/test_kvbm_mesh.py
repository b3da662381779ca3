"""KV tiers in a real mesh: a prefix evicted from a worker's device cache comes back from host memory.

Two mocker workers whose device cache (12 blocks of 64 tokens) holds one 640-token prompt, each
with a G2 host pool and a G3 directory. Prompt P lands on a worker; prompts that share only P's
first block follow it there and push P's other blocks out of its device cache into host memory
(the worker's events say removed-from-device + stored-in-host). P again: the router still sends it
to that worker (host blocks earn 0.75 of a device block, the other worker has nothing) and the
worker onboards the prefix instead of recomputing it: the response reports the cached tokens and
the worker's /metrics count host hits.
"""

from __future__ import annotations

import asyncio
import json
import struct
import urllib.request
from pathlib import Path

import grpc
import pytest

from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.consul_http import passing_instances
from dynamo_grpc.launch.mesh import Mesh, MeshConfig
from dynamo_grpc.transport.addresses import METRICS_META

pytestmark = pytest.mark.slow

BLOCK = 64


def _request(model: str, ids: list[int]) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="input_ids", datatype="INT32", shape=[len(ids)])
    req.raw_input_contents.append(struct.pack(f"<{len(ids)}i", *ids))
    sp = json.dumps({"max_tokens": 2, "ignore_eos": True}).encode()
    req.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(struct.pack("<I", len(sp)) + sp)
    return req


def _tokens(seed: int, n: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 40_000 + 100 for i in range(n)]


def _metric(text: str, name: str, tier: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'tier="{tier}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{tier={tier}}} not in /metrics")


def test_an_evicted_prefix_is_routed_back_and_onboarded_from_host(tmp_path: Path) -> None:
    cfg = MeshConfig(
        workers=2,
        speedup_ratio=1000.0,
        router_mode="kv",
        ready_timeout_s=90.0,
        worker_args=[
            "--num-gpu-blocks", "12", "--metrics-port", "0",
            "--kv-host-mib", "256", "--kv-disk-dir", str(tmp_path / "g3"), "--kv-disk-mib", "1024",
        ],
    )  # fmt: skip
    p = _tokens(1, 10 * BLOCK)
    with Mesh(cfg) as mesh:
        model = mesh.models[0]

        async def go() -> tuple[str, list[str], pb.ModelInferResponse]:
            async with grpc.aio.insecure_channel(mesh.frontend_grpc) as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                first = await stub.ModelInfer(_request(model, p), timeout=30)
                home = first.parameters["worker_id"].string_param
                await asyncio.sleep(1.0)  # P's stored events reach the router
                followers = []
                for k in range(2):  # share P's first block only: they follow P, and evict its tail
                    q = [*p[:BLOCK], *_tokens(50 + k, 9 * BLOCK)]
                    r = await stub.ModelInfer(_request(model, q), timeout=30)
                    followers.append(r.parameters["worker_id"].string_param)
                await asyncio.sleep(1.0)  # the offload events reach the router
                again = await stub.ModelInfer(_request(model, p), timeout=30)
                return home, followers, again

        home, followers, again = asyncio.run(go())
        assert followers == [home, home]
        assert again.parameters["worker_id"].string_param == home
        # P's first block may still be on the device; the rest came back from host memory
        assert again.parameters["cached_tokens"].int64_param == 9 * BLOCK
        workers = passing_instances(mesh.consul, "dynamo-worker", token=mesh.consul_token)
        meta = {e["Service"]["ID"]: e["Service"]["Meta"] for e in workers}  # the service ID is the instance id
        address = meta[home][METRICS_META]
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert _metric(text, "dynamo_worker_kvbm_hit_tokens_total", "host") >= 8 * BLOCK
        assert _metric(text, "dynamo_worker_kvbm_offload_blocks_total", "host") >= 9
