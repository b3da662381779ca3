"""The KV router's flags, defined once: `dynamo-grpc router` and the frontend's embedded router share them.

Names follow Dynamo's `kv_router_args.py` (`--router-*`, approximate mode is `--no-router-kv-events`);
every flag also reads `DYN_<FLAG>` (Dynamo's variable where it has one). The router's older short names
(`--mode`, `--temperature`, ...) still parse for one release and print a deprecation warning.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from dynamo_grpc.router.config import RouterConfig

#: RouterConfig field -> the flag that sets it (errors name the flag)
FLAG_OF = {
    "block_size": "--router-block-size",
    "max_indexed_blocks": "--router-max-tree-size",
    "temperature": "--router-temperature",
    "prefill_load_scale": "--router-prefill-load-scale",
    "busy_threshold": "--router-busy-threshold",
    "approx_ttl_s": "--router-ttl-secs",
    "resync_interval_s": "--router-resync-interval",
    "seed": "--router-seed",
    "host_overlap_weight": "--router-host-overlap-weight",
    "disk_overlap_weight": "--router-disk-overlap-weight",
    "queue_threshold": "--router-queue-threshold",
    "max_num_batched_tokens": "--router-max-num-batched-tokens",
    "queue_size": "--router-queue-size",
    "queue_policy": "--router-queue-policy",
    "queue_age_cap_s": "--router-queue-age-cap-secs",
    "predicted_ttl_s": "--router-predicted-ttl-secs",
}

#: what `--router-mode` takes (approximate KV routing is `--router-mode kv --no-router-kv-events`)
ROUTING_MODES = ("kv", "round-robin", "random")


class _DeprecatedAlias(argparse.Action):
    """Stores like the new flag, and says so when the old spelling is used."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kw: Any) -> None:
        super().__init__(option_strings, dest, **kw)
        self.canonical = option_strings[0]

    def __call__(
        self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any, option_string: str | None = None
    ) -> None:
        if option_string is not None and option_string != self.canonical:
            print(
                f"{parser.prog}: warning: {option_string} is deprecated, use {self.canonical}",
                file=sys.stderr,
            )
        setattr(ns, self.dest, values)


class _LegacyMode(argparse.Action):
    """The router's old `--mode {kv,approx,round-robin,random}`: approx is now `--no-router-kv-events`."""

    def __call__(
        self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any, option_string: str | None = None
    ) -> None:
        hint = "--router-mode kv --no-router-kv-events" if values == "approx" else f"--router-mode {values}"
        print(f"{parser.prog}: warning: {option_string} is deprecated, use {hint}", file=sys.stderr)
        ns.router_mode = "kv" if values == "approx" else values
        if values == "approx":
            ns.router_kv_events = False


def _env(flag: str, default: object, choices: Sequence[str] | None = None) -> object:
    """DYN_<FLAG> (e.g. DYN_ROUTER_TEMPERATURE) or the default; argparse applies the flag's type to it.

    argparse does not check a default against `choices`, so a bad variable is refused here.
    """
    name = "DYN_" + flag.lstrip("-").replace("-", "_").upper()
    value = os.environ.get(name, default)
    if choices is not None and value not in choices:
        raise SystemExit(f"{name}={value!r}: expected one of {', '.join(choices)}")
    return value


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    if raw.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if raw.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{name}={raw!r}: expected true or false")


def add_router_flags(parser: argparse.ArgumentParser, extra_modes: Sequence[str] = ()) -> None:
    """Add the router's flags (one argument group). `extra_modes` lets the frontend add `kv-service`."""
    d = RouterConfig()
    g = parser.add_argument_group("KV router")

    def add(flag: str, old: str | None, default: object, **kw: Any) -> None:
        names = [flag, old] if old else [flag]
        if old:
            kw["help"] += f" (deprecated spelling: {old})"
        if "choices" not in kw:
            kw["metavar"] = "N" if kw.get("type") is int else "X"
        g.add_argument(*names, action=_DeprecatedAlias, default=_env(flag, default, kw.get("choices")), **kw)

    add(
        "--router-mode",
        None,
        d.mode,
        choices=[*ROUTING_MODES, *extra_modes],
        help="kv: KV-cache-aware (default); round-robin and random need no index",
    )
    g.add_argument("--mode", choices=[*ROUTING_MODES, "approx"], action=_LegacyMode, help=argparse.SUPPRESS)
    g.add_argument(
        "--router-kv-events",
        action=argparse.BooleanOptionalAction,
        default=_env_bool("DYN_ROUTER_USE_KV_EVENTS", True),
        help="kv: follow the workers' KV events; --no-router-kv-events routes approximately (assume what was routed "
        "is cached for --router-ttl-secs), for engines that cannot publish events",
    )
    add("--router-temperature", "--temperature", d.temperature, type=float, help="kv: 0 = argmin of cost, >0 softmax")
    add(
        "--router-prefill-load-scale",
        "--prefill-load-scale",
        d.prefill_load_scale,
        type=float,
        help="kv: weight of new prefill blocks against active decode blocks in the cost",
    )
    add(
        "--router-busy-threshold",
        "--busy-threshold",
        d.busy_threshold,
        type=float,
        help="KV usage fraction over which a worker is skipped; all busy = wait in the router queue "
        "(RESOURCE_EXHAUSTED without one); 1 = off",
    )
    add(
        "--router-queue-threshold",
        None,
        d.queue_threshold,
        type=float,
        help="kv: a worker with more pending prefill tokens than this many times "
        "--router-max-num-batched-tokens is busy too; 0 = off",
    )
    add(
        "--router-max-num-batched-tokens",
        None,
        d.max_num_batched_tokens,
        type=int,
        help="kv: the workers' prefill tokens per engine step, the unit of --router-queue-threshold",
    )
    add(
        "--router-queue-size",
        None,
        d.queue_size,
        type=int,
        help="requests that may wait in the router while every worker is busy; beyond it RESOURCE_EXHAUSTED; "
        "0 = no queue (RESOURCE_EXHAUSTED at once)",
    )
    add(
        "--router-queue-policy",
        None,
        d.queue_policy,
        choices=["fcfs", "wspt", "cache-aware"],
        help="order of the router queue: fcfs (arrival), wspt (fewest uncached prompt tokens first) or "
        "cache-aware (kv: when a worker has room, the waiting request with the most KV cached there, host and "
        "disk hits credited by their tier weights; see --router-queue-age-cap-secs)",
    )
    add(
        "--router-queue-age-cap-secs",
        None,
        d.queue_age_cap_s,
        type=float,
        help="cache-aware queue: a request that has waited this long goes first, whatever is cached where "
        "(bounds the unfairness); 0 = no cap",
    )
    add(
        "--router-predicted-ttl-secs",
        None,
        d.predicted_ttl_s,
        type=float,
        help="kv: seconds a routed prompt counts as cached on its worker until its KV events confirm it; 0 = off",
    )
    add(
        "--router-block-size",
        "--block-size",
        d.block_size,
        type=int,
        help="tokens per KV block; 0 = from the model card / workers",
    )
    add(
        "--router-max-tree-size",
        "--max-indexed-blocks",
        d.max_indexed_blocks,
        type=int,
        help="bound on indexed block hashes (least recently used pruned to 80%%); 0 = unbounded",
    )
    add(
        "--router-ttl-secs",
        "--approx-ttl",
        d.approx_ttl_s,
        type=float,
        help="approximate mode: seconds a routed prefix is assumed cached",
    )
    add(
        "--router-resync-interval",
        "--resync-interval",
        d.resync_interval_s,
        type=float,
        help="kv: seconds between anti-entropy Replays per worker; 0 = off",
    )
    add("--router-seed", "--seed", None, type=int, help="seed for tie-breaks and sampling (default: random)")
    add(
        "--router-host-overlap-weight",
        None,
        d.host_overlap_weight,
        type=float,
        help="kv: overlap credit of a prefix block a worker holds in host memory (G2); a device block is 1",
    )
    add(
        "--router-disk-overlap-weight",
        None,
        d.disk_overlap_weight,
        type=float,
        help="kv: overlap credit of a prefix block a worker holds on local disk (G3)",
    )


#: the modes (as RouterConfig.mode, plus the frontend's kv-service) in which each flag does something
_ANY = {"kv", "approx", "round-robin", "random"}
USED_IN: dict[str, set[str]] = {
    "router_kv_events": {"kv", "approx"},
    "router_temperature": {"kv", "approx"},
    "router_prefill_load_scale": {"kv", "approx"},
    "router_max_tree_size": {"kv", "approx"},
    "router_ttl_secs": {"approx"},
    "router_resync_interval": {"kv"},
    "router_busy_threshold": _ANY,
    "router_queue_threshold": {"kv", "approx"},
    "router_max_num_batched_tokens": {"kv", "approx"},
    "router_queue_size": _ANY,
    "router_queue_policy": _ANY,
    "router_queue_age_cap_secs": {"kv", "approx"},
    "router_predicted_ttl_secs": {"kv"},
    "router_block_size": _ANY,
    "router_seed": _ANY,
    "router_host_overlap_weight": {"kv"},
    "router_disk_overlap_weight": {"kv"},
}


def _parsed_default(action: argparse.Action) -> object:
    """An action's default as a parsed value would be (a DYN_* variable gives it as a string)."""
    if isinstance(action.default, str) and callable(action.type):
        return action.type(action.default)
    return action.default


def refuse_unused_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """ValueError naming every router flag set away from its default that the chosen mode would ignore.

    kv-service (the frontend asking a remote router) uses none of them: that router has its own flags.
    """
    mode = args.router_mode
    if mode == "kv" and not args.router_kv_events:
        mode = "approx"
    defaults = {a.dest: _parsed_default(a) for a in parser._actions if a.dest in USED_IN}
    unused = [
        "--" + dest.replace("_", "-")
        for dest, modes in USED_IN.items()
        if mode not in modes and getattr(args, dest) != defaults[dest]
    ]
    if unused:
        shown = "kv --no-router-kv-events" if mode == "approx" else mode
        raise ValueError(f"{', '.join(unused)}: no effect with --router-mode {shown}")


def router_config_from_args(args: argparse.Namespace, namespace: str = "dynamo", model: str = "") -> RouterConfig:
    """The RouterConfig the flags describe, validated (ValueError names the flag).

    The frontend's `kv-service` (a remote router) is checked as `kv`: its flags must still be valid.
    """
    mode = "kv" if args.router_mode == "kv-service" else args.router_mode
    if mode == "kv" and not args.router_kv_events:
        mode = "approx"
    cfg = RouterConfig(
        mode=mode,
        block_size=args.router_block_size,
        max_indexed_blocks=args.router_max_tree_size,
        temperature=args.router_temperature,
        prefill_load_scale=args.router_prefill_load_scale,
        busy_threshold=args.router_busy_threshold,
        queue_threshold=args.router_queue_threshold,
        max_num_batched_tokens=args.router_max_num_batched_tokens,
        queue_size=args.router_queue_size,
        queue_policy=args.router_queue_policy,
        queue_age_cap_s=args.router_queue_age_cap_secs,
        predicted_ttl_s=args.router_predicted_ttl_secs,
        approx_ttl_s=args.router_ttl_secs,
        namespace=namespace,
        model=model,
        resync_interval_s=args.router_resync_interval,
        seed=args.router_seed,
        host_overlap_weight=args.router_host_overlap_weight,
        disk_overlap_weight=args.router_disk_overlap_weight,
    )
    bad = cfg.problems()
    if bad:
        raise ValueError("; ".join(f"{FLAG_OF.get(field, field)} {msg}" for field, msg in bad))
    return cfg
