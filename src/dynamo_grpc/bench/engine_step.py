"""One decode step of the torch engine, taken apart: where this session's C paths save time.

Each variant is the same loaded model (the default GGUF) with parts of the C decode path switched
off, measured in interleaved rounds on the same cache: ``torch`` (the per-layer torch ops, blocks
gathered for SDPA: the path before), ``+attention`` (attention read in place from the paged cache,
``paged_attention.py``), ``+stack`` (every layer in one C call, ``decode_step.py``), and the same for
``w4a8``. Per step: wall time and the thread's CPU time (on a shared box, CPU time is the steadier of
the two). Rows: ``--rows`` decode rows at context ``--context``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from dynamo_grpc.bench.output import default_results_dir, save_plot, write_json
from dynamo_grpc.engines.torch.decode_step import MAX_ROWS as STACK_ROWS
from dynamo_grpc.engines.torch.kv_cache import KvCache
from dynamo_grpc.engines.torch.model import AttnBatch, DecodeGroup, LlamaModel
from dynamo_grpc.engines.torch.weights import load_checkpoint
from dynamo_grpc.models import default_model_path


def _batch(rows: int, ctx: int, bs: int, nblocks: int) -> tuple[torch.Tensor, AttnBatch]:
    width = ctx // bs + 1
    tables = (torch.arange(rows * width) % nblocks).view(rows, width)
    pos = torch.full((rows,), ctx)
    slots = tables[:, ctx // bs] * bs + ctx % bs
    lens = torch.full((rows,), ctx + 1)
    mask = (torch.arange(width * bs).unsqueeze(0) < lens.unsqueeze(1)).view(rows, 1, 1, -1)
    return torch.arange(5, 5 + rows), AttnBatch(pos, slots, [DecodeGroup(0, rows, tables, mask, lens)], [])


def _variants(models: dict[str, LlamaModel]) -> dict[str, tuple[LlamaModel, Any, Any]]:
    """name -> (model, attention lib, stack) to set before stepping."""
    out: dict[str, tuple[LlamaModel, Any, Any]] = {}
    for mode, m in models.items():
        out[f"{mode} torch"] = (m, None, None)
        if m.attn_lib is not None:
            out[f"{mode} +attention"] = (m, m.attn_lib, None)
            if m.stack is not None:
                out[f"{mode} +stack"] = (m, m.attn_lib, m.stack)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M Q4_1)")
    p.add_argument("--modes", default="dense,w4a8", help="model weight formats (dense = fp32)")
    p.add_argument("--rows", default="1,8,32")
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=default_results_dir() / "engine_step.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.num_threads)
    path = Path(args.model) if args.model else default_model_path()
    models = {}
    for mode in args.modes.split(","):
        ckpt = load_checkpoint(path, torch.float32, keep_q4=True, keep_q8=True)
        models[mode] = LlamaModel(ckpt, torch.float32, mode)
    cfg = next(iter(models.values())).cfg
    bs, nblocks = 64, 200
    kv = KvCache(cfg, nblocks, bs, torch.float32)
    gen = torch.Generator().manual_seed(0)
    for t in (*kv.k, *kv.v):
        t.normal_(generator=gen)
    variants = _variants(models)
    saved = {id(m): (m.attn_lib, m.stack) for m in models.values()}
    rows_list = [int(r) for r in args.rows.split(",")]
    samples: dict[str, dict[int, dict[str, list[float]]]] = {
        v: {r: {"wall_ms": [], "cpu_ms": []} for r in rows_list} for v in variants
    }
    load0 = os.getloadavg()
    for rnd in range(args.rounds):
        order = list(variants)
        order = order[rnd % len(order) :] + order[: rnd % len(order)]  # rotate: noise hits every variant
        for rows in rows_list:
            ids, batch = _batch(rows, args.context, bs, nblocks)
            for name in order:
                m, lib, stack = variants[name]
                if stack is not None and rows > STACK_ROWS:
                    continue  # the one-call stack takes decode steps of up to 8 rows only
                m.attn_lib, m.stack = lib, stack
                m.forward(ids, batch, kv, torch.arange(rows))  # warm
                w0, c0 = time.perf_counter(), time.thread_time()
                for _ in range(args.steps):
                    m.forward(ids, batch, kv, torch.arange(rows))
                s = samples[name][rows]
                s["wall_ms"].append((time.perf_counter() - w0) * 1e3 / args.steps)
                s["cpu_ms"].append((time.thread_time() - c0) * 1e3 / args.steps)
        print(f"round {rnd} done", flush=True)
    for m in models.values():
        m.attn_lib, m.stack = saved[id(m)]
    table: dict[str, Any] = {}
    for name, per_rows in samples.items():
        table[name] = {}
        for rows, s in per_rows.items():
            if not s["cpu_ms"]:
                continue
            cpu = statistics.median(s["cpu_ms"])
            table[name][str(rows)] = {
                "cpu_ms": cpu, "wall_ms": statistics.median(s["wall_ms"]), "tok_s_cpu": rows * 1e3 / cpu,
                "rounds_cpu_ms": s["cpu_ms"], "rounds_wall_ms": s["wall_ms"],
            }  # fmt: skip
            print(f"{name:>16} rows {rows:>2}: {cpu:7.2f} ms CPU ({min(s['cpu_ms']):.2f}-{max(s['cpu_ms']):.2f})")
    result = {
        "model": str(path), "num_threads": args.num_threads, "context": args.context, "steps": args.steps,
        "rounds": args.rounds, "load_average_start": load0, "load_average_end": os.getloadavg(),
        "torch": torch.__version__, "steps_ms": table,
    }  # fmt: skip
    write_json(args.json, result)
    save_plot(lambda png: _plot(result, png), args.json.with_suffix(".png"))
    return 0


def _plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib.pyplot as plt

    table = result["steps_ms"]
    rows = sorted({int(r) for v in table.values() for r in v})
    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows), 3.6))
    for ax, r in zip(axes if len(rows) > 1 else [axes], rows, strict=True):
        names = [n for n in table if str(r) in table[n]]
        ax.barh(names, [table[n][str(r)]["cpu_ms"] for n in names])
        ax.set_title(f"{r} decode rows: ms of CPU per step")
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
