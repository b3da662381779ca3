"""`dynamo-grpc planner`: keep TTFT and ITL within targets with the fewest workers (docs/planner.md).

dynamo-grpc planner --profile profile.json --connector local --consul 127.0.0.1:8500 --adjustment-interval 60
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import signal
from pathlib import Path

from dynamo_grpc.envflags import env_defaults
from dynamo_grpc.logs import add_log_flag, setup_logging
from dynamo_grpc.planner.loop import Decision, Planner, PlannerConfig
from dynamo_grpc.planner.predictors import PREDICTORS
from dynamo_grpc.planner.profile import Profile, ProfileError
from dynamo_grpc.planner.scaling import AGG, DECODE, PREFILL, Bounds, Targets

log = logging.getLogger("dynamo_grpc.planner")

#: what each pool runs under the local connector until told otherwise. Workers have no --role yet, so every
#: pool runs aggregated mocker workers; with worker roles, set --pool-command prefill='worker ... --role prefill'.
DEFAULT_COMMANDS = {AGG: "worker --engine mocker", PREFILL: "worker --engine mocker", DECODE: "worker --engine mocker"}
DEFAULT_DEPLOYMENTS = {AGG: "dynamo-worker", PREFILL: "dynamo-worker-prefill", DECODE: "dynamo-worker-decode"}


def _pair(text: str, flag: str) -> tuple[str, str]:
    pool, sep, value = text.partition("=")
    if not sep or not pool:
        raise argparse.ArgumentTypeError(f"{flag} wants POOL=VALUE, got {text!r}")
    return pool.strip(), value.strip()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynamo-grpc planner",
        description="SLA planner: forecast load from the frontends' metrics and size the worker pools from a profile.",
    )
    p.add_argument("--profile", type=Path, required=True, help="profile JSON written by `dynamo-grpc profile`")
    p.add_argument(
        "--mode",
        choices=["agg", "disagg"],
        default="agg",
        help="agg: one pool 'worker'; disagg: pools 'prefill' and 'decode' sized separately",
    )
    p.add_argument(
        "--connector",
        choices=["local", "kubernetes", "virtual"],
        default="local",
        help="local: worker processes here; kubernetes: Deployments; virtual: decide and export only (dry run)",
    )
    p.add_argument("--adjustment-interval", type=float, default=180.0, help="seconds between decisions")
    p.add_argument(
        "--surge-check",
        type=float,
        default=None,
        metavar="S",
        help="seconds between emergency scale-up checks of the last two such windows' load "
        "(default: a quarter of --adjustment-interval; 0: off)",
    )
    p.add_argument("--ttft-target", type=float, default=0.5, help="seconds, mean time to first token")
    p.add_argument("--itl-target", type=float, default=0.05, help="seconds, mean inter-token latency")
    p.add_argument(
        "--predictor", choices=PREDICTORS, default="constant", help="load forecast (arima/holt: planner extra)"
    )
    p.add_argument(
        "--length-predictor",
        choices=PREDICTORS,
        default="moving-average",
        help="forecast of the mean input/output lengths (a trend would chase noise there)",
    )
    p.add_argument("--predictor-window", type=int, default=3, help="moving-average: intervals averaged")
    p.add_argument("--min-replicas", type=int, default=1, help="per pool, unless --bounds says otherwise")
    p.add_argument("--max-replicas", type=int, default=8, help="per pool, unless --bounds says otherwise")
    p.add_argument("--bounds", action="append", default=[], metavar="POOL=MIN:MAX", help="per-pool bounds (repeat)")
    p.add_argument("--max-total-replicas", type=int, default=None, help="budget over all pools together")
    p.add_argument(
        "--scale-down-after",
        type=int,
        default=2,
        help="decisions in a row that must ask for fewer replicas before a pool shrinks",
    )
    p.add_argument(
        "--scale-up-slack",
        type=float,
        default=0.05,
        metavar="F",
        help="an interval decision adds workers only when the need exceeds the current count by more than this "
        "fraction of it (fractional-need hysteresis; 0: round every fraction up)",
    )
    p.add_argument(
        "--correction",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="scale the profile by observed/expected TTFT and ITL",
    )
    src = p.add_argument_group("load source")
    src.add_argument("--prometheus", default=None, help="Prometheus base URL (HTTP API); else scrape the frontends")
    src.add_argument("--prometheus-selector", default="", help='label selector added to each series, e.g. {job="x"}')
    src.add_argument(
        "--frontend-metrics",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="frontend /metrics to scrape (repeat); default: every passing dynamo-frontend in Consul",
    )
    p.add_argument("--consul", default=None, help="Consul address (default: $CONSUL_HTTP_ADDR or 127.0.0.1:8500)")
    p.add_argument("--namespace", default="dynamo")
    loc = p.add_argument_group("local connector")
    loc.add_argument(
        "--pool-command",
        action="append",
        default=[],
        metavar="POOL=ARGS",
        help="dynamo-grpc arguments of a pool's workers (repeat); default 'worker --engine mocker'",
    )
    loc.add_argument("--log-dir", type=Path, default=None, help="worker logs and ready files (default: a temp dir)")
    k8s = p.add_argument_group("kubernetes connector")
    k8s.add_argument(
        "--deployment",
        action="append",
        default=[],
        metavar="POOL=NAME",
        help="Deployment of a pool (repeat); default dynamo-worker, dynamo-worker-prefill/-decode",
    )
    k8s.add_argument("--kube-namespace", default="default")
    k8s.add_argument(
        "--kube-api",
        default=None,
        help="API server URL without auth (kubectl proxy); default: in-cluster config, else kubeconfig",
    )
    k8s.add_argument("--kubeconfig", default=None)
    k8s.add_argument("--worker-metrics-port", type=int, default=9002, help="workers' /metrics port in their pods")
    p.add_argument("--decisions", type=Path, default=None, help="append each decision as a JSON line to this file")
    p.add_argument("--metrics-port", type=int, default=0, help="planner /metrics port; 0: any free port, -1: off")
    p.add_argument("--host", default="127.0.0.1", help="address for the planner's /metrics")
    add_log_flag(p)
    return env_defaults(p)


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> PlannerConfig:
    pools = [AGG] if args.mode == "agg" else [PREFILL, DECODE]
    bounds = {pool: Bounds(args.min_replicas, args.max_replicas) for pool in pools}
    for item in args.bounds:
        pool, value = _pair(item, "--bounds")
        lo, sep, hi = value.partition(":")
        try:
            bounds[pool] = Bounds(int(lo), int(hi)) if sep else parser.error(f"--bounds {item}: want POOL=MIN:MAX")
        except ValueError:
            parser.error(f"--bounds {item}: MIN and MAX must be integers")
    try:
        return PlannerConfig(
            pools=pools,
            targets=Targets(args.ttft_target, args.itl_target),
            bounds=bounds,
            budget=args.max_total_replicas,
            interval_s=args.adjustment_interval,
            predictor=args.predictor,
            length_predictor=args.length_predictor,
            window=args.predictor_window,
            down_after=args.scale_down_after,
            correction=args.correction,
            surge_check_s=args.surge_check,
            up_slack=args.scale_up_slack,
        )
    except ValueError as e:
        parser.error(str(e))


def _per_pool(
    items: list[str], defaults: dict[str, str], pools: list[str], flag: str, parser: argparse.ArgumentParser
) -> dict[str, str]:
    out = {pool: defaults[pool] for pool in pools}
    for item in items:
        try:
            pool, value = _pair(item, flag)
        except argparse.ArgumentTypeError as e:
            parser.error(str(e))
        if pool not in pools:
            parser.error(f"{flag} {item}: no pool {pool!r} in --mode (pools: {', '.join(pools)})")
        out[pool] = value
    return out


def _consul(args: argparse.Namespace) -> str:
    import os

    addr = args.consul or os.environ.get("CONSUL_HTTP_ADDR") or "127.0.0.1:8500"
    return addr if "://" in addr else f"http://{addr}"


def _frontend_targets(args: argparse.Namespace) -> list[str]:
    if args.frontend_metrics:
        return list(args.frontend_metrics)
    from dynamo_grpc.launch.consul_http import passing_instances, service_meta
    from dynamo_grpc.transport.addresses import METRICS_META

    metas = (service_meta(e) for e in passing_instances(_consul(args), "dynamo-frontend"))
    return [m[METRICS_META] for m in metas if m.get(METRICS_META)]


async def serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from dynamo_grpc.planner.connectors.base import Connector
    from dynamo_grpc.planner.observe import PrometheusSource, ScrapeSource

    cfg = config_from_args(args, parser)
    try:
        profile = Profile.load(args.profile)
    except ProfileError as e:
        parser.error(str(e))
    connector: Connector
    if args.connector == "local":
        from dynamo_grpc.planner.connectors.local import LocalConnector

        commands = _per_pool(args.pool_command, DEFAULT_COMMANDS, cfg.pools, "--pool-command", parser)
        connector = LocalConnector(
            {k: shlex.split(v) for k, v in commands.items()}, _consul(args), args.namespace, args.log_dir
        )
    elif args.connector == "virtual":
        from dynamo_grpc.planner.connectors.virtual import VirtualConnector

        connector = VirtualConnector(cfg.pools)
    else:
        try:
            import kubernetes  # noqa: F401
        except ImportError:
            parser.error("--connector kubernetes needs the kubernetes client: pip install 'dynamo-grpc[planner]'")
        from dynamo_grpc.planner.connectors.kubernetes import KubernetesConnector, api_client

        names = _per_pool(args.deployment, DEFAULT_DEPLOYMENTS, cfg.pools, "--deployment", parser)
        connector = KubernetesConnector(
            names, args.kube_namespace, api_client(args.kube_api, args.kubeconfig), args.worker_metrics_port
        )
    source = (
        PrometheusSource(args.prometheus, cfg.interval_s, args.prometheus_selector)
        if args.prometheus
        else ScrapeSource(lambda: _frontend_targets(args))
    )
    surge_every = cfg.surge_every_s
    surge_source = (
        None
        if surge_every <= 0
        else PrometheusSource(args.prometheus, surge_every, args.prometheus_selector)
        if args.prometheus
        else ScrapeSource(lambda: _frontend_targets(args))
    )

    def record(d: Decision) -> None:
        if args.decisions is not None:
            with open(args.decisions, "a", encoding="utf-8") as f:
                f.write(d.to_json() + "\n")

    try:
        planner = Planner(cfg, profile, source, connector, on_decision=record, surge_source=surge_source)
    except ImportError as e:
        parser.error(
            f"--predictor {args.predictor} needs {e.name or 'statsmodels'}: pip install 'dynamo-grpc[planner]'"
        )
    runner = None
    if args.metrics_port >= 0:
        from dynamo_grpc.transport.http import metrics_app, serve_app

        runner, port = await serve_app(metrics_app(planner.metrics.registry), args.host, args.metrics_port)
        print(f"planner metrics on http://{args.host}:{port}/metrics", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await planner.run(stop)
    finally:
        if args.connector == "local":
            await connector.close()  # the workers it started go with it (drained)
        if runner is not None:
            await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    if args.metrics_port < -1:
        parser.error("--metrics-port: want a port, 0 (any free port) or -1 (off)")
    try:
        return asyncio.run(serve(args, parser))
    except KeyboardInterrupt:
        return 130
