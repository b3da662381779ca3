"""One decode step of the torch engine, taken apart: where this session's C paths save time.

Each variant is the same loaded model (the default GGUF) with parts of the C decode path switched
off, measured in interleaved rounds on the same cache: ``torch`` (the per-layer torch ops, blocks
gathered for SDPA: the path before), ``+attention`` (attention read in place from the paged cache,
``paged_attention.py``), ``+stack`` (every layer in one C call, ``decode_step.py``), and the same for
``w4a8``; ``... dense GEMM`` variants run matmuls of more than 8 rows on torch's dense fp32 copy instead
of the block GEMM (``block_gemm.py``). Per step: wall time and the thread's CPU time (on a shared box,
CPU time is the steadier of the two). Rows: ``--rows`` decode rows at context ``--context``, and a cold
prefill chunk of ``--prefill`` tokens (reported as rows ``p<N>``).
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
from dynamo_grpc.engines.torch.block_gemm import PanelBlocks
from dynamo_grpc.engines.torch.decode_step import MAX_ROWS as STACK_ROWS
from dynamo_grpc.engines.torch.exact_gemv import ExactBlocks
from dynamo_grpc.engines.torch.kv_cache import KvCache
from dynamo_grpc.engines.torch.model import AttnBatch, DecodeGroup, LlamaModel, PrefillSegment
from dynamo_grpc.engines.torch.w4a8 import W4A8
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


def _prefill(tokens: int) -> tuple[torch.Tensor, AttnBatch]:
    """One cold prompt chunk of ``tokens`` tokens written from slot 0."""
    pos = torch.arange(tokens)
    return torch.arange(5, 5 + tokens), AttnBatch(pos, pos.clone(), [], [PrefillSegment(0, tokens, 0, None)])


def model_panels(m: LlamaModel) -> list[tuple[ExactBlocks, PanelBlocks | None]]:
    """Every block weight of a model with its block-GEMM panels (``None`` where it has none)."""
    out = []
    for lin in [m.lm_head, *(v for layer in m.layers for v in layer.values())]:
        blocks = lin.blocks if isinstance(lin, W4A8) else lin
        if isinstance(blocks, ExactBlocks):
            out.append((blocks, blocks.panel))
    return out


def without_block_gemm(m: LlamaModel) -> None:
    """The fp32 path as it was before ``block_gemm.py``: more than 8 rows on the dense copy, layer by layer."""
    for blocks, _ in model_panels(m):
        blocks.panel = None
    if m.stack is not None:
        m.stack.panels, m.stack.max_rows = None, STACK_ROWS


def _variants(models: dict[str, LlamaModel]) -> dict[str, tuple[LlamaModel, Any, Any, bool]]:
    """name -> (model, attention lib, stack, block GEMM on) to set before stepping."""
    out: dict[str, tuple[LlamaModel, Any, Any, bool]] = {}
    for mode, m in models.items():
        gemm = any(p is not None for _, p in model_panels(m))
        out[f"{mode} torch"] = (m, None, None, False)
        if m.attn_lib is not None:
            if gemm:
                out[f"{mode} +attention, dense GEMM"] = (m, m.attn_lib, None, False)
            out[f"{mode} +attention"] = (m, m.attn_lib, None, gemm)
            if m.stack is not None:
                out[f"{mode} +stack"] = (m, m.attn_lib, m.stack, gemm)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M Q4_1)")
    p.add_argument("--modes", default="dense,w4a8", help="model weight formats (dense = fp32)")
    p.add_argument("--rows", default="1,8,32")
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--prefill", type=int, default=0, help="also time a cold prefill chunk of this many tokens (0: no)")
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
    panels = {id(m): model_panels(m) for m in models.values()}
    rows_list: list[int | str] = [int(r) for r in args.rows.split(",")]
    if args.prefill:
        rows_list.append(f"p{args.prefill}")
    samples: dict[str, dict[int | str, dict[str, list[float]]]] = {
        v: {r: {"wall_ms": [], "cpu_ms": []} for r in rows_list} for v in variants
    }
    load0 = os.getloadavg()
    for rnd in range(args.rounds):
        order = list(variants)
        order = order[rnd % len(order) :] + order[: rnd % len(order)]  # rotate: noise hits every variant
        for rows in rows_list:
            if isinstance(rows, str):
                ids, batch = _prefill(args.prefill)
                last = torch.tensor([args.prefill - 1])
            else:
                ids, batch = _batch(rows, args.context, bs, nblocks)
                last = torch.arange(rows)
            for name in order:
                m, lib, stack, gemm = variants[name]
                if stack is not None and (isinstance(rows, str) or rows > stack.max_rows):
                    continue  # the one-call stack takes decode steps only (of up to 8 rows without the block GEMM)
                if isinstance(rows, str) and lib is None:
                    continue  # prefill: attention is SDPA in every variant; only the GEMM differs
                m.attn_lib, m.stack = lib, stack
                for blocks, panel in panels[id(m)]:
                    blocks.panel = panel if gemm else None
                m.forward(ids, batch, kv, last)  # warm
                w0, c0 = time.perf_counter(), time.thread_time()
                for _ in range(args.steps):
                    m.forward(ids, batch, kv, last)
                s = samples[name][rows]
                s["wall_ms"].append((time.perf_counter() - w0) * 1e3 / args.steps)
                s["cpu_ms"].append((time.thread_time() - c0) * 1e3 / args.steps)
        print(f"round {rnd} done", flush=True)
    for m in models.values():
        m.attn_lib, m.stack = saved[id(m)]
        for blocks, panel in panels[id(m)]:
            blocks.panel = panel
    table: dict[str, Any] = {}
    for name, per_rows in samples.items():
        table[name] = {}
        for rows, s in per_rows.items():
            if not s["cpu_ms"]:
                continue
            cpu = statistics.median(s["cpu_ms"])
            n = args.prefill if isinstance(rows, str) else rows
            table[name][str(rows)] = {
                "cpu_ms": cpu, "wall_ms": statistics.median(s["wall_ms"]), "tok_s_cpu": n * 1e3 / cpu,
                "rounds_cpu_ms": s["cpu_ms"], "rounds_wall_ms": s["wall_ms"],
            }  # fmt: skip
            print(f"{name:>30} rows {rows:>4}: {cpu:8.2f} ms CPU ({min(s['cpu_ms']):.2f}-{max(s['cpu_ms']):.2f})")
    result = {
        "model": str(path), "num_threads": args.num_threads, "context": args.context, "steps": args.steps,
        "prefill_tokens": args.prefill,
        "rounds": args.rounds, "load_average_start": load0, "load_average_end": os.getloadavg(),
        "torch": torch.__version__, "steps_ms": table,
    }  # fmt: skip
    write_json(args.json, result)
    save_plot(lambda png: _plot(result, png), args.json.with_suffix(".png"))
    return 0


def _plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib.pyplot as plt

    table = result["steps_ms"]
    rows = sorted({r for v in table.values() for r in v}, key=lambda r: (r.startswith("p"), int(r.lstrip("p"))))
    fig, axes = plt.subplots(1, len(rows), figsize=(5.5 * len(rows), 3.8))
    for ax, r in zip(axes if len(rows) > 1 else [axes], rows, strict=True):
        names = [n for n in table if r in table[n]]
        ax.barh(names, [table[n][r]["cpu_ms"] for n in names])
        what = f"prefill of {r[1:]} tokens" if r.startswith("p") else f"{r} decode rows"
        ax.set_title(f"{what}: ms of CPU per step", fontsize=9)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
