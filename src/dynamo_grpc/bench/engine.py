"""Torch engine benchmark: ours (each weight mode) vs transformers ``generate`` vs llama.cpp, same run.

* Throughput at 1, 8 and 32 concurrent requests, as end-to-end output tokens/s (prefill included) and
  decode tokens/s (per-stream decode rate after the first token × concurrency). Workload: chat prompts of
  mixed length (the model's chat template), greedy, each request with its own max_tokens (drawn from
  [min, max]) and stopping at EOS. Ours: ``concurrency`` clients in a closed loop over the engine
  (continuous batching), once per ``--modes`` weight format. transformers: batched ``generate`` with left
  padding, ``concurrency`` requests per batch; only tokens a request would keep count. llama.cpp (with
  ``--llama-cpp``): ``llama-batched-bench`` on the same GGUF, ``concurrency`` sequences of the workload's
  mean prompt and output lengths. ``--rounds`` interleaved rounds (systems in rotating order).
* Accuracy per mode: greedy agreement with fp32 over the same prompts, perplexity of a fixed passage.
* Limits: memory bandwidth and matmul GFLOP/s on the model's shapes (``engine_limits.py``), and where
  each mode's decode sits against them at the lowest level (weight bytes per step ÷ step time) and at the
  highest (matmul GFLOP per step and the GFLOP/s achieved over the whole step).
* TTFT of a 1,500-token prompt cold versus with a 1,400-token prefix already cached (prefix hit).
* Memory: RSS before/after loading the fp32 engine, against weights + KV cache.

    dynamo-grpc bench engine [--modes fp32,int4] [--fp32-dense] [--fp32-no-gemm] [--llama-cpp PATH] [--rounds 3]
        [--json FILE]
    dynamo-grpc bench engine --merge engine_c32.json engine_c1_c8.json [--json FILE]   # runs split by level
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

from dynamo_grpc.bench.engine_accuracy import TEXT, agreement, decode_perplexity, hf_perplexity, perplexity
from dynamo_grpc.bench.engine_limits import measure, model_shapes
from dynamo_grpc.bench.engine_llamacpp import find_binary, run_batched, version
from dynamo_grpc.bench.engine_merge import markdown, merge
from dynamo_grpc.bench.engine_step import without_block_gemm
from dynamo_grpc.bench.output import default_results_dir, save_plot, write_json
from dynamo_grpc.engines.base import EngineRequest, SamplingParams
from dynamo_grpc.engines.torch import TorchEngine
from dynamo_grpc.engines.torch.engine import WEIGHT_MODES
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


def build_workload(tok: Tokenizer, template: str, special: dict[str, str], n: int, lo: int, hi: int, seed: int):
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


def _decode_rate(n: int, first: float, last: float) -> float | None:
    return (n - 1) / (last - first) if n > 1 and last > first else None


def _median(xs: list[float]) -> float:
    ys = sorted(xs)
    return ys[len(ys) // 2] if ys else 0.0


async def run_ours(eng: TorchEngine, work: list[tuple[list[int], int]], concurrency: int, tag: str) -> dict[str, Any]:
    queue = list(enumerate(work))
    results: dict[int, list[int]] = {}
    ttfts: list[float] = []
    rates: list[float] = []
    cached: list[int] = []  # prompt tokens served from the prefix cache, per request

    async def client() -> None:
        while queue:
            i, (ids, mt) = queue.pop(0)
            t0 = time.perf_counter()
            first = last = t0
            toks: list[int] = []
            sp = SamplingParams(max_tokens=mt, temperature=0.0)
            async for o in eng.generate(EngineRequest(f"{tag}-{concurrency}-{i}", ids, sp)):
                last = time.perf_counter()
                if not toks:
                    first = last
                    ttfts.append(first - t0)
                    cached.append(o.cached_tokens)
                toks += o.token_ids
            r = _decode_rate(len(toks), first, last)
            if r is not None:
                rates.append(r)
            results[i] = toks

    t0 = time.perf_counter()
    await asyncio.gather(*[client() for _ in range(concurrency)])
    dt = time.perf_counter() - t0
    n_tok = sum(len(v) for v in results.values())
    return {
        "seconds": dt,
        "cached_prompt_tokens": sum(cached),
        "prompt_tokens": sum(len(ids) for ids, _ in work),
        "output_tokens": n_tok,
        "tokens_per_s": n_tok / dt,
        "decode_tokens_per_s": _median(rates) * concurrency,
        "decode_tokens_per_s_per_stream": _median(rates),
        "mean_ttft_s": sum(ttfts) / len(ttfts),
        "outputs": [results[i] for i in range(len(work))],
    }


class _StepClock:
    """A transformers streamer that only timestamps: the prompt, then each generated step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_hf(hf: Any, work: list[tuple[list[int], int]], concurrency: int, eos: set[int], pad: int) -> dict[str, Any]:
    outputs: list[list[int]] = []
    rates: list[float] = []
    t0 = time.perf_counter()
    for b in range(0, len(work), concurrency):
        batch = work[b : b + concurrency]
        width = max(len(ids) for ids, _ in batch)
        ids_t = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (ids, _) in enumerate(batch):
            ids_t[r, width - len(ids) :] = torch.tensor(ids)
            mask[r, width - len(ids) :] = 1
        clock = _StepClock()
        with torch.no_grad():
            gen = hf.generate(
                ids_t, attention_mask=mask, max_new_tokens=max(mt for _, mt in batch), do_sample=False,
                eos_token_id=sorted(eos), pad_token_id=pad, streamer=clock,
            )  # fmt: skip
        steps = clock.times[1:]  # [0] is the prompt
        rate = _decode_rate(len(steps), steps[0], steps[-1]) if steps else None
        if rate is not None:
            rates.append(rate)
        for row, (_, mt) in enumerate(batch):
            outputs.append(_useful(gen[row, width:].tolist(), mt, eos))
    dt = time.perf_counter() - t0
    n_tok = sum(len(o) for o in outputs)
    return {
        "seconds": dt,
        "output_tokens": n_tok,
        "tokens_per_s": n_tok / dt,
        "decode_tokens_per_s": _median(rates) * concurrency,
        "decode_tokens_per_s_per_stream": _median(rates),
        "outputs": outputs,
    }


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


def _spread(xs: list[float]) -> dict[str, Any]:
    return {"median": _median(xs), "min": min(xs), "max": max(xs), "rounds": xs} if xs else {}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, d, b) = plt.subplots(1, 3, figsize=(16, 4.5))
    rows = result["throughput"]
    levels = [str(x["concurrency"]) for x in rows]
    systems = list(rows[0]["systems"]) if rows else []
    width = 0.8 / max(1, len(systems))
    for ax, key, title in ((a, "tokens_per_s", "end-to-end"), (d, "decode_tokens_per_s", "decode only")):
        for j, name in enumerate(systems):
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(levels))]
            med = [x["systems"][name][key]["median"] for x in rows]
            lo = [m - x["systems"][name][key]["min"] for m, x in zip(med, rows, strict=True)]
            hi = [x["systems"][name][key]["max"] - m for m, x in zip(med, rows, strict=True)]
            ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, label=name)
        ax.set_xticks(range(len(levels)), levels)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tokens / s (median, min-max of rounds)")
        ax.set_title(f"{title}, SmolLM2-135M Q4_1 GGUF, {result['num_threads']} thread(s)")
        ax.legend(fontsize=7)
    t = result["ttft"]
    b.bar(["cold 1500", "1400 cached"], [t["cold_median_s"], t["warm_median_s"]], color=["gray", "green"])
    b.set_ylabel("TTFT (s, median)")
    b.set_title(f"TTFT, prefix hit: {t['cold_median_s'] / t['warm_median_s']:.1f}x faster")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def _versions(llama_version: str | None) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for name in ("torch", "transformers", "accelerate", "gguf", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    if llama_version:
        out["llama.cpp"] = llama_version
    return out


def _row(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k not in ("outputs", "raw")}


def _matmul_weights(cfg: Any) -> int:
    """Weights one decode row multiplies: every layer's projections and the vocabulary table."""
    per_layer = sum(n * k for name, (n, k) in _shapes(cfg).items() if name != "lm_head")
    return per_layer * cfg.num_hidden_layers + cfg.vocab_size * cfg.hidden_size


def _shapes(cfg: Any) -> dict[str, tuple[int, int]]:
    return model_shapes(
        cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim, cfg.vocab_size,
    )  # fmt: skip


def _merge_main(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    defaults = vars(p.parse_args([]))
    extra = [k for k, v in vars(args).items() if k not in ("merge", "json") and v != defaults[k]]
    if extra:
        p.error(
            "--merge runs nothing, so it takes only --json; drop "
            + ", ".join("--" + k.replace("_", "-") for k in extra)
        )
    try:
        runs = [(path.name, json.loads(path.read_text())) for path in args.merge]
        result = merge(runs)
    except (OSError, ValueError) as e:  # MergeError is a ValueError, as is bad JSON
        p.error(f"--merge: {e}")
    write_json(args.json, result)
    save_plot(lambda png: plot(result, png), args.json.with_suffix(".png"))
    print(markdown(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M Q4_1)")
    p.add_argument("--modes", default="fp32,int4", help="our weight modes (fp32,bf16,int8,int4,w4a8); fp32 first")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the spread is reported)")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--kv-cache-mb", type=int, default=384)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--num-threads", type=int, default=min(os.cpu_count() or 1, 2), help="for every system")
    p.add_argument("--ttft-reps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true", help="skip transformers")
    p.add_argument(
        "--fp32-dense",
        action="store_true",
        help="also run fp32 without the block kernels (ours-fp32-dense: the dense path, for before/after)",
    )
    p.add_argument(
        "--fp32-no-gemm",
        action="store_true",
        help="also run fp32 with matmuls of more than 8 rows on the dense fp32 copy instead of the block GEMM "
        "(ours-fp32-nogemm: the default before block_gemm.py, for before/after)",
    )
    p.add_argument(
        "--llama-cpp", default=None, help="llama-batched-bench binary or its folder (else $DYN_LLAMA_CPP, PATH)"
    )
    p.add_argument("--no-limits", action="store_true", help="skip the bandwidth and matmul measurements")
    p.add_argument(
        "--keep-prefix-cache",
        action="store_true",
        help="keep our prefix cache between rounds (later rounds then hit the earlier rounds' prompts; "
        "default: cleared before each of our runs, so every round is cold like the baselines)",
    )
    p.add_argument("--json", type=Path, default=default_results_dir() / "engine.json")
    p.add_argument(
        "--merge", type=Path, nargs="+", metavar="RESULT",
        help="run nothing: merge result files measured at different --concurrency into --json (+ its PNG) and "
        "print the tables and issue 22's targets",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.merge:
        return _merge_main(p, args)
    model = Path(args.model) if args.model else default_model_path()
    levels = [int(x) for x in args.concurrency.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or modes[0] != "fp32" or any(m not in WEIGHT_MODES for m in modes):
        p.error(f"--modes must start with fp32 (the reference) and name modes of {sorted(WEIGHT_MODES)}")
    if args.fp32_dense:
        modes.insert(1, "fp32-dense")
    if args.fp32_no_gemm:
        modes.insert(1, "fp32-nogemm")
    torch.set_num_threads(args.num_threads)
    llama_bin, llama_skip = (None, "") if model.suffix != ".gguf" else find_binary(args.llama_cpp)
    if model.suffix != ".gguf":
        llama_skip = "the model is not a GGUF file: llama.cpp column skipped"
    if llama_skip:
        print(llama_skip, flush=True)

    rss0 = _rss_mb()
    engines: dict[str, TorchEngine] = {}
    rss_loaded: dict[str, float] = {}
    for m in modes:
        before = _rss_mb()
        engines[m] = TorchEngine(
            model, weights=m.split("-")[0], kv_cache_bytes=args.kv_cache_mb << 20, max_num_seqs=max(levels),
            max_num_batched_tokens=args.max_num_batched_tokens, num_threads=args.num_threads,
            block_kernels=not m.endswith("-dense"),
        )  # fmt: skip
        if m.endswith("-nogemm"):
            without_block_gemm(engines[m].model)  # more than 8 rows: the dense copy's GEMM, as before
        rss_loaded[m] = _rss_mb() - before
    card, tok_json = load_model_source(model)
    tok = Tokenizer.from_card(card, tok_json)
    assert card.chat_template
    eos = set(card.eos_token_ids)
    works = {
        c: build_workload(
            tok,
            card.chat_template,
            card.special_tokens_map(),
            max(c * args.requests_per_client, 4),
            args.min_tokens,
            args.max_tokens,
            args.seed + c,
        )
        for c in levels
    }
    hf: Any = None
    if not args.no_baseline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import transformers

        if model.is_dir():
            hf = transformers.AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
        else:
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                str(model.parent), gguf_file=model.name, dtype=torch.float32
            ).eval()
    systems = [f"ours-{m}" for m in modes] + (["transformers"] if hf is not None else [])
    systems += ["llama.cpp"] if llama_bin is not None else []
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {s: {c: [] for c in levels} for s in systems}
    pad = min(eos)

    async def ours_phase() -> dict[str, Any]:
        for e in engines.values():
            await e.start()
        try:
            for rnd in range(args.rounds):
                order = systems[rnd % len(systems) :] + systems[: rnd % len(systems)]
                for c in levels:
                    w = works[c]
                    for name in order:
                        if name.startswith("ours-"):
                            if not args.keep_prefix_cache:  # every round cold, as transformers and llama.cpp are
                                engines[name[5:]].reset_prefix_cache()
                            r = await run_ours(engines[name[5:]], w, c, f"{name}-r{rnd}")
                        elif name == "transformers":
                            r = run_hf(hf, w, c, eos, pad)
                        else:
                            assert llama_bin is not None
                            mean_p = round(sum(len(ids) for ids, _ in w) / len(w))
                            mean_o = max(2, round(sum(len(o) for o in runs["ours-fp32"][c][-1]["outputs"]) / len(w)))
                            r = run_batched(llama_bin, model, mean_p, mean_o, c, args.num_threads, 900)
                        runs[name][c].append(r)
                        print(f"round {rnd} {name} c={c}: {_fmt(r)}, decode {r['decode_tokens_per_s']:.1f}", flush=True)
            fp32 = engines["fp32"]
            ttft = await ttft_prefix(fp32, tok, fp32.config.vocab_size, args.ttft_reps, args.seed)
            print(f"ttft cold {ttft['cold_median_s']:.3f}s warm {ttft['warm_median_s']:.3f}s", flush=True)
            return {"ttft": ttft, "stats": {m: e.stats() for m, e in engines.items()}}
        finally:
            for e in engines.values():
                await e.stop()

    phase = asyncio.run(ours_phase())
    stats = phase["stats"]

    throughput = []
    for c in levels:
        row: dict[str, Any] = {"concurrency": c, "requests": len(works[c]), "systems": {}}
        for name in systems:
            rs = runs[name][c]
            row["systems"][name] = {
                "tokens_per_s": _spread([r["tokens_per_s"] for r in rs]),
                "decode_tokens_per_s": _spread([r["decode_tokens_per_s"] for r in rs]),
                "per_round": [_row(r) for r in rs],
            }
        ratios: dict[str, Any] = {}
        for name in systems:
            for base in ("transformers", "llama.cpp"):
                if name.startswith("ours-") and base in runs:
                    for key in ("tokens_per_s", "decode_tokens_per_s"):
                        xs = [a[key] / b[key] for a, b in zip(runs[name][c], runs[base][c], strict=True)]
                        ratios[f"{name}/{base} {key}"] = _spread(xs)
        row["ratios_per_round"] = ratios
        if "transformers" in runs:
            ref = [o for r in runs["ours-fp32"][c] for o in r["outputs"]]
            other = [o for r in runs["transformers"][c] for o in r["outputs"]]
            row["fp32_vs_transformers"] = agreement(ref, other)
        throughput.append(row)

    accuracy: dict[str, Any] = {}
    text_ids = tok.encode(TEXT)
    ref_out = [o for c in levels for o in runs["ours-fp32"][c][0]["outputs"]]
    for m in modes:
        mine = [o for c in levels for o in runs[f"ours-{m}"][c][0]["outputs"]]
        accuracy[m] = agreement(ref_out, mine) | {
            "perplexity": perplexity(engines[m], text_ids),
            "decode_perplexity": decode_perplexity(engines[m], text_ids),
        }
    if hf is not None:
        accuracy["transformers"] = {"perplexity": hf_perplexity(hf, text_ids)}
    accuracy["text_tokens"] = len(text_ids)

    limits: dict[str, Any] = {} if args.no_limits else measure(engines["fp32"].config)
    if limits:
        read = limits["bandwidth"]["read_gb_s"]
        limits["modes"] = {}
        for m in modes:
            low = levels[0]
            steps = _median([r["decode_tokens_per_s"] for r in runs[f"ours-{m}"][low]]) / low  # decode steps/s
            wb = stats[m]["weight_bytes"]
            limits["modes"][m] = {
                "concurrency": low,
                "weight_bytes_per_step": wb,
                "decode_step_s": 1 / steps if steps else None,
                "weights_read_gb_s": wb * steps / 1e9,
                "share_of_read_bandwidth": wb * steps / 1e9 / read,
                "bandwidth_floor_tok_s": read * 1e9 / wb * low,
            }
            # the largest level: matmul arithmetic of one decode step of that many rows, and what was achieved
            top = levels[-1]
            many = _median([r["decode_tokens_per_s"] for r in runs[f"ours-{m}"][top]])
            gflop = 2 * _matmul_weights(engines[m].config) * top / 1e9
            limits["modes"][m]["at_top_concurrency"] = {
                "concurrency": top,
                "matmul_gflop_per_step": gflop,
                "decode_step_s": top / many if many else None,
                "achieved_gflop_s": gflop * many / top,
                "weights_read_gb_s": wb * many / top / 1e9,
            }

    ttft = phase["ttft"]
    memory = {
        "rss_before_load_mb": rss0,
        "rss_growth_per_engine_load_mb": rss_loaded,
        "weights_mb": {m: stats[m]["weight_bytes"] / 2**20 for m in modes},
        "kv_cache_mb": stats["fp32"]["kv_cache_bytes"] / 2**20,
        "kv_cache_flag_mb": args.kv_cache_mb,
    }
    result = {
        "model": str(model),
        "num_threads": args.num_threads,
        "rounds": args.rounds,
        "versions": _versions(version(llama_bin) if llama_bin else None),
        "llama_cpp": str(llama_bin) if llama_bin else llama_skip,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "workload": {
            "max_tokens_range": [args.min_tokens, args.max_tokens],
            "requests_per_client": args.requests_per_client,
            "greedy": True,
            "stops_at_eos": True,
            "prefix_cache_kept_between_rounds": args.keep_prefix_cache,
            "llama_cpp": "llama-batched-bench: concurrency sequences of the level's mean prompt and output length",
        },
        "throughput": throughput,
        "accuracy": accuracy,
        "limits": limits,
        "ttft": ttft | {"speedup": ttft["cold_median_s"] / ttft["warm_median_s"]},
        "memory": memory,
        "engine_stats": stats,
        "targets": {
            "fp32 single stream vs transformers": ">= 2x",
            "fp32 at 32 concurrent vs transformers": ">= 4x",
            "best mode single stream vs llama.cpp": ">= 0.7x",
            "ttft_speedup_on_prefix_hit": ">= 5x",
        },
    }
    write_json(args.json, result)
    save_plot(lambda png: plot(result, png), args.json.with_suffix(".png"))
    print(json.dumps({"ratios": {t["concurrency"]: t["ratios_per_round"] for t in throughput}, "accuracy": accuracy},
                     indent=1, default=lambda o: round(o, 3) if isinstance(o, float) else str(o)))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
