"""`dynamo-grpc worker`: host an engine (mocker | torch | trtllm) behind the worker services.

python -m dynamo_grpc.worker.main --engine mocker --speedup-ratio 10 --ready-file /tmp/w.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
from pathlib import Path

from dynamo_grpc.discovery.pools import add_pool_flag
from dynamo_grpc.engines.base import Engine
from dynamo_grpc.engines.core.flags import add_schedule_flags, schedule_policy_from_args
from dynamo_grpc.engines.trtllm.worker import add_trtllm_flags, build_trtllm
from dynamo_grpc.engines.trtllm.worker import check_flags as check_trtllm_flags
from dynamo_grpc.envflags import env_defaults
from dynamo_grpc.events.curve import CurveConfig, add_curve_flags
from dynamo_grpc.kvbm.flags import add_kvbm_flags, kvbm_config_from_args
from dynamo_grpc.launch.children import check_ports
from dynamo_grpc.logs import add_log_flag, setup_logging
from dynamo_grpc.models.card import ModelCard, default_model_path, load_model_source
from dynamo_grpc.observability import add_tracing_flags, setup_tracing, shutdown_tracing
from dynamo_grpc.transport import TlsConfig, add_tls_flags, run_until_signal, use_tls
from dynamo_grpc.transport.addresses import add_address_flags, advertise_host, check_metrics_port
from dynamo_grpc.worker.app import ROLES, WorkerApp, WorkerSettings

#: the mocker models a GPU engine's bf16 KV cache when it computes bytes per block
MOCKER_KV_DTYPE = "bfloat16"

log = logging.getLogger("dynamo_grpc.worker")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynamo-grpc worker",
        description="Serve an engine over Prefill/Decode/ModelFiles/KvEvents, registered in Consul.",
    )
    p.add_argument("--engine", choices=["mocker", "torch", "trtllm"], default="mocker")
    p.add_argument("--model", type=Path, default=None, help="GGUF file or HF directory (default: SmolLM2-135M GGUF)")
    p.add_argument("--model-name", default=None, help="served model name (default: from the model card)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind gRPC, ZMQ and metrics to")
    p.add_argument("--port", type=int, default=0, help="gRPC port (0: any free port)")
    p.add_argument("--consul", default=None, help="Consul address (default: $CONSUL_HTTP_ADDR or 127.0.0.1:8500)")
    p.add_argument("--no-consul", action="store_true", help="do not register (standalone use)")
    p.add_argument("--namespace", default="dynamo")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--num-gpu-blocks", type=int, default=None, help="KV blocks (mocker default 16384)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="running sequences per step (mocker 256)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per step (mocker 8192)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument(
        "--max-waiting-requests",
        type=int,
        default=4096,
        help="requests the engine queues before refusing new ones with RESOURCE_EXHAUSTED 'overloaded'",
    )
    p.add_argument("--num-threads", type=int, default=None, help="torch: intra-op threads (default: torch's choice)")
    p.add_argument("--kv-cache-mib", type=int, default=None, help="torch: KV cache size in MiB (default 512)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="torch: compute and KV cache dtype (default float32, or what --torch-weights implies)",
    )
    p.add_argument(
        "--torch-weights",
        choices=["fp32", "bf16", "int8", "int4", "w4a8"],
        default=None,
        help="torch: weight format; fp32 is exact (default), bf16/int8/int4/w4a8 are faster and change numerics "
        "(int8/int4 compute in bfloat16; int4 keeps a GGUF's Q4_1 blocks as they are; w4a8 multiplies those blocks "
        "by int8-quantised activations as llama.cpp does, fp32 elsewhere, and needs a C compiler); "
        "see docs/torch-engine.md",
    )
    p.add_argument(
        "--torch-kernels",
        choices=["auto", "off"],
        default=None,
        help="torch fp32: matmuls (decode and prefill) read the GGUF's Q4_1/Q8_0 blocks through C kernels built on "
        "first use (auto, the default: same weights, fewer bytes per step; dense fallback without a C compiler) or "
        "off (dense fp32 matmuls); see docs/torch-engine.md",
    )
    p.add_argument("--speedup-ratio", type=float, default=1.0, help="mocker: divide simulated step times by this")
    p.add_argument("--seed", type=int, default=0, help="mocker: seed of the generated tokens")
    p.add_argument("--eos-probability", type=float, default=0.0, help="mocker: chance per token to draw EOS")
    p.add_argument(
        "--role",
        choices=list(ROLES),
        default="both",
        help="disaggregation role, registered as Consul tag role=<role>: prefill workers get the prompts a "
        "frontend sends to remote prefill, decode workers the decodes (pulling KV), both = aggregated",
    )
    p.add_argument(
        "--kv-lease-seconds",
        type=float,
        default=30.0,
        help="how long a prefill's KV blocks stay pinned for a decode worker's pull before they are freed",
    )
    p.add_argument(
        "--kv-transfer-gbps",
        type=float,
        default=0.0,
        help="mocker: modelled KV transfer speed in gigabytes per second (0: transfers take no time); "
        "refused on other engines, which move real bytes",
    )
    p.add_argument(
        "--kv-transfer-path",
        choices=["socket", "grpc"],
        default="socket",
        help="how KV bytes move between prefill and decode workers: socket = a one-shot TCP connection beside "
        "the Pull stream (TLS like gRPC; falls back to the stream when it cannot connect), grpc = the stream",
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        default=1,
        help="tokens per Decode message: 1 sends what is ready (no token waits); N > 1 holds a request's "
        "tokens until N are ready or it finishes (fewer messages, less CPU per request in every hop, tokens "
        "in bursts); the first token is always sent alone at once",
    )
    p.add_argument("--ttl", type=float, default=10.0, help="Consul TTL check, seconds")
    p.add_argument("--drain-grace", type=float, default=10.0, help="seconds in-flight streams get on SIGTERM")
    p.add_argument("--ready-file", type=Path, default=None, help="write {grpc_address, instance_id, zmq_endpoint}")
    add_log_flag(p)
    add_tracing_flags(p)
    add_curve_flags(p)
    add_trtllm_flags(p)
    add_kvbm_flags(p)
    add_schedule_flags(p)
    add_tls_flags(p, public=False)
    add_address_flags(p, zmq=True)
    add_pool_flag(p)
    return env_defaults(p)


def build_engine(args: argparse.Namespace) -> tuple[Engine, ModelCard, bytes]:
    kvbm = kvbm_config_from_args(args)  # refuses tier flags the chosen engine cannot honour
    schedule = schedule_policy_from_args(args)  # refuses lpm where the engine schedules itself (trtllm)
    if args.engine == "trtllm":
        return build_trtllm(args)  # imports tensorrt_llm: only for this engine
    check_trtllm_flags(args)
    path = args.model or default_model_path()
    if args.engine == "torch":
        from dynamo_grpc.engines.torch import TorchEngine  # imports torch: only for this engine

        torch_engine = TorchEngine(
            path,
            block_size=args.block_size,
            num_blocks=args.num_gpu_blocks,
            max_num_seqs=args.max_num_seqs or 32,
            max_num_batched_tokens=args.max_num_batched_tokens or 2048,
            served_name=args.model_name,
            enable_prefix_caching=not args.no_prefix_caching,
            num_threads=args.num_threads,
            kv_cache_bytes=None if args.kv_cache_mib is None else args.kv_cache_mib * 1024 * 1024,
            dtype=args.dtype,
            weights=args.torch_weights,
            block_kernels=args.torch_kernels != "off",
            max_waiting=args.max_waiting_requests,
            kvbm=kvbm,
            kv_lease_seconds=args.kv_lease_seconds,
            schedule_policy=schedule.policy,
            schedule_age_cap_s=schedule.age_cap_s,
        )
        return torch_engine, torch_engine.card, torch_engine.tokenizer_json

    for flag in ("dtype", "torch_weights", "torch_kernels"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag.replace('_', '-')} is a torch flag; --engine {args.engine} does not read it")
    from dynamo_grpc.engines.mocker import MockerConfig, MockerEngine

    card, tokenizer_json = load_model_source(path, args.model_name)
    card = dataclasses.replace(card, kv_dtype=card.kv_dtype or MOCKER_KV_DTYPE)
    vocab = card.vocab_size
    if vocab <= 0:
        from dynamo_grpc.tokens.tokenizer import Tokenizer

        vocab = Tokenizer.from_card(card, tokenizer_json).vocab_size
    cfg = MockerConfig(
        block_size=args.block_size,
        speedup_ratio=args.speedup_ratio,
        seed=args.seed,
        vocab_size=vocab,
        eos_token_ids=list(card.eos_token_ids),
        eos_probability=args.eos_probability,
        context_length=card.context_length,
        enable_prefix_caching=not args.no_prefix_caching,
        max_waiting=args.max_waiting_requests,
        kvbm=kvbm,
        kv_lease_seconds=args.kv_lease_seconds,
        schedule_policy=schedule.policy,
        schedule_age_cap_s=schedule.age_cap_s,
    )
    if args.num_gpu_blocks is not None:
        cfg.num_gpu_blocks = args.num_gpu_blocks
    if args.max_num_seqs is not None:
        cfg.max_num_seqs = args.max_num_seqs
    if args.max_num_batched_tokens is not None:
        cfg.max_num_batched_tokens = args.max_num_batched_tokens
    cfg.validate()
    return MockerEngine(cfg), card, tokenizer_json


async def serve(args: argparse.Namespace) -> int:
    engine, card, tokenizer_json = build_engine(args)
    settings = WorkerSettings(
        host=args.host,
        port=args.port,
        namespace=args.namespace,
        consul=args.consul,
        register=not args.no_consul,
        ttl_s=args.ttl,
        drain_grace_s=args.drain_grace,
        metrics_port=args.metrics_port,
        ready_file=args.ready_file,
        engine_name=args.engine,
        curve=CurveConfig.from_args(args),
        tls=args.tls,
        health_port=args.health_port,
        advertise_host=args.advertise_host,
        zmq_port=args.zmq_port,
        pool=args.pool,
        role=args.role,
        kv_transfer_gbps=args.kv_transfer_gbps,
        kv_transfer_path=args.kv_transfer_path,
        stream_interval=args.stream_interval,
    )
    app = WorkerApp(engine, card, tokenizer_json, settings)
    try:
        await app.start()
    except BaseException:
        await app.drain()
        raise
    print(f"worker {app.instance_id} serving {app.card.name} on {app.grpc_address}", flush=True)
    await run_until_signal(app.drain)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    setup_tracing("dynamo-worker", args.trace_file)
    args.tls = use_tls(TlsConfig.from_args(args, parser))  # the server and the worker's own clients
    try:
        check_metrics_port(args.metrics_port)
        advertise_host(args.host, args.advertise_host)
        kvbm_config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.max_waiting_requests < 1:
        build_parser().error("--max-waiting-requests must be >= 1")
    if args.stream_interval < 1:
        parser.error(f"--stream-interval must be >= 1, got {args.stream_interval}")
    if args.kv_lease_seconds <= 0:
        parser.error("--kv-lease-seconds must be positive")
    if args.kv_transfer_gbps < 0:
        parser.error("--kv-transfer-gbps must be >= 0")
    if args.kv_transfer_gbps and args.engine != "mocker":
        parser.error(f"--kv-transfer-gbps models the transfer on the mocker; the {args.engine} engine moves real bytes")
    for name in ("drain_grace", "ttl", "speedup_ratio"):
        if getattr(args, name) <= 0 and name != "drain_grace":
            build_parser().error(f"--{name.replace('_', '-')} must be positive")
    ports = [(args.port, "--port"), (args.metrics_port, "--metrics-port"), (args.zmq_port, "--zmq-port")]
    check_ports(args.host, [*ports, (args.health_port or -1, "--health-port")])
    try:
        return asyncio.run(serve(args))
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError) as e:
        log.error("worker failed to start: %s", e)
        return 2
    finally:
        shutdown_tracing()  # the last spans leave before the process does


if __name__ == "__main__":
    raise SystemExit(main())
