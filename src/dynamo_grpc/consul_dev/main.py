"""``dynamo-grpc consul-dev``: the embedded Consul-compatible dev agent as a process role."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from dynamo_grpc.consul_dev.server import ConsulDevServer, server_tls, write_addr_file
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
        "--acl-token",
        default=os.environ.get("CONSUL_DEV_ACL_TOKEN", ""),
        help="require this token (X-Consul-Token) for writes and reads; default: ACLs off",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=float(os.environ.get("CONSUL_DEV_TIME_SCALE", "1")),
        help="TEST ONLY: multiply the agent's own timers (DeregisterCriticalServiceAfter and its 1m "
        "minimum, the 30s reaper, session TTLs, lock delays) by this factor",
    )
    p.add_argument("--tls-cert", default=None, help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--tls-key", default=None, help="private key of --tls-cert (PEM)")
    p.add_argument("--tls-client-ca", default=None, help="require client certificates signed by this CA")
    add_log_flag(p)
    return p


async def _serve(args: argparse.Namespace) -> int:
    tls = server_tls(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    server = ConsulDevServer(
        args.host, args.port, acl_token=args.acl_token, time_scale=args.time_scale, ssl_context=tls
    )
    address = await server.start()
    print(f"consul-dev listening on {address}", flush=True)
    log.info(
        "consul-dev listening on %s (acl=%s, time_scale=%g)", address, bool(args.acl_token), args.time_scale
    )
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        print("--tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    if args.time_scale <= 0:
        print("--time-scale must be > 0", file=sys.stderr)
        return 2
    setup_logging(args.log_level)
    try:
        return asyncio.run(_serve(args))
    except OSError as exc:
        print(f"consul-dev: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
