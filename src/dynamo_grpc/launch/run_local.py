"""`make run-local`: a whole mesh on this machine, with the addresses and a call to paste.

Discovery: CONSUL_HTTP_ADDR when set (with the caller's CONSUL_HTTP_TOKEN), else a `consul` binary on
PATH (`consul agent -dev`), else the embedded consul-dev with ACLs on (deny by default): each process
gets its role's token. ``--tls`` generates a throwaway CA and certificates (mTLS inside the mesh, TLS
with a CA for clients of the frontend), ``--curve`` a CURVE key pair per role and an allow-list; both
reach the processes as ``DYN_TLS_*`` / ``DYN_ZMQ_CURVE_*`` variables.
Stops cleanly on Ctrl-C; a killed run-local takes its processes with it (Linux).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from dynamo_grpc.discovery.agent import ensure_agent
from dynamo_grpc.envflags import env_defaults
from dynamo_grpc.launch.children import check_ports
from dynamo_grpc.launch.mesh import Mesh, MeshConfig, MeshError
from dynamo_grpc.launch.security import MeshSecurity, local_security
from dynamo_grpc.logs import ENV as LOG_ENV
from dynamo_grpc.logs import FORMAT_ENV as LOG_FORMAT_ENV
from dynamo_grpc.logs import add_log_flag, setup_logging

DEFAULT_ENGINE = "torch"
TRITON_METRICS_PORT = 8002  # where Triton users' scrape configs already point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynamo-grpc run-local", description=__doc__)
    p.add_argument("--engine", choices=["mocker", "torch"], default=DEFAULT_ENGINE, help="worker engine")
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--torch-weights",
        choices=["fp32", "bf16", "int8", "int4", "w4a8"],
        default=None,
        help="torch workers' weight format (fp32: exact, the default; int4/w4a8: fastest on CPU; docs/torch-engine.md)",
    )
    p.add_argument(
        "--router-mode",
        choices=["kv", "kv-service", "round-robin", "random", "approx"],
        default="kv",
        help="kv: KV router inside the frontend; kv-service/approx: a separate dynamo-router process",
    )
    p.add_argument(
        "--pools",
        type=Path,
        default=None,
        help="a pools YAML: start `dynamo-grpc global-router --config` it and spread the workers over its pools "
        "(round-robin in file order; implies --router-mode kv-service)",
    )
    p.add_argument(
        "--frontends",
        type=int,
        default=1,
        help="frontend processes sharing the ports (frontend --replicas N, router replica sync on; default 1)",
    )
    p.add_argument("--grpc-port", type=int, default=8001, help="frontend KServe gRPC port (Triton's default)")
    p.add_argument("--http-port", type=int, default=8000, help="frontend OpenAI HTTP port (-1: off)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=TRITON_METRICS_PORT,
        help="frontend Prometheus /metrics port, Triton's nv_inference_* names beside Dynamo's "
        "(Triton's default 8002; 0: any free port, -1: off)",
    )
    p.add_argument("--log-dir", type=Path, default=None, help="where process logs go (default: a temp dir)")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument(
        "--no-acl",
        dest="acl",
        action="store_false",
        help="run the embedded consul-dev without ACLs (default: ACLs on, one token per role)",
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="generate a throwaway CA and certificates: mTLS between processes, TLS (with the CA) for clients",
    )
    p.add_argument(
        "--disagg",
        action="store_true",
        help="disaggregated serving: 1 prefill + 1 decode worker (replaces --workers); long prompts are "
        "prefilled on the prefill worker and their KV pulled by the decode worker (docs/disaggregation.md)",
    )
    p.add_argument(
        "--curve",
        action="store_true",
        help="generate ZeroMQ CURVE key pairs (one per role) and an allow-list for the KV event plane",
    )
    add_log_flag(p)
    return env_defaults(p)


def _tls_hints(sec: MeshSecurity, fe: str, http: str, model: str, body: str) -> str:
    """grpcurl / tritonclient / curl lines for a TLS frontend (the CA only: the public port needs no client cert)."""
    assert sec.tls is not None
    ca = sec.tls.ca
    lines = [
        "\nTLS is on (CA: " + str(ca) + "). Try it:",
        f"  grpcurl -cacert {ca} {fe} list",
        f"  grpcurl -cacert {ca} {fe} inference.GRPCInferenceService/ServerReady",
        "Or with tritonclient:",
        f"  .venv/bin/python -c \"import tritonclient.grpc as g; c = g.InferenceServerClient('{fe}', ssl=True, "
        f"root_certificates='{ca}'); print(c.is_server_ready(), c.get_model_repository_index())\"",
    ]
    if http:
        lines += [
            "Or OpenAI HTTPS:",
            f"  curl -s --cacert {ca} https://{http}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d '{body}'",
        ]
    lines.append(
        f"Internal ports need a client certificate: grpcurl -cacert {ca} -cert {sec.tls.client_cert} "
        f"-key {sec.tls.client_key} HOST:PORT list"
    )
    return "\n".join(lines) + "\n"


def pool_assignment(config: Path, workers: int, router_mode: str) -> list[str]:
    """The pool of each worker for ``--pools``: the config's pools round-robin; ValueError says what is wrong."""
    from dynamo_grpc.router.pool_config import load_pool_config

    grid = load_pool_config(config)
    names = list(grid.pools)
    if router_mode not in ("kv", "kv-service"):
        raise ValueError(f"--pools runs a global router (kv-service); --router-mode {router_mode} cannot go with it")
    if workers < len(names):
        raise ValueError(f"--pools {config}: {len(names)} pools need --workers {len(names)} or more, not {workers}")
    return [names[i % len(names)] for i in range(workers)]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.frontends < 1:
        parser.error("--frontends must be >= 1")
    if args.disagg and args.pools is not None:
        # a pools file places every worker itself; disaggregated pools go in it (docs/global-router.md)
        parser.error("--disagg starts its own 1 prefill + 1 decode workers; it cannot go with --pools")
    if args.torch_weights and args.engine != "torch":
        parser.error(f"--torch-weights is a torch flag; --engine {args.engine} does not read it")
    setup_logging(args.log_level, args.log_format)
    os.environ[LOG_ENV] = args.log_level  # every process of the mesh inherits the level
    os.environ[LOG_FORMAT_ENV] = args.log_format  # ... and the log format
    try:
        check_ports(
            "127.0.0.1",
            [(args.grpc_port, "--grpc-port"), (args.http_port, "--http-port"), (args.metrics_port, "--metrics-port")],
        )
    except SystemExit as e:
        print(f"run-local: {e}", file=sys.stderr)
        return 1
    try:
        agent = ensure_agent(acl=args.acl)
    except (OSError, RuntimeError, TimeoutError) as e:
        print(f"run-local: could not start a Consul agent: {e}", file=sys.stderr)
        return 1
    consul = agent.address
    worker_pools: list[str] = []
    if args.pools is not None:
        try:
            worker_pools = pool_assignment(args.pools, args.workers, args.router_mode)
        except ValueError as e:
            print(f"run-local: {e}", file=sys.stderr)
            agent.stop()
            return 2
        args.router_mode = "kv-service"
    roles = ["prefill", "decode"] if args.disagg else []
    if args.disagg:
        args.workers = 2
    worker_args: list[str] = []
    if args.engine == "torch":
        # the workers share this machine's cores; torch would otherwise give each all of them
        worker_args = ["--num-threads", str(max(1, (os.cpu_count() or 1) // max(1, args.workers)))]
        if args.torch_weights:
            worker_args += ["--torch-weights", args.torch_weights]
    security: MeshSecurity | None = None
    if args.tls or args.curve:
        sec_dir = Path(tempfile.mkdtemp(prefix="dynamo-security-"))
        security = local_security(sec_dir, tls=args.tls, curve=args.curve)
    cfg = MeshConfig(
        pools_config=args.pools,
        worker_pools=worker_pools,
        security=security,
        worker_args=worker_args,
        worker_roles=roles,
        workers=args.workers,
        engine=args.engine,
        model=args.model,
        router_mode=args.router_mode,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        frontend_args=["--metrics-port", str(args.metrics_port)]
        + (["--replicas", str(args.frontends)] if args.frontends > 1 else []),
        consul=consul,
        acl=args.acl,
        consul_token=agent.token,
        log_dir=args.log_dir,
        ready_timeout_s=args.ready_timeout,
    )
    mesh = Mesh(cfg)
    router_kind = args.router_mode
    if worker_pools:
        router_kind = f"global router over pools {', '.join(dict.fromkeys(worker_pools))}"
    what = "1 prefill + 1 decode" if args.disagg else str(args.workers)
    print(f"starting a local mesh: {what} {args.engine} worker(s), router ({router_kind}), frontend")
    print(f"discovery: {agent.kind} at {consul}")
    if agent.token:
        token_file = mesh.log_dir / "consul-management-token"
        token_file.touch(mode=0o600)
        token_file.write_text(agent.token + "\n")
        print(f"ACLs: on (default deny), a token per role; management token in {token_file}")
    if security is not None:
        parts = [f"TLS (certificates in {security.tls.directory})" if security.tls else "",
                 f"CURVE (keys in {security.curve.allow_dir.parent})" if security.curve else ""]
        print("security: " + " and ".join(p for p in parts if p))
    print(f"logs: {mesh.log_dir}", flush=True)
    try:
        mesh.start()
    except MeshError as e:
        print(f"run-local: {e}", file=sys.stderr)
        agent.stop()
        return 1
    except KeyboardInterrupt:
        mesh.stop()
        agent.stop()
        return 130
    fe = mesh.frontend_grpc
    model = mesh.models[0] if mesh.models else "SmolLM2-135M-Instruct"
    question = [{"role": "user", "content": "What is the capital of France?"}]
    body = json.dumps({"model": model, "messages": question, "temperature": 0})
    tls_on = security is not None and security.tls is not None
    scheme = "https" if tls_on else "http"
    print(
        f"""
dynamo-grpc is up.
  KServe v2 gRPC : {fe}{" (TLS)" if tls_on else ""}
  OpenAI HTTP    : {f"{scheme}://{mesh.frontend_http}" if mesh.frontend_http else "off"}
  metrics        : {f"{scheme}://{mesh.frontend_metrics}/metrics" if mesh.frontend_metrics else "off"}
  router         : {mesh.router_grpc or ("in the frontend" if args.router_mode == "kv" else "-")}\
{f" ({router_kind})" if worker_pools else ""}
  consul         : {mesh.consul}""",
        flush=True,
    )
    if security is not None and security.tls is not None:
        print(_tls_hints(security, fe, mesh.frontend_http, model, body), flush=True)
    else:
        http_hint = ""
        if mesh.frontend_http:
            http_hint = (
                f"\nOr OpenAI HTTP:\n  curl -s http://{mesh.frontend_http}/v1/chat/completions "
                f"-H 'Content-Type: application/json' -d '{body}'\n"
            )
        print(
            f"""
Try it (grpcurl, server reflection; text_input is base64 of "What is the capital of France?"):
  grpcurl -plaintext {fe} list
  grpcurl -plaintext -d '{{"model_name":"{model}",\
"parameters":{{"chat_template":{{"bool_param":true}},"temperature":{{"double_param":0}},\
"max_tokens":{{"int64_param":32}}}},\
"inputs":[{{"name":"text_input","datatype":"BYTES","shape":[1],\
"contents":{{"bytes_contents":["V2hhdCBpcyB0aGUgY2FwaXRhbCBvZiBGcmFuY2U/"]}}}}]}}' \\
    {fe} inference.GRPCInferenceService/ModelInfer

Or with tritonclient (streams tokens):
  .venv/bin/python examples/tritonclient_infer.py --url {fe} --model {model} "What is the capital of France?"
{http_hint}""",
            flush=True,
        )
    print("Ctrl-C stops everything.", flush=True)
    stop = False

    def _stop(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    try:
        while not stop:
            time.sleep(0.5)
            for p in mesh.procs:
                if p.popen.poll() is not None:
                    print(f"run-local: {p.exit_line()} (log: {p.log})", file=sys.stderr)
                    stop = True
    except KeyboardInterrupt:
        pass
    print("\nstopping (workers drain first)...", flush=True)
    # a second Ctrl-C must not abandon half-stopped processes
    signal.signal(signal.SIGINT, lambda *_: print("still stopping...", flush=True))
    mesh.stop()
    agent.stop()
    print("stopped.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
