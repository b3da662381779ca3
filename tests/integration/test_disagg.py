"""Disaggregated serving end to end: 1 prefill + 1 decode worker, a frontend, KServe clients.

Real processes on loopback. With ``--max-local-prefill-tokens 0`` every prompt is prefilled on the
prefill worker and its KV pulled by the decode worker; the final response says so
(``disaggregated``, ``prefill_worker_id``). The same prompts served after the prefill worker is
killed (the frontend falls back to prefilling on the decode worker) give the same text: the handoff
changes where the work runs, not what the client gets. Leases and blocks are read back from
/metrics on both workers. The mocker mesh covers the protocol and the faults; the torch mesh (slow
part: the real SmolLM2-135M) proves the real KV bytes continue greedy and seeded sampling exactly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest

from dynamo_grpc.kserve.v2 import grpc_service_pb2 as pb
from dynamo_grpc.kserve.v2 import grpc_service_pb2_grpc as pb_grpc
from dynamo_grpc.launch.mesh import Mesh, MeshConfig
from dynamo_grpc.transport.addresses import METRICS_META
from tests.helpers.token_requests import prompt, token_request

pytestmark = pytest.mark.slow


def text_of(resp: pb.ModelInferResponse) -> str:
    i = [o.name for o in resp.outputs].index("text_output")
    raw = resp.raw_output_contents[i]
    (n,) = struct.unpack_from("<I", raw)
    return raw[4 : 4 + n].decode()


def metrics(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        return str(r.read().decode())


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def by_role(mesh: Mesh) -> dict[str, dict[str, str]]:
    return {m["role"]: m for m in mesh.worker_metas()}


async def infer_all(mesh: Mesh, reqs: list[pb.ModelInferRequest]) -> list[pb.ModelInferResponse]:
    async with grpc.aio.insecure_channel(mesh.frontend_grpc) as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        return [await stub.ModelInfer(r, timeout=120) for r in reqs]


def wait_both_pools(mesh: Mesh) -> None:
    """The frontend serves the model as soon as one worker is in; wait until it knows both pools."""
    try:
        wait_for(lambda: metric(metrics(mesh.frontend_http), "dynamo_frontend_live_workers") == 2, timeout=180)
    except AssertionError:
        live = [ln for ln in metrics(mesh.frontend_http).splitlines() if "workers" in ln and not ln.startswith("#")]
        raise AssertionError(f"the frontend never saw both workers: {live}; registered {mesh.worker_metas()}") from None


def mesh_config(engine: str, worker_args: list[str], frontend_args: list[str]) -> MeshConfig:
    return MeshConfig(
        http_port=0,
        workers=2,
        worker_roles=["prefill", "decode"],
        engine=engine,
        speedup_ratio=1000.0 if engine == "mocker" else None,
        worker_args=["--metrics-port", "0", *worker_args],
        frontend_args=frontend_args,
        ready_timeout_s=240.0,
    )


def kill_prefill_and_compare(mesh: Mesh, reqs: list[pb.ModelInferRequest], before: list[str]) -> None:
    """SIGKILL the prefill worker (still registered until its TTL): the frontend prefills on the decoder."""
    prefill_pid = next(p.popen.pid for p in mesh.procs if p.name == "worker-0")
    remote_before = metric(metrics(mesh.frontend_http), "dynamo_frontend_disagg_decisions_total", decision="remote")
    os.kill(prefill_pid, signal.SIGKILL)
    after = asyncio.run(infer_all(mesh, reqs))
    assert [r.parameters["disaggregated"].bool_param for r in after] == [False] * len(reqs)
    assert [text_of(r) for r in after] == before
    # no request went remote; whether each one counted a local fallback or found the prefill pool already empty
    # (the dead worker dropped from discovery) depends on timing, so the local count is not asserted
    fe = metrics(mesh.frontend_http)
    assert metric(fe, "dynamo_frontend_disagg_decisions_total", decision="remote") == remote_before


def test_mocker_disaggregated_serving_and_faults() -> None:
    cfg = mesh_config(
        "mocker",
        ["--seed", "3", "--kv-lease-seconds", "2", "--kv-transfer-gbps", "50"],
        ["--max-local-prefill-tokens", "0"],
    )
    with Mesh(cfg) as mesh:
        wait_both_pools(mesh)
        model = mesh.models[0]
        roles = by_role(mesh)
        assert set(roles) == {"prefill", "decode"}
        prefill_id = roles["prefill"]["instance_id"] if "instance_id" in roles["prefill"] else None
        prompts = [prompt(s, n) for s, n in [(1, 40), (2, 130), (3, 300), (4, 700), (5, 64)]]
        reqs = [token_request(model, p, max_tokens=6) for p in prompts]
        out = asyncio.run(infer_all(mesh, reqs))
        assert [r.parameters["disaggregated"].bool_param for r in out] == [True] * 5
        pf_ids = {r.parameters["prefill_worker_id"].string_param for r in out}
        assert len(pf_ids) == 1 and (prefill_id is None or pf_ids == {prefill_id})
        assert all(r.parameters["worker_id"].string_param not in pf_ids for r in out)
        texts = [text_of(r) for r in out]
        assert all(texts)

        # the decoder holds the pulled blocks: a follow-up sharing the 700-token prompt pulls only the tail
        (follow,) = asyncio.run(infer_all(mesh, [token_request(model, [*prompts[3], 9, 8, 7], max_tokens=6)]))
        assert follow.parameters["disaggregated"].bool_param
        assert follow.parameters["cached_tokens"].int64_param >= 640

        pf, dec = metrics(roles["prefill"][METRICS_META]), metrics(roles["decode"][METRICS_META])
        assert metric(pf, "dynamo_worker_kv_leases_created_total") == 6
        assert metric(pf, "dynamo_worker_kv_leases_ended_total", outcome="pulled") == 6
        assert metric(pf, "dynamo_worker_kv_leases") == 0 and metric(pf, "dynamo_worker_kv_leased_blocks") == 0
        assert metric(dec, "dynamo_worker_kv_pulled_bytes_total") > 0
        wait_for(lambda: metric(metrics(roles["decode"][METRICS_META]), "dynamo_worker_kv_active_blocks") == 0)
        wait_for(lambda: metric(metrics(roles["prefill"][METRICS_META]), "dynamo_worker_kv_active_blocks") == 0)
        fe = metrics(mesh.frontend_http)
        assert metric(fe, "dynamo_frontend_disagg_decisions_total", decision="remote", reason="remote") == 6

        async def kv_faults() -> None:
            """Pull twice → FAILED_PRECONDITION; expired and unknown → NOT_FOUND; Release idempotent."""
            from dynamo_grpc.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc, worker_pb2, worker_pb2_grpc

            async with grpc.aio.insecure_channel(roles["prefill"]["grpc_address"]) as ch:
                pre = await worker_pb2_grpc.PrefillServiceStub(ch).Prefill(
                    worker_pb2.PrefillRequest(model=model, token_ids=prompt(9, 200))
                )
                kv = kv_transfer_pb2_grpc.KvTransferServiceStub(ch)
                chunks = [c async for c in kv.Pull(kv_transfer_pb2.PullRequest(handle=pre.kv_handle))]
                assert sum(c.num_blocks for c in chunks) == 4 and sum(c.nbytes for c in chunks) > 0
                for handle_id, code, words in [
                    (pre.kv_handle.handle_id, grpc.StatusCode.FAILED_PRECONDITION, "already pulled"),
                    ("nope", grpc.StatusCode.NOT_FOUND, "no KV lease"),
                ]:
                    h = kv_transfer_pb2.KvHandle(handle_id=handle_id)
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        async for _ in kv.Pull(kv_transfer_pb2.PullRequest(handle=h)):
                            pass
                    assert err.value.code() == code and words in (err.value.details() or "")
                await kv.Release(kv_transfer_pb2.ReleaseRequest(handle_id="nope"))  # idempotent
                late = await worker_pb2_grpc.PrefillServiceStub(ch).Prefill(
                    worker_pb2.PrefillRequest(model=model, token_ids=prompt(10, 200))
                )
                await asyncio.sleep(2.8)  # --kv-lease-seconds 2, swept every 0.5 s
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in kv.Pull(kv_transfer_pb2.PullRequest(handle=late.kv_handle)):
                        pass
                assert err.value.code() == grpc.StatusCode.NOT_FOUND and "expired" in (err.value.details() or "")

        asyncio.run(kv_faults())
        pf = metrics(roles["prefill"][METRICS_META])
        assert metric(pf, "dynamo_worker_kv_leases_ended_total", outcome="expired") == 1

        async def decoder_falls_back() -> None:
            """A handle whose lease is gone (its prefill worker died or gave up): the decoder prefills locally
            and continues after the first token exactly as aggregated serving would."""
            from dynamo_grpc.v1 import common_pb2, kv_transfer_pb2, kv_transfer_pb2_grpc, worker_pb2, worker_pb2_grpc

            ids = prompt(11, 330)
            stop = common_pb2.StopConditions(max_tokens=8, ignore_eos=True)
            async with grpc.aio.insecure_channel(roles["prefill"]["grpc_address"]) as pch:
                pre = await worker_pb2_grpc.PrefillServiceStub(pch).Prefill(
                    worker_pb2.PrefillRequest(model=model, token_ids=ids, stop=stop)
                )
                await kv_transfer_pb2_grpc.KvTransferServiceStub(pch).Release(
                    kv_transfer_pb2.ReleaseRequest(handle_id=pre.kv_handle.handle_id)
                )
            async with grpc.aio.insecure_channel(roles["decode"]["grpc_address"]) as dch:
                dec = worker_pb2_grpc.DecodeServiceStub(dch)
                agg = [t async for r in dec.Decode(worker_pb2.DecodeRequest(model=model, token_ids=ids, stop=stop))
                       for t in r.token_ids]  # fmt: skip
                req = worker_pb2.DecodeRequest(
                    model=model, token_ids=ids, stop=stop, kv_handle=pre.kv_handle, first_token=pre.first_token
                )
                rest = [t async for r in dec.Decode(req) for t in r.token_ids]
            assert [pre.first_token, *rest] == agg and len(agg) == 8

        asyncio.run(decoder_falls_back())
        dec = metrics(roles["decode"][METRICS_META])
        assert metric(dec, "dynamo_worker_kv_pull_fallbacks_total") == 1
        assert metric(pf, "dynamo_worker_kv_leases") == 0
        wait_for(lambda: metric(metrics(roles["prefill"][METRICS_META]), "dynamo_worker_kv_active_blocks") == 0)
        # the blocks it had reserved for the failed pull went back with the request's own
        wait_for(lambda: metric(metrics(roles["decode"][METRICS_META]), "dynamo_worker_kv_active_blocks") == 0)

        kill_prefill_and_compare(mesh, reqs, texts)
        dec = metrics(roles["decode"][METRICS_META])
        assert metric(dec, "dynamo_worker_kv_pull_fallbacks_total") == 1  # the frontend fell back before any pull


def test_torch_greedy_and_seeded_tokens_survive_the_handoff() -> None:
    """The real model: KV bytes pulled over gRPC continue greedy and seeded sampling exactly."""
    cfg = mesh_config("torch", ["--num-threads", "1", "--kv-cache-mib", "128"], ["--max-local-prefill-tokens", "0"])
    with Mesh(cfg) as mesh:
        wait_both_pools(mesh)
        model = mesh.models[0]
        prompts = [prompt(s, n) for s, n in [(1, 20), (2, 64), (3, 150), (4, 1000), (5, 90)]]
        reqs = [token_request(model, p, max_tokens=8, temperature=0.0) for p in prompts]
        reqs += [token_request(model, prompts[2], max_tokens=8, temperature=0.9, seed=42)]
        out = asyncio.run(infer_all(mesh, reqs))
        assert [r.parameters["disaggregated"].bool_param for r in out] == [True] * len(reqs)
        kill_prefill_and_compare(mesh, reqs, [text_of(r) for r in out])


def test_kv_transfer_runs_over_mtls(tmp_path: Path) -> None:
    """With --tls every hop is mTLS, the decoder's Pull included; KvTransfer refuses a client without a cert."""
    from dynamo_grpc.launch.security import local_security
    from dynamo_grpc.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc

    sec = local_security(tmp_path / "security", tls=True, curve=False)
    assert sec.tls is not None
    cfg = MeshConfig(
        workers=2,
        worker_roles=["prefill", "decode"],
        speedup_ratio=1000.0,
        frontend_args=["--max-local-prefill-tokens", "0"],
        security=sec,
        ready_timeout_s=120.0,
    )
    ca = sec.tls.ca.read_bytes()
    with Mesh(cfg) as mesh:
        model = mesh.models[0]

        async def go() -> None:
            async with grpc.aio.secure_channel(mesh.frontend_grpc, grpc.ssl_channel_credentials(ca)) as ch:
                stub = pb_grpc.GRPCInferenceServiceStub(ch)
                deadline = time.monotonic() + 30
                while True:  # until the frontend knows the prefill pool
                    resp = await stub.ModelInfer(token_request(model, prompt(1, 300), max_tokens=6), timeout=30)
                    if resp.parameters["disaggregated"].bool_param or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.2)
                assert resp.parameters["disaggregated"].bool_param
            prefill = by_role(mesh)["prefill"]["grpc_address"]
            async with grpc.aio.secure_channel(prefill, grpc.ssl_channel_credentials(ca)) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    async for _ in kv_transfer_pb2_grpc.KvTransferServiceStub(ch).Pull(
                        kv_transfer_pb2.PullRequest(handle=kv_transfer_pb2.KvHandle(handle_id="x")), timeout=5
                    ):
                        pass
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # no client certificate: no handshake

        asyncio.run(go())
