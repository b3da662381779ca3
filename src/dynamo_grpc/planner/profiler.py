"""`dynamo-grpc profile`: sweep one worker and write the profile the planner sizes pools with.

Starts a mesh of one worker (the engine and worker flags to profile) behind a frontend, and measures what a
client sees through the frontend's KServe stream:

* prefill: TTFT of a lone request per input length (``--isl``), median of ``--repeats`` (distinct prompts, so
  the prefix cache never helps);
* decode: ``c`` streams sent at once (``--concurrency``) with ``--contexts`` prompt tokens and ``--decode-osl``
  output tokens: mean ITL and the output tokens/s the worker delivered over the point. As Dynamo's profiler does,
  the sweep stops at the streams the worker's KV cache holds (``kv_blocks`` x ``block_size`` from its
  registration, over the blocks one stream of ``context + decode_osl`` tokens takes): beyond that, streams queue
  for blocks and the point measures the queue, not the decode. That largest concurrency is always measured.

Profile with the settings you serve with (engine, KV size, speedup ratio): the planner trusts these numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dynamo_grpc.envflags import env_defaults
from dynamo_grpc.logs import add_log_flag, setup_logging
from dynamo_grpc.planner.profile import DecodePoint, PrefillPoint, Profile


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"want positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynamo-grpc profile", description="Profile one worker for the SLA planner.")
    p.add_argument("--engine", choices=["mocker", "torch"], default="mocker")
    p.add_argument(
        "--role",
        choices=["prefill", "decode"],
        default=None,
        help="profile a worker of this role (passes --role to the worker; needs worker roles)",
    )
    p.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra worker argument (repeat), e.g. --worker-arg=--num-gpu-blocks=512",
    )
    p.add_argument("--speedup-ratio", type=float, default=1.0, help="mocker: the speedup the served workers use")
    p.add_argument("--isl", type=_ints, default=[128, 512, 1024, 2048, 4096], help="prefill sweep: prompt lengths")
    p.add_argument("--concurrency", type=_ints, default=[1, 2, 4, 8, 16, 32], help="decode sweep: streams at once")
    p.add_argument("--contexts", type=_ints, default=[512, 2048], help="decode sweep: prompt tokens per stream")
    p.add_argument("--decode-osl", type=int, default=64, help="decode sweep: output tokens per stream")
    p.add_argument("--repeats", type=int, default=3, help="prefill sweep: requests per length (median)")
    p.add_argument("--json", type=Path, required=True, help="where to write the profile (and a PNG next to it)")
    add_log_flag(p)
    return env_defaults(p)


def kv_concurrency(kv_blocks: int, block_size: int, context: int, osl: int) -> int:
    """Streams of ``context`` prompt and ``osl`` output tokens a cache of ``kv_blocks`` blocks holds at once (each
    stream takes whole blocks)."""
    return kv_blocks // math.ceil((context + osl) / block_size)


def decode_concurrencies(wanted: list[int], kv_max: int | None) -> list[int]:
    """The decode sweep's concurrencies at one context: those the KV cache holds, and its limit itself."""
    if kv_max is None:
        return sorted(set(wanted))
    kept = {c for c in wanted if c <= kv_max}
    if max(wanted) > kv_max:
        kept.add(kv_max)
    return sorted(kept)


def worker_kv(metas: list[dict[str, str]]) -> tuple[int, int] | None:
    """(kv_blocks, block_size) from the profiled worker's registration; None when it does not say."""
    for meta in metas:
        try:
            return int(meta["kv_blocks"]), int(meta["block_size"])
        except (KeyError, ValueError):
            continue
    return None


async def sweep(
    address: str, args: argparse.Namespace, kv: tuple[int, int] | None = None
) -> tuple[list[PrefillPoint], list[DecodePoint]]:
    from dynamo_grpc.bench.replay_driver import Driver, DriverConfig
    from dynamo_grpc.bench.replay_tokens import prompt_tokens
    from dynamo_grpc.bench.replay_trace import TraceRequest

    probe = Driver(DriverConfig(address, "", channels=1))
    try:
        model = await probe.served_model()
    finally:
        await probe.close()
    driver = Driver(DriverConfig(address, model, request_timeout_s=300.0, channels=8))
    seq = iter(range(10**9))

    def tokens(r: TraceRequest) -> np.ndarray:
        return prompt_tokens(r, None, salt=7)  # random ids per request index: no prefix sharing

    prefill: list[PrefillPoint] = []
    decode: list[DecodePoint] = []
    try:
        await driver.wait_ready()
        await driver.run([TraceRequest(next(seq), 0.0, 64, 4)], tokens)  # warm-up
        for isl in args.isl:
            ttfts = []
            for _ in range(args.repeats):
                [rec] = await driver.run([TraceRequest(next(seq), 0.0, isl, 2)], tokens)
                if not rec.ok:
                    raise RuntimeError(f"prefill sweep, isl {isl}: {rec.error}")
                ttfts.append(rec.ttft)
            prefill.append(PrefillPoint(isl, statistics.median(ttfts)))
            print(f"  prefill isl={isl}: ttft {prefill[-1].ttft_s * 1e3:.1f} ms", file=sys.stderr, flush=True)
        for ctx in args.contexts:
            kv_max = None if kv is None else kv_concurrency(kv[0], kv[1], ctx, args.decode_osl)
            if kv_max == 0:
                raise RuntimeError(
                    f"decode sweep: context {ctx} + {args.decode_osl} output tokens does not fit the worker's KV "
                    f"cache ({kv[0] if kv else 0} blocks); lower --contexts or give the worker more blocks"
                )
            for c in decode_concurrencies(args.concurrency, kv_max):
                reqs = [TraceRequest(next(seq), 0.0, ctx, args.decode_osl) for _ in range(c)]
                recs = await driver.run(reqs, tokens)
                bad = [r.error for r in recs if not r.ok]
                if bad:
                    raise RuntimeError(f"decode sweep, context {ctx}, concurrency {c}: {bad[0]}")
                itls = [r.itl for r in recs if not math.isnan(r.itl)]
                span = max(r.end_s for r in recs) - min(r.sent_s for r in recs)
                out = sum(r.output_tokens for r in recs)
                point = DecodePoint(c, ctx, statistics.fmean(itls), out / span)
                decode.append(point)
                print(
                    f"  decode ctx={ctx} c={c}: itl {point.itl_s * 1e3:.1f} ms, {point.tokens_per_s:.0f} tok/s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        await driver.close()
    return prefill, decode


def worker_args(args: argparse.Namespace) -> list[str]:
    extra = list(args.worker_arg)
    if args.role:
        extra += ["--role", args.role]
    return extra


def profile_worker(args: argparse.Namespace) -> Profile:
    from dynamo_grpc.launch.mesh import Mesh, MeshConfig

    mc = MeshConfig(
        workers=1,
        engine=args.engine,
        speedup_ratio=args.speedup_ratio if args.engine == "mocker" else None,
        worker_args=worker_args(args),
        acl=False,
    )
    t0 = time.monotonic()
    with Mesh(mc) as mesh:
        kv = worker_kv(mesh.worker_metas())
        prefill, decode = asyncio.run(sweep(mesh.frontend_grpc, args, kv))
    worker: dict[str, Any] = {
        "engine": args.engine,
        "role": args.role,
        "worker_args": worker_args(args),
        "speedup_ratio": args.speedup_ratio if args.engine == "mocker" else None,
        "sweep_s": round(time.monotonic() - t0, 1),
    }
    if kv is None:
        return Profile(args.engine, prefill, decode, worker)
    return Profile(args.engine, prefill, decode, worker, kv_tokens=kv[0] * kv[1], block_size=kv[1])


def plot(profile: Profile, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot([p.isl for p in profile.prefill], [p.ttft_s * 1e3 for p in profile.prefill], "o-")
    a.set(xlabel="input tokens", ylabel="TTFT (ms)", title="prefill: TTFT vs input length")
    for ctx in profile.contexts():
        curve = profile.decode_curve(ctx)
        b.plot([d.concurrency for d in curve], [d.itl_s * 1e3 for d in curve], "o-", label=f"context {ctx}")
    b.set(xlabel="concurrent streams", ylabel="ITL (ms)", title="decode: ITL vs concurrency", xscale="log")
    b.legend()
    fig.suptitle(f"profile: {profile.engine} {' '.join(profile.worker.get('worker_args', []))}")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    if args.repeats < 1 or args.decode_osl < 2:
        parser.error("--repeats must be >= 1 and --decode-osl >= 2 (ITL needs two tokens)")
    if args.speedup_ratio <= 0:
        parser.error("--speedup-ratio must be positive")
    from dynamo_grpc.bench.output import save_plot

    prof = profile_worker(args)
    prof.save(args.json)
    print(f"profile written to {args.json}", flush=True)
    save_plot(lambda png: plot(prof, png), args.json.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
