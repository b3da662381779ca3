"""``dynamo-grpc consul-dev``: the embedded Consul-compatible dev agent as a process role."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys

from dynamo_grpc.consul_dev.acl import ACL
from dynamo_grpc.consul_dev.server import ConsulDevServer, server_tls, write_addr_file
from dynamo_grpc.envflags import env_defaults
from dynamo_grpc.logs import add_log_flag, setup_logging

log = logging.getLogger("dynamo_grpc.consul_dev")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynamo-grpc consul-dev",
        description="Embedded agent speaking the subset of Consul's HTTP API that dynamo-grpc uses "
        "(services with TTL checks, health, KV, sessions). State is in memory, like `consul agent -dev`.",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8500, help="port to bind; 0 picks a free one (default 8500)")
    p.add_argument("--addr-file", default=None, help="write the bound http://host:port here once listening")
    p.add_argument(
        "--acl",
        action="store_true",
        help="enable ACLs (Consul's acl.enabled) with default policy deny",
    )
    p.add_argument(
        "--acl-default-policy",
        choices=["allow", "deny"],
        default=None,
        help="what no rule covers (implies --acl; default deny)",
    )
    p.add_argument(
        "--acl-bootstrap-token",
        "--acl-token",
        dest="acl_bootstrap_token",
        default=os.environ.get("CONSUL_DEV_ACL_TOKEN", ""),  # older name; CONSUL_DEV_ACL_BOOTSTRAP_TOKEN wins
        help="the initial management token's SecretID (implies --acl; env CONSUL_DEV_ACL_BOOTSTRAP_TOKEN; "
        "--acl-token is the older name). Without it, PUT /v1/acl/bootstrap mints one",
    )
    p.add_argument(
        "--acl-file",
        default=None,
        help='JSON {"policies": [...], "tokens": [...]} (ACL API body shapes) loaded at start (implies --acl)',
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,  # CONSUL_DEV_TIME_SCALE through env_defaults (a bad value is named, not a traceback)
        help="TEST ONLY: multiply the agent's own timers (DeregisterCriticalServiceAfter and its 1m "
        "minimum, the 30s reaper, session TTLs, lock delays) by this factor",
    )
    p.add_argument("--tls-cert", default=None, help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", default=None, help="private key of --tls-cert (PEM)")
    p.add_argument("--tls-client-ca", default=None, help="require client certificates signed by this CA")
    p.add_argument(
        "--trace-file",
        default=None,
        help="DEBUG: append one JSON line per answered blocking health query (write, wake-up and answer "
        "times on the monotonic clock, tags, bytes) to this file; `bench discovery --trace` reads it",
    )
    add_log_flag(p)
    # its own family (CONSUL_DEV_TIME_SCALE, ...): consul-dev keeps its TLS apart from the mesh's DYN_TLS_*
    return env_defaults(p, prefix="CONSUL_DEV_")


#: the collector's young-generation threshold in the agent process (Python's default is 700)
GC_GEN0_THRESHOLD = 20_000


def _quiet_collector() -> None:
    """Collect less often. Each blocking query's request lives for its whole wait, so with hundreds parked
    the default thresholds promote them, and each write's rebuilt rows, to the old generation, and full
    collections followed every few seconds: 40-60 ms pauses of the agent's one event loop, up to 270 ms on
    the loaded VM, in the middle of answering a change (consul-dev --trace-file recorded them). Most of the
    agent's objects die by reference count; counting 20,000 net allocations before a young collection left
    no pause of 1 ms or more in the same 10 s of 40 changes to 20 watchers of 1,000 instances."""
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


async def _serve(args: argparse.Namespace) -> int:
    _quiet_collector()
    tls = server_tls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    acl = acl_from_args(args)
    server = ConsulDevServer(
        args.host, args.port, acl=acl, time_scale=args.time_scale, ssl_context=tls, trace_file=args.trace_file
    )
    address = await server.start()
    print(f"consul-dev listening on {address}", flush=True)
    acl_mode = "off" if acl is None else "allow" if acl.default_allow else "deny"
    log.info("consul-dev listening on %s (acl=%s, time_scale=%g)", address, acl_mode, args.time_scale)
    if args.addr_file:
        write_addr_file(args.addr_file, address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()
    return 0


def acl_from_args(args: argparse.Namespace) -> ACL | None:
    """The ACL system the flags ask for, or None when ACLs are off. Raises ValueError on a bad file."""
    if not (args.acl or args.acl_default_policy or args.acl_bootstrap_token or args.acl_file):
        return None
    acl = ACL(args.acl_default_policy or "deny", initial_management=args.acl_bootstrap_token)
    if args.acl_file:
        try:
            with open(args.acl_file, encoding="utf-8") as fh:
                doc = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--acl-file {args.acl_file}: {exc}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"--acl-file {args.acl_file}: expected a JSON object")
        acl.load(doc)
    return acl


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        acl_from_args(args)  # refuse a bad ACL file before binding anything
    except ValueError as exc:
        print(f"consul-dev: {exc}", file=sys.stderr)
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        print("--tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.time_scale <= 0:
        print("--time-scale must be > 0", file=sys.stderr)
        return 2
    setup_logging(args.log_level, args.log_format)
    try:
        return asyncio.run(_serve(args))
    except OSError as exc:
        print(f"consul-dev: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
