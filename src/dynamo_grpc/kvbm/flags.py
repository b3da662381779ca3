"""The worker's KV tier flags, defined once (every flag also reads DYN_<FLAG> through envflags).

``--kv-host-mib`` (G2), ``--kv-disk-dir`` + ``--kv-disk-mib`` (G3) for the mocker and torch
engines; ``--kv-host-gbps`` / ``--kv-disk-gbps`` are the mocker's modelled bandwidths (torch
moves real bytes, so they are refused there). TensorRT-LLM manages its own KV memory: any tier
flag with ``--engine trtllm`` is refused, as is a tier with ``--no-prefix-caching`` (nothing to hit).
"""

from __future__ import annotations

import argparse

from .config import MIB, KvbmConfig

_D = KvbmConfig()


def add_kvbm_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("KV block manager (tiers below the engine's KV cache)")
    g.add_argument("--kv-host-mib", type=int, default=0, help="G2: host memory for offloaded KV blocks, MiB (0: off)")
    g.add_argument("--kv-disk-dir", default=None, help="G3: directory for offloaded KV blocks (reused on restart)")
    g.add_argument("--kv-disk-mib", type=int, default=0, help="G3: disk space for offloaded KV blocks, MiB")
    g.add_argument(
        "--kv-host-gbps", type=float, default=_D.host_gbps, help="mocker: modelled G1<->G2 bandwidth, GB/s"
    )
    g.add_argument("--kv-disk-gbps", type=float, default=_D.disk_gbps, help="mocker: modelled G3 read bandwidth, GB/s")


def kvbm_config_from_args(args: argparse.Namespace) -> KvbmConfig:
    """The KvbmConfig the flags describe; ValueError naming the flag when it cannot be honoured."""
    cfg = KvbmConfig(
        host_bytes=args.kv_host_mib * MIB,
        disk_dir=args.kv_disk_dir,
        disk_bytes=args.kv_disk_mib * MIB,
        host_gbps=args.kv_host_gbps,
        disk_gbps=args.kv_disk_gbps,
    )
    flag = {
        "host_bytes": "--kv-host-mib",
        "disk_dir": "--kv-disk-dir",
        "disk_bytes": "--kv-disk-mib",
        "host_gbps": "--kv-host-gbps",
        "disk_gbps": "--kv-disk-gbps",
    }
    bad = cfg.problems()
    if bad:
        raise ValueError("; ".join(f"{flag.get(f, f)} {m}" for f, m in bad))
    engine = getattr(args, "engine", "mocker")
    set_flags = [flag[f] for f in ("host_bytes", "disk_dir", "disk_bytes") if getattr(cfg, f)]
    if set_flags and engine == "trtllm":
        raise ValueError(f"{', '.join(set_flags)}: not supported with --engine trtllm (it manages its own KV memory)")
    if set_flags and getattr(args, "no_prefix_caching", False):
        raise ValueError(f"{', '.join(set_flags)}: KV tiers need prefix caching (drop --no-prefix-caching)")
    if engine != "mocker":
        modelled = [flag[f] for f in ("host_gbps", "disk_gbps") if getattr(cfg, f) != getattr(_D, f)]
        if modelled:
            raise ValueError(f"{', '.join(modelled)}: only the mocker models bandwidth (--engine {engine} moves bytes)")
    return cfg
