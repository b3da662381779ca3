"""Torch engine benchmark: ours vs transformers ``generate`` on the same model and prompts, same run.

* Throughput (output tokens/s) at 1, 8 and 32 concurrent requests. Workload: chat prompts of mixed
  length (rendered with the model's chat template), greedy, each request with its own max_tokens
  (drawn from [min, max]) and stopping at EOS like a real chat. Ours: ``concurrency`` clients in a
  closed loop over the engine (continuous batching). Baseline: transformers batched ``generate``
  with left padding, ``concurrency`` requests per batch, ``max_new_tokens`` = the batch's largest
  max_tokens; only tokens a request would keep (up to its max_tokens / first EOS) count.
* TTFT of a 1,500-token prompt cold versus with a 1,400-token prefix already cached (prefix hit).
* Memory: the KV cache is sized by ``--kv-cache-mb``; RSS before loading, after loading and its peak
  over our runs (measured before transformers is imported) against weights + KV cache.

    dynamo-grpc bench engine [--out DIR]        (bench/results/engine.json by default)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import torch

from dynamo_grpc.bench.output import default_results_dir, save_plot, write_json
from dynamo_grpc.engines.base import EngineRequest, SamplingParams
from dynamo_grpc.engines.torch import TorchEngine
from dynamo_grpc.models import default_model_path, load_model_source
from dynamo_grpc.tokens.chat_template import render_chat
from dynamo_grpc.tokens.tokenizer import Tokenizer

TOPICS = [
    "photosynthesis", "the French revolution", "black holes", "how vaccines work", "the water cycle",
    "machine learning", "the Roman empire", "climate change", "how airplanes fly", "the stock market",
    "volcanoes", "the human heart", "electric cars", "honey bees", "the internet", "chess openings",
]  # fmt: skip
ASKS = [
    "Explain {t} to a ten year old.",
    "Write a short poem about {t}.",
    "What are three surprising facts about {t}?",
    "Give a detailed overview of {t}, with history and current research.",
]
FILLER = (
    "Context: the following notes were collected by a student preparing for an exam. They cover "
    "definitions, key dates, important people and open questions, and they are written informally. "
)


def _rss_mb(key: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def build_workload(
    tok: Tokenizer, template: str, special: dict[str, str], n: int, lo: int, hi: int, seed: int
):
    """``n`` (prompt ids, max_tokens) pairs of mixed prompt length, deterministic for a seed."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        ask = ASKS[(i // len(TOPICS) + i) % len(ASKS)].format(t=topic)
        text = FILLER * rng.choice([0, 0, 1, 3, 6]) + ask
        ids = tok.encode(render_chat(template, [{"role": "user", "content": text}], special_tokens=special))
        out.append((ids, rng.randint(lo, hi)))
    return out


def _fmt(r: dict[str, Any]) -> str:
    return f"{r['tokens_per_s']:.1f} tok/s ({r['output_tokens']} tok in {r['seconds']:.1f}s)"


def _useful(tokens: list[int], max_tokens: int, eos: set[int]) -> list[int]:
    kept = []
    for t in tokens[:max_tokens]:
        kept.append(t)
        if t in eos:
            break
    return kept


async def run_ours(eng: TorchEngine, work: list[tuple[list[int], int]], concurrency: int) -> dict[str, Any]:
    queue = list(enumerate(work))
    results: dict[int, list[int]] = {}
    ttfts: list[float] = []

    async def client() -> None:
        while queue:
            i, (ids, mt) = queue.pop(0)
            t0 = time.perf_counter()
            toks: list[int] = []
            sp = SamplingParams(max_tokens=mt, temperature=0.0)
            async for o in eng.generate(EngineRequest(f"b{concurrency}-{i}", ids, sp)):
                if not toks:
                    ttfts.append(time.perf_counter() - t0)
                toks += o.token_ids
            results[i] = toks

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    dt = time.perf_counter() - t0
    n_tok = sum(len(v) for v in results.values())
    return {
        "seconds": dt,
        "output_tokens": n_tok,
        "tokens_per_s": n_tok / dt,
        "mean_ttft_s": sum(ttfts) / len(ttfts),
        "outputs": [results[i] for i in range(len(work))],
    }


def run_hf(
    hf: Any, work: list[tuple[list[int], int]], concurrency: int, eos: set[int], pad: int
) -> dict[str, Any]:
    outputs: list[list[int]] = []
    t0 = time.perf_counter()
    for b in range(0, len(work), concurrency):
        batch = work[b : b + concurrency]
        width = max(len(ids) for ids, _ in batch)
        ids_t = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (ids, _) in enumerate(batch):
            ids_t[r, width - len(ids) :] = torch.tensor(ids)
            mask[r, width - len(ids) :] = 1
        with torch.no_grad():
            gen = hf.generate(
                ids_t, attention_mask=mask, max_new_tokens=max(mt for _, mt in batch), do_sample=False,
                eos_token_id=sorted(eos), pad_token_id=pad,
            )  # fmt: skip
        for r, (_, mt) in enumerate(batch):
            outputs.append(_useful(gen[r, width:].tolist(), mt, eos))
    dt = time.perf_counter() - t0
    n_tok = sum(len(o) for o in outputs)
    return {"seconds": dt, "output_tokens": n_tok, "tokens_per_s": n_tok / dt, "outputs": outputs}


async def ttft_prefix(eng: TorchEngine, tok: Tokenizer, vocab: int, reps: int, seed: int) -> dict[str, Any]:
    """TTFT of 1,500-token prompts: cold (new 1,400-token prefix) vs warm (same prefix, new tail)."""
    rng = random.Random(seed)
    cold: list[float] = []
    warm: list[float] = []
    cached: list[int] = []

    async def first_token(ids: list[int], rid: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        async for o in eng.generate(EngineRequest(rid, ids, SamplingParams(max_tokens=1, temperature=0.0))):
            return time.perf_counter() - t0, o.cached_tokens
        raise RuntimeError("no output")

    for r in range(reps):
        prefix = [rng.randrange(100, vocab) for _ in range(1400)]
        tail_a = [rng.randrange(100, vocab) for _ in range(100)]
        tail_b = [rng.randrange(100, vocab) for _ in range(100)]
        t, c = await first_token(prefix + tail_a, f"cold{r}")
        assert c == 0
        cold.append(t)
        t, c = await first_token(prefix + tail_b, f"warm{r}")
        warm.append(t)
        cached.append(c)
    return {
        "prompt_tokens": 1500,
        "prefix_tokens": 1400,
        "cached_tokens": cached,
        "cold_s": cold,
        "warm_s": warm,
        "cold_median_s": sorted(cold)[len(cold) // 2],
        "warm_median_s": sorted(warm)[len(warm) // 2],
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    levels = [str(x["concurrency"]) for x in result["throughput"]]
    ours = [x["ours"]["tokens_per_s"] for x in result["throughput"]]
    hf = [x["transformers"]["tokens_per_s"] if x.get("transformers") else 0 for x in result["throughput"]]
    xs = range(len(levels))
    a.bar([x - 0.2 for x in xs], ours, 0.4, label="ours (TorchEngine)")
    a.bar([x + 0.2 for x in xs], hf, 0.4, label="transformers generate")
    a.set_xticks(list(xs), levels)
    a.set_xlabel("concurrent requests")
    a.set_ylabel("output tokens / s")
    a.set_title("Throughput, SmolLM2-135M Q4_1 on CPU")
    a.legend()
    t = result["ttft"]
    b.bar(["cold 1500", "1400 cached"], [t["cold_median_s"], t["warm_median_s"]], color=["gray", "green"])
    b.set_ylabel("TTFT (s, median)")
    b.set_title(f"TTFT, prefix hit: {t['cold_median_s'] / t['warm_median_s']:.1f}x faster")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


async def _ours_phase(args: argparse.Namespace, model: Path, levels: list[int]) -> tuple[dict[str, Any], Any]:
    rss0 = _rss_mb()
    eng = TorchEngine(
        model,
        kv_cache_bytes=args.kv_cache_mb << 20,
        max_num_seqs=max(levels),
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_threads=args.num_threads,
    )
    rss_loaded = _rss_mb()
    card, tok_json = load_model_source(model)
    tok = Tokenizer.from_card(card, tok_json)
    assert card.chat_template
    await eng.start()
    works = {}
    per_level = {}
    try:
        for c in levels:
            n = max(c * args.requests_per_client, 4)
            work = build_workload(
                tok,
                card.chat_template,
                card.special_tokens_map(),
                n,
                args.min_tokens,
                args.max_tokens,
                args.seed + c,
            )
            works[c] = work
            r = await run_ours(eng, work, c)
            print(f"ours c={c}: {_fmt(r)}", flush=True)
            per_level[c] = r
        ttft = await ttft_prefix(eng, tok, eng.config.vocab_size, args.ttft_reps, args.seed)
        print(f"ttft cold {ttft['cold_median_s']:.3f}s warm {ttft['warm_median_s']:.3f}s", flush=True)
        stats = eng.stats()
    finally:
        await eng.stop()
    memory = {
        "rss_before_load_mb": rss0,
        "rss_after_load_mb": rss_loaded,
        "rss_peak_mb": _rss_mb("VmHWM"),
        "rss_now_mb": _rss_mb(),
        "weights_mb": stats["weight_bytes"] / 2**20,
        "kv_cache_mb": stats["kv_cache_bytes"] / 2**20,
        "kv_cache_flag_mb": args.kv_cache_mb,
    }
    memory["rss_growth_over_weights_plus_kv_mb"] = (
        memory["rss_now_mb"] - rss0 - memory["weights_mb"] - memory["kv_cache_mb"]
    )
    return {"per_level": per_level, "ttft": ttft, "memory": memory, "stats": stats, "works": works}, tok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M Q4_1)")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--kv-cache-mb", type=int, default=384)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--num-threads", type=int, default=min(os.cpu_count() or 1, 2))
    p.add_argument("--ttft-reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true", help="skip transformers")
    p.add_argument("--json", type=Path, default=default_results_dir() / "engine.json")
    args = p.parse_args(argv)
    model = Path(args.model) if args.model else default_model_path()
    levels = [int(x) for x in args.concurrency.split(",")]
    torch.set_num_threads(args.num_threads)

    ours, _ = asyncio.run(_ours_phase(args, model, levels))
    eos = set(load_model_source(model)[0].eos_token_ids)

    hf_results: dict[int, dict[str, Any]] = {}
    if not args.no_baseline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers

        if model.is_dir():
            hf = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
        else:
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                str(model.parent), gguf_file=model.name, dtype=torch.float32
            ).eval()
        pad = next(iter(sorted(eos)))
        for c in levels:
            r = run_hf(hf, ours["works"][c], c, eos, pad)
            print(f"transformers c={c}: {_fmt(r)}", flush=True)
            hf_results[c] = r

    throughput = []
    for c in levels:
        o = ours["per_level"][c]
        row: dict[str, Any] = {
            "concurrency": c,
            "requests": len(ours["works"][c]),
            "ours": {k: v for k, v in o.items() if k != "outputs"},
        }
        if c in hf_results:
            h = hf_results[c]
            row["transformers"] = {k: v for k, v in h.items() if k != "outputs"}
            row["speedup"] = o["tokens_per_s"] / h["tokens_per_s"]
            same = sum(a == b for a, b in zip(o["outputs"], h["outputs"], strict=True))
            row["identical_outputs"] = f"{same}/{len(o['outputs'])}"
        throughput.append(row)
    ttft = ours["ttft"]
    result = {
        "model": str(model),
        "num_threads": args.num_threads,
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "workload": {
            "max_tokens_range": [args.min_tokens, args.max_tokens],
            "requests_per_client": args.requests_per_client,
            "greedy": True,
            "stops_at_eos": True,
        },
        "throughput": throughput,
        "ttft": ttft | {"speedup": ttft["cold_median_s"] / ttft["warm_median_s"]},
        "memory": ours["memory"],
        "engine_stats": ours["stats"],
        "targets": {"throughput_speedup_at_32": ">= 2x", "ttft_speedup_on_prefix_hit": ">= 5x"},
    }
    write_json(args.json, result)
    save_plot(lambda png: plot(result, png), args.json.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("throughput", "ttft", "memory")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
