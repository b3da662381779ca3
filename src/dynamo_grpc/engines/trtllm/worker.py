"""``dynamo-grpc worker --engine trtllm``: its flags and the engine built from them.

Imported only for that engine; ``tensorrt_llm`` itself is imported when the engine is built, so a
machine without it gets one line naming the extra, before the worker binds or registers anything.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dynamo_grpc.engines.base import Engine
from dynamo_grpc.models.card import ModelCard, load_model_source

from .api import TrtllmMissing, load_api
from .config import TrtllmConfig

#: worker flags that only the mocker or torch engines read, with their defaults: given to trtllm, they are refused
_OTHER_ENGINES: dict[str, object] = {
    "num_threads": None,
    "kv_cache_mib": None,
    "dtype": None,
    "torch_weights": None,
    "torch_kernels": None,
    "speedup_ratio": 1.0,
    "seed": 0,
    "eos_probability": 0.0,
}


def add_trtllm_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("trtllm engine (TensorRT-LLM; needs the 'trtllm' extra and a GPU)")
    g.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="trtllm: HF directory with tokenizer.json and config.json when --model is a built engine dir",
    )
    g.add_argument(
        "--free-gpu-memory-fraction",
        type=float,
        default=None,
        help="trtllm: share of free GPU memory for the KV cache (TensorRT-LLM's default 0.9); "
        "refused together with --num-gpu-blocks, which sets KvCacheConfig.max_tokens instead",
    )
    g.add_argument(
        "--kv-event-buffer",
        type=int,
        default=16384,
        help="trtllm: KvCacheConfig.event_buffer_max_size (KV events kept between the adapter's reads)",
    )


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flags of other engines (nothing is silently ignored), and trtllm flags given to other engines."""
    if args.engine != "trtllm":
        own: tuple[tuple[str, object], ...] = (
            ("tokenizer", None),
            ("free_gpu_memory_fraction", None),
            ("kv_event_buffer", 16384),
        )
        for name, default in own:
            if getattr(args, name) != default:
                raise ValueError(
                    f"--{name.replace('_', '-')} is a trtllm flag; --engine {args.engine} does not read it"
                )
        return
    for name, default in _OTHER_ENGINES.items():
        if getattr(args, name) != default:
            raise ValueError(f"--{name.replace('_', '-')} is not read by --engine trtllm (TensorRT-LLM sets it itself)")
    if args.model is None:
        raise ValueError("--engine trtllm needs --model: a HF checkpoint dir or a TensorRT engine dir")
    if args.num_gpu_blocks is not None and args.free_gpu_memory_fraction is not None:
        raise ValueError("--num-gpu-blocks and --free-gpu-memory-fraction both size the KV cache: give one")


def build_trtllm(args: argparse.Namespace) -> tuple[Engine, ModelCard, bytes]:
    """The TrtllmEngine for the worker's flags; SystemExit with one line when TensorRT-LLM is missing."""
    try:
        api = load_api()
    except TrtllmMissing as e:
        raise SystemExit(f"dynamo-grpc worker: {e}") from None
    check_flags(args)
    from .engine import TrtllmEngine

    model = Path(args.model)
    if model.is_file():
        raise ValueError(f"--model {model}: TensorRT-LLM loads a HF checkpoint dir or an engine dir, not a file")
    card, tokenizer_json = load_model_source(args.tokenizer or model, args.model_name)
    if card.vocab_size <= 0:
        from dynamo_grpc.tokens.tokenizer import Tokenizer

        card.vocab_size = Tokenizer.from_card(card, tokenizer_json).vocab_size
    cfg = TrtllmConfig(
        model=model,
        block_size=args.block_size,
        num_blocks=args.num_gpu_blocks,
        free_gpu_memory_fraction=args.free_gpu_memory_fraction,
        max_num_seqs=args.max_num_seqs or 256,
        max_num_batched_tokens=args.max_num_batched_tokens or 8192,
        max_waiting=args.max_waiting_requests,
        enable_prefix_caching=not args.no_prefix_caching,
        event_buffer_max_size=args.kv_event_buffer,
    )
    engine = TrtllmEngine(cfg, card, api)
    return engine, card, tokenizer_json
