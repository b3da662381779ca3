"""`dynamo-grpc bench disagg`: what disaggregation costs (KV transfer) and what it buys (no prefill interference).

1. **transfer**: KvTransferService.Pull of 1k/4k/16k tokens of SmolLM2-135M's KV (30 layers, 3 KV heads,
   head dim 64; --dtype, default bfloat16) from a server process (a real engine core's leases over a
   paged cache filled with random values: the bytes and the code path of a torch prefill worker, without
   spending minutes prefilling on CPU) into blocks reserved in this process's own engine core and paged
   cache (the decode worker's path: the chunks land in the cache as they arrive), against a raw loopback
   TCP socket moving the same bytes in the same run — the bound. Rounds interleave gRPC and socket so both
   see the same machine.
2. **interference**: on the mocker (its timing model, --speedup), one trace mixing long prompts with many
   short decoders at the same arrival rate, on 2 aggregated workers vs 1 prefill + 1 decode worker:
   ITL p99 of the short requests, TTFT p50/p99, achieved output tokens/s. Rounds interleave the layouts.

3. **torch**: on the real torch engine, ITL of running decodes while 4k-token prompts arrive, 2 aggregated
   workers vs 1 prefill + 1 decode, one thread and one pinned core per worker (bench/disagg_torch.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dynamo_grpc.bench.output import default_results_dir, save_plot, write_json
from dynamo_grpc.bench.replay_driver import Driver, DriverConfig
from dynamo_grpc.bench.replay_metrics import RequestRecord, percentiles
from dynamo_grpc.bench.replay_trace import TraceRequest

if TYPE_CHECKING:
    from dynamo_grpc.engines.torch.kv_cache import KvCache

#: SmolLM2-135M's KV geometry (the default model)
LAYERS, KV_HEADS, HEAD_DIM, BLOCK = 30, 3, 64, 64
SOCKET_CHUNK = 4 << 20
#: interference: arrivals spread over this many seconds
WINDOW_S = 8.0


# ---------------------------------------------------------------------------------------------- transfer


class LeaseOnlyExecutor:
    """An engine-core executor that runs no model and only exports a KV cache's blocks to pulls, as the torch
    runner does (the transfer bench's prefill side, and the data-socket tests)."""

    unsupported_options: frozenset[str] = frozenset()
    supports_lora = False
    refusal = ""

    def __init__(self, cache: KvCache) -> None:
        self.cache = cache

    def execute(self, plan: Any) -> Any:
        raise RuntimeError("this server only serves leases")

    def export_blocks(self, block_ids: list[int]) -> bytes:
        return self.cache.export_blocks(block_ids)

    def export_views(self, block_ids: list[int]) -> list[memoryview]:  # no copy
        return self.cache.export_views(block_ids)

    def import_views(self, block_ids: list[int]) -> list[memoryview]:  # the decode side: pulls land here
        return self.cache.import_views(block_ids)


def lease_only_engine(nblocks: int, dtype: str, lease_seconds: float = 3600.0) -> tuple[Any, KvCache]:
    """An engine core (not started: leases and reservations need no loop) over a zero-filled paged cache
    of SmolLM2-135M's geometry."""
    import torch

    from dynamo_grpc.engines.core import CoreConfig, EngineCore
    from dynamo_grpc.engines.core.driver import CoreEngine
    from dynamo_grpc.engines.torch.kv_cache import KvCache

    class _Geometry:
        num_hidden_layers, num_key_value_heads, head_dim = LAYERS, KV_HEADS, HEAD_DIM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    cache = KvCache(_Geometry(), nblocks, BLOCK, torch_dtype)  # type: ignore[arg-type]
    config = CoreConfig(BLOCK, nblocks, 1 << 30, 2, kv_lease_seconds=lease_seconds)
    return CoreEngine(EngineCore(config, LeaseOnlyExecutor(cache)), threaded=True), cache


def _serve_kv(args: argparse.Namespace) -> int:
    """The server process: an engine core's leases over a random-filled cache, KvTransfer + a raw socket."""
    from dynamo_grpc.transport import GrpcServer, ServerOptions
    from dynamo_grpc.v1 import kv_transfer_pb2_grpc
    from dynamo_grpc.worker.kv_transfer import KvGeometry, KvTransferServicer

    sizes = [int(s) for s in args.sizes.split(",")]
    nblocks = -(-max(sizes) // BLOCK)
    engine, cache = lease_only_engine(nblocks, args.dtype)
    for t in (*cache.k, *cache.v):
        t.normal_()
    core = engine.core
    blocks = core.kv.pool.allocate(nblocks)
    handles: dict[str, list[str]] = {}
    for size in sizes:
        part = blocks[: -(-size // BLOCK)]
        for r in range(2 * args.rounds):  # one lease per path per round
            core.kv.pool.touch(part)
            lease = core.leases.create(f"kv-{size}-{r}", part, size, [])
            handles.setdefault(str(size), []).append(lease.lease_id)
    payload = cache.export_blocks([b.block_id for b in blocks])

    lsock = socket.create_server(("127.0.0.1", 0))

    def socket_server() -> None:
        while True:
            conn, _ = lsock.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                n = int.from_bytes(conn.recv(8), "little")
                view = memoryview(payload)
                for off in range(0, n, SOCKET_CHUNK):
                    conn.sendall(view[off : min(n, off + SOCKET_CHUNK)])

    threading.Thread(target=socket_server, daemon=True).start()

    async def serve() -> None:
        geometry = KvGeometry(args.dtype, LAYERS, BLOCK, KV_HEADS, HEAD_DIM, moves_bytes=True)
        server = GrpcServer(ServerOptions(host="127.0.0.1", port=0))
        server.add(
            kv_transfer_pb2_grpc.add_KvTransferServiceServicer_to_server,
            KvTransferServicer(engine, geometry),
            "dynamo_grpc.v1.KvTransferService",
        )
        address = await server.start()
        info = {"grpc": address, "socket": lsock.getsockname()[1], "handles": handles}
        print(json.dumps(info), flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())
    return 0


async def _pull_once(
    engine: Any, address: str, handle_id: str, tokens: int, dtype: str, per: int = 0, path: str = "grpc"
) -> tuple[int, float]:
    """One pull into blocks reserved in ``engine`` (freed again after: the next pull reuses them)."""
    from dynamo_grpc.transport import ChannelOptions, open_channel
    from dynamo_grpc.v1 import kv_transfer_pb2
    from dynamo_grpc.worker.kv_transfer import KvGeometry, ReservedBlocks, pull

    geometry = KvGeometry(dtype, LAYERS, BLOCK, KV_HEADS, HEAD_DIM)
    res = engine.reserve_kv([3] * tokens)
    assert res is not None and res.first_block == 0
    ch = open_channel(address, ChannelOptions())
    try:
        handle = kv_transfer_pb2.KvHandle(handle_id=handle_id, address=address, num_tokens=tokens)
        await ch.channel_ready()  # a decode worker keeps one channel per prefill peer (kv_transfer.Channels)
        t0 = time.perf_counter()
        got = await pull(
            ch, handle, 0, geometry, ReservedBlocks(engine, res), timeout=600, blocks_per_chunk=per, path=path
        )
        return got.bytes, time.perf_counter() - t0
    finally:
        engine.cancel_reservation(res)
        await ch.close(None)


def _socket_once(port: int, nbytes: int, alloc_in_timer: bool = False) -> float:
    """The bound: receive ``nbytes`` into a buffer allocated (and zero-filled, so resident) before the
    timer starts, or, with ``alloc_in_timer``, inside it, as a pull that must get fresh memory does."""
    t0 = time.perf_counter()
    buf = bytearray(nbytes)
    view = memoryview(buf)
    if not alloc_in_timer:
        t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(nbytes.to_bytes(8, "little"))
        got = 0
        while got < nbytes:
            n = s.recv_into(view[got:], min(SOCKET_CHUNK, nbytes - got))
            if not n:
                raise RuntimeError(f"socket closed after {got} of {nbytes} bytes")
            got += n
    return time.perf_counter() - t0


def run_transfer(sizes: list[int], rounds: int, dtype: str, per: int = 0) -> dict[str, Any]:
    engine, _ = lease_only_engine(-(-max(sizes) // BLOCK) + 1, dtype)  # this process is the decode worker
    cmd = [sys.executable, "-m", "dynamo_grpc.bench.disagg", "--serve-kv", "--sizes", ",".join(map(str, sizes))]
    cmd += ["--rounds", str(rounds), "--dtype", dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        rows: dict[str, dict[str, list[float]]] = {
            str(s): {"grpc_s": [], "pull_socket_s": [], "socket_s": [], "socket_alloc_s": [], "bytes": []}
            for s in sizes
        }
        for r in range(rounds):
            for size in sizes:
                ids = info["handles"][str(size)]
                nbytes, secs = asyncio.run(_pull_once(engine, info["grpc"], ids[2 * r], size, dtype, per, "grpc"))
                row = rows[str(size)]
                row["grpc_s"].append(secs)
                row["bytes"].append(nbytes)
                nb2, secs2 = asyncio.run(_pull_once(engine, info["grpc"], ids[2 * r + 1], size, dtype, per, "socket"))
                assert nb2 == nbytes, (nb2, nbytes)
                row["pull_socket_s"].append(secs2)
                row["socket_s"].append(_socket_once(info["socket"], nbytes))
                row["socket_alloc_s"].append(_socket_once(info["socket"], nbytes, alloc_in_timer=True))
                print(
                    f"  round {r + 1} {size:>6} tokens {nbytes / 1e6:8.1f} MB: Pull/gRPC {nbytes / secs / 1e6:8.1f} "
                    f"MB/s, Pull/data socket {nbytes / secs2 / 1e6:8.1f} MB/s, "
                    f"raw socket {nbytes / row['socket_s'][-1] / 1e6:8.1f} MB/s "
                    f"({nbytes / row['socket_alloc_s'][-1] / 1e6:.1f} with its buffer allocated in the timer)",
                    flush=True,
                )
    finally:
        proc.terminate()
        proc.wait(10)
    out: dict[str, Any] = {}
    for key, row in rows.items():
        total = row["bytes"][0]
        g = [total / s / 1e6 for s in row["grpc_s"]]
        d = [total / s / 1e6 for s in row["pull_socket_s"]]
        k = [total / s / 1e6 for s in row["socket_s"]]
        ratios = [a / b for a, b in zip(g, k, strict=True)]
        dratios = [a / b for a, b in zip(d, k, strict=True)]
        ka = [total / s / 1e6 for s in row["socket_alloc_s"]]
        aratios = [a / b for a, b in zip(d, ka, strict=True)]
        out[key] = {
            "bytes": total,
            "grpc_ms": [s * 1e3 for s in row["grpc_s"]],
            "pull_socket_ms": [s * 1e3 for s in row["pull_socket_s"]],
            "socket_ms": [s * 1e3 for s in row["socket_s"]],
            "grpc_MBps_median": float(np.median(g)),
            "pull_socket_MBps_median": float(np.median(d)),
            "socket_MBps_median": float(np.median(k)),
            "ratio_median": float(np.median(ratios)),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "pull_socket_ratio_median": float(np.median(dratios)),
            "pull_socket_ratio_min": min(dratios),
            "pull_socket_ratio_max": max(dratios),
            # the bound again, the receive buffer's allocation (page faults) counted as a pull counts it
            "socket_alloc_ms": [s * 1e3 for s in row["socket_alloc_s"]],
            "socket_alloc_MBps_median": float(np.median(ka)),
            "pull_socket_vs_alloc_ratio_median": float(np.median(aratios)),
            "pull_socket_vs_alloc_ratio_min": min(aratios),
            "pull_socket_vs_alloc_ratio_max": max(aratios),
        }
    return out


# ---------------------------------------------------------------------------------------------- interference


def interference_trace(n_short: int, n_long: int, long_tokens: int, window_s: float) -> list[TraceRequest]:
    """Short chats (128-token prompts, 64 tokens out) arriving evenly; long prompts (4 tokens out) among them."""
    reqs: list[tuple[float, int, int]] = []
    for i in range(n_short):
        reqs.append((window_s * i / n_short, 128, 64))
    for j in range(n_long):
        reqs.append((window_s * (j + 0.5) / n_long, long_tokens, 4))
    reqs.sort()
    return [TraceRequest(i, t, n, o) for i, (t, n, o) in enumerate(reqs)]


def _gaps(rec: RequestRecord) -> list[float]:
    """Per-token gaps between streamed responses (a response of k tokens after a gap g: k gaps of g/k)."""
    out: list[float] = []
    for (t0, _), (t1, n) in zip(rec.chunks, rec.chunks[1:], strict=False):
        out += [(t1 - t0) / max(n, 1)] * max(n, 1)
    return out


def _run_layout(layout: str, trace: list[TraceRequest], speedup: float, gbps: float) -> dict[str, Any]:
    from dynamo_grpc.launch.mesh import Mesh, MeshConfig

    roles = ["prefill", "decode"] if layout == "disagg" else []
    worker_args = ["--kv-transfer-gbps", str(gbps)] if layout == "disagg" else []
    cfg = MeshConfig(
        workers=2, worker_roles=roles, speedup_ratio=speedup, worker_args=worker_args, ready_timeout_s=120.0
    )
    with tempfile.TemporaryDirectory() as d, Mesh(MeshConfig(**{**cfg.__dict__, "log_dir": Path(d)})) as mesh:

        async def go() -> list[RequestRecord]:
            driver = Driver(DriverConfig(mesh.frontend_grpc, mesh.models[0], channels=4))
            try:
                await driver.wait_ready()
                await asyncio.sleep(1.0 if layout == "agg" else 2.0)  # the frontend sees both workers (and pools)
                rng = np.random.default_rng(7)

                def tokens_for(r: TraceRequest) -> np.ndarray:
                    return rng.integers(100, 40_000, size=r.input_length, dtype=np.int64)

                return await driver.run(trace, tokens_for)
            finally:
                await driver.close()

        records = asyncio.run(go())
    errors = [r.error for r in records if r.error]
    short = [r for r in records if r.ok and r.prompt_tokens <= 512]
    long = [r for r in records if r.ok and r.prompt_tokens > 512]
    t0 = min(r.sent_s for r in records)
    t1 = max(r.end_s for r in records if r.ok)
    out_tokens = sum(r.output_tokens for r in records if r.ok)
    return {
        "errors": errors,
        "itl_short_ms": percentiles((g for r in short for g in _gaps(r)), 1e3),
        "ttft_short_ms": percentiles((r.ttft for r in short), 1e3),
        "ttft_long_ms": percentiles((r.ttft for r in long), 1e3),
        "output_tokens_per_s": out_tokens / (t1 - t0),
    }


def run_interference(rounds: int, speedup: float, gbps: float, n_short: int, n_long: int) -> dict[str, Any]:
    trace = interference_trace(n_short, n_long, 6000, WINDOW_S)
    runs: dict[str, list[dict[str, Any]]] = {"agg": [], "disagg": []}
    for r in range(rounds):
        for layout in ("agg", "disagg") if r % 2 == 0 else ("disagg", "agg"):
            res = _run_layout(layout, trace, speedup, gbps)
            runs[layout].append(res)
            print(
                f"  round {r + 1} {layout:>6}: ITL p99 {res['itl_short_ms']['p99']:.1f} ms, "
                f"TTFT p50/p99 {res['ttft_short_ms']['p50']:.1f}/{res['ttft_short_ms']['p99']:.1f} ms, "
                f"{res['output_tokens_per_s']:.0f} tok/s, errors {len(res['errors'])}",
                flush=True,
            )
    ratios = [
        a["itl_short_ms"]["p99"] / d["itl_short_ms"]["p99"] for a, d in zip(runs["agg"], runs["disagg"], strict=True)
    ]
    return {
        "trace": {"short": n_short, "long": n_long, "long_tokens": 6000, "window_s": WINDOW_S, "speedup": speedup},
        "kv_transfer_gbps": gbps,
        "runs": runs,
        "itl_p99_agg_over_disagg": {"median": float(np.median(ratios)), "min": min(ratios), "max": max(ratios)},
    }


# ---------------------------------------------------------------------------------------------- report


def _plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    tr = result.get("transfer") or {}
    if tr:
        sizes = list(tr)
        x = np.arange(len(sizes))
        axes[0].bar(x - 0.27, [tr[s]["grpc_MBps_median"] for s in sizes], 0.27, label="Pull, gRPC stream")
        axes[0].bar(x, [tr[s].get("pull_socket_MBps_median", 0) for s in sizes], 0.27, label="Pull, data socket")
        axes[0].bar(x + 0.27, [tr[s]["socket_MBps_median"] for s in sizes], 0.27, label="raw TCP socket (bound)")
        axes[0].set_xticks(x, [f"{int(s) // 1024}k tokens" for s in sizes])
        axes[0].set_ylabel("MB/s (median of rounds)")
        axes[0].set_title("KV transfer, loopback")
        axes[0].legend()
    inter = result.get("interference") or {}
    if inter:
        labels = ["ITL p99 (short)", "TTFT p50 (short)", "TTFT p99 (short)"]
        keys = [("itl_short_ms", "p99"), ("ttft_short_ms", "p50"), ("ttft_short_ms", "p99")]
        x = np.arange(len(labels))
        for off, layout in ((-0.2, "agg"), (0.2, "disagg")):
            vals = [float(np.median([r[k][p] for r in inter["runs"][layout]])) for k, p in keys]
            axes[1].bar(x + off, vals, 0.4, label="2 aggregated" if layout == "agg" else "1 prefill + 1 decode")
        axes[1].set_xticks(x, labels)
        axes[1].set_ylabel("ms (median of rounds)")
        axes[1].set_title("Prefill interference (mocker)")
        axes[1].legend()
    torch_part = (result.get("torch") or {}).get("medians") or {}
    if torch_part:
        labels = ["ITL p99 (decodes)", "TTFT p50 (decodes)", "TTFT p99 (decodes)", "TTFT p50 (4k)"]
        names = ["itl_decode_p99_ms", "ttft_decode_p50_ms", "ttft_decode_p99_ms", "ttft_long_p50_ms"]
        x = np.arange(len(labels))
        for off, layout in ((-0.2, "agg"), (0.2, "disagg")):
            vals = [torch_part[layout][k] or 0.0 for k in names]
            axes[2].bar(x + off, vals, 0.4, label="2 aggregated" if layout == "agg" else "1 prefill + 1 decode")
        axes[2].set_xticks(x, labels, fontsize=8)
        axes[2].set_yscale("log")
        axes[2].set_ylabel("ms (median of rounds, log)")
        axes[2].set_title("Prefill interference (torch, 1 pinned core per worker)")
        axes[2].legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dynamo-grpc bench disagg", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--json", type=Path, default=default_results_dir() / "disagg.json", help="results (PNG next to it with --plot)"
    )
    p.add_argument("--plot", action="store_true", help="also write a PNG (needs matplotlib)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sizes", default="1024,4096,16384", help="transfer: prompt tokens per pull")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="transfer: KV dtype")
    p.add_argument(
        "--speedup",
        type=float,
        default=1.0,
        help="interference: mocker speedup (1: steps of real length, "
        "~20 ms decodes, so a loaded machine's scheduling noise stays small next to them)",
    )
    p.add_argument("--kv-transfer-gbps", type=float, default=25.0, help="interference: the mocker's link model")
    p.add_argument("--short", type=int, default=48, help="interference: short requests")
    p.add_argument("--long", type=int, default=8, help="interference: long prompts")
    p.add_argument("--blocks-per-chunk", type=int, default=0, help="transfer: blocks per Pull message (0: server's)")
    p.add_argument("--torch-rounds", type=int, default=None, help="torch: rounds (default: --rounds)")
    p.add_argument("--torch-decodes", type=int, default=4, help="torch: decodes running while long prompts arrive")
    p.add_argument("--torch-decode-tokens", type=int, default=64, help="torch: output tokens of each decode")
    p.add_argument("--torch-long-tokens", type=int, default=4096, help="torch: prompt tokens of the long prompts")
    p.add_argument("--torch-long", type=int, default=2, help="torch: long prompts (1 s, then 4 s apart)")
    p.add_argument(
        "--torch-timeout", type=float, default=600.0, help="torch: client-side deadline of each request, seconds"
    )
    p.add_argument(
        "--torch-log-dir", type=Path, default=None, help="torch: keep the meshes' process logs here (default: dropped)"
    )
    p.add_argument("--only", choices=["transfer", "interference", "torch"], default=None)
    p.add_argument("--serve-kv", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_kv:
        return _serve_kv(args)
    t0 = time.time()
    result: dict[str, Any] = {"rounds": args.rounds}
    if args.only in (None, "transfer"):
        print("transfer: KvTransfer.Pull vs a raw loopback socket", flush=True)
        sizes = [int(s) for s in args.sizes.split(",")]
        result["transfer"] = run_transfer(sizes, args.rounds, args.dtype, args.blocks_per_chunk)
        result["transfer_into"] = "blocks reserved in the decoder's paged cache (no receive buffer)"
        result["blocks_per_chunk"] = args.blocks_per_chunk or "server default (8 MiB gRPC, 64 MiB data socket)"
        result["transfer_dtype"] = args.dtype
    if args.only in (None, "interference"):
        print("interference: 2 aggregated vs 1 prefill + 1 decode (mocker)", flush=True)
        result["interference"] = run_interference(
            args.rounds, args.speedup, args.kv_transfer_gbps, args.short, args.long
        )
    if args.only in (None, "torch"):
        from dynamo_grpc.bench.disagg_torch import run_torch_interference

        print("torch: decodes while 4k prompts arrive, 2 aggregated vs 1 prefill + 1 decode (1 core each)", flush=True)
        t1 = time.time()

        def save_round(part: dict[str, Any]) -> None:  # a run cut short keeps its finished rounds
            if args.json is not None:
                old = json.loads(args.json.read_text()) if args.json.exists() else {}
                write_json(args.json, {**old, "torch": {**part, "partial": True}})

        result["torch"] = run_torch_interference(
            args.torch_rounds or args.rounds,
            n_decodes=args.torch_decodes,
            decode_tokens=args.torch_decode_tokens,
            n_long=args.torch_long,
            long_tokens=args.torch_long_tokens,
            timeout_s=args.torch_timeout,
            on_round=save_round,
            log_dir=args.torch_log_dir,
        )
        result["torch"]["wall_s"] = round(time.time() - t1, 1)
    result["wall_s"] = round(time.time() - t0, 1)
    result["cpus"] = os.cpu_count()
    if args.json is not None:
        if args.only is not None and args.json.exists():  # one part re-run: keep the other part's results
            result = {**json.loads(args.json.read_text()), **result}
        write_json(args.json, result)
        print(f"wrote {args.json}")
        if args.plot:
            save_plot(lambda png: _plot(result, png), args.json.with_suffix(".png"))
    else:
        print(json.dumps(result, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else o))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
