"""Launch consul-dev, a router, N workers and a frontend as subprocesses and wait until ready.

Readiness is what a client would observe: every process has registered in Consul with a
passing check, and the frontend answers ServerReady. Processes are stopped with SIGTERM
(so workers drain and deregister) and killed if they do not exit in time; on Linux they also get
SIGTERM from the kernel if the launcher dies (``launch.children.with_parent_death``).

ACLs: the consul-dev the mesh starts runs with ACLs on (deny by default) and each process gets its
role's token (``discovery.roles``) as ``CONSUL_HTTP_TOKEN``; the launcher's own reads use the
management token. With an existing agent (``consul``) the processes inherit the caller's
``CONSUL_HTTP_TOKEN``, unless ``consul_token`` (a management token) is given to mint role tokens.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc

from dynamo_grpc.discovery.agent import AgentHandle, start_consul_dev
from dynamo_grpc.discovery.roles import RoleToken, create_role_tokens
from dynamo_grpc.launch.children import last_line, with_parent_death
from dynamo_grpc.launch.consul_http import passing_instances, service_meta
from dynamo_grpc.launch.security import MeshSecurity
from dynamo_grpc.logs import ENV as LOG_ENV


class MeshError(RuntimeError):
    """The mesh did not come up; the message names the process and its log file."""


@dataclass
class MeshConfig:
    workers: int = 2
    engine: str = "mocker"
    model: str | None = None  # path to a GGUF / HF dir; None: the default model
    #: kv (in the frontend) | kv-service (a dynamo-router process) | approx (router process) | round-robin | random
    router_mode: str = "kv"
    speedup_ratio: float | None = None  # mocker only
    grpc_port: int = 0
    http_port: int = -1
    consul: str | None = None  # an existing agent (CONSUL_HTTP_ADDR); None: start consul-dev
    #: ACLs on the consul-dev we start (deny by default), one token per role
    acl: bool = True
    #: a management token for ``consul``: mint role tokens there (None: children inherit CONSUL_HTTP_TOKEN)
    consul_token: str | None = None
    namespace: str = "dynamo"
    worker_args: list[str] = field(default_factory=list)
    #: --role of each worker (prefill | decode | both), in order; empty: every worker is "both"
    worker_roles: list[str] = field(default_factory=list)
    router_args: list[str] = field(default_factory=list)
    frontend_args: list[str] = field(default_factory=list)
    #: also start a `dynamo-router` process; None: only when router_mode needs one (kv-service, approx)
    start_router: bool | None = None
    #: a pools YAML: the router process is `dynamo-grpc global-router --config` it (router_mode kv-service)
    pools_config: Path | None = None
    #: worker i joins pool worker_pools[i] (--pool); workers past the list stay in the default pool
    worker_pools: list[str] = field(default_factory=list)
    log_dir: Path | None = None
    #: TLS certificates and CURVE keys handed to the children by env (``launch.security``); None: plain
    security: MeshSecurity | None = None
    ready_timeout_s: float = 120.0
    stop_timeout_s: float = 15.0


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def exit_line(self) -> str:
        """One line for a dead process: its code and its own last words."""
        why = last_line(self.log)
        return f"{self.name} exited with code {self.popen.returncode}" + (f": {why}" if why else "")


class Mesh:
    """A running mesh. Use as a context manager, or call start()/stop()."""

    def __init__(self, config: MeshConfig | None = None) -> None:
        self.config = config or MeshConfig()
        self.procs: list[_Proc] = []
        self.consul: str = ""
        self.frontend_grpc: str = ""
        self.frontend_http: str = ""
        self.frontend_metrics: str = ""  # host:port of its /metrics (Triton and Dynamo names), "" when off
        self.router_grpc: str = ""
        self.models: list[str] = []
        #: the token the launcher reads Consul with (management when we hold one)
        self.consul_token: str | None = os.environ.get("CONSUL_HTTP_TOKEN") or None
        self.role_tokens: dict[str, RoleToken] = {}
        self._agent: AgentHandle | None = None
        self.log_dir = self.config.log_dir or Path(tempfile.mkdtemp(prefix="dynamo-mesh-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)

    # -- process handling ---------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], role: str) -> _Proc:
        log = self.log_dir / f"{name}.log"
        # a DYN_<FLAG> variable would reach every role at once (DYN_PORT, DYN_HEALTH_PORT: one port for all), so the
        # mesh passes its settings as flags and only DYN_LOG (and the security variables below) by environment
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("DYN_") or k == LOG_ENV}
        full_env = {**inherited, "PYTHONUNBUFFERED": "1"}
        if self.config.security is not None:
            full_env.update(self.config.security.env(role))
        if role in self.role_tokens:
            full_env.pop("CONSUL_HTTP_TOKEN_FILE", None)
            full_env["CONSUL_HTTP_TOKEN"] = self.role_tokens[role].secret_id
        argv = with_parent_death([sys.executable, "-m", "dynamo_grpc.cli", *args])  # a killed launcher takes them along
        with open(log, "wb") as fh:
            popen = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=full_env,
                start_new_session=True,  # Ctrl-C reaches the launcher, which stops children in order
            )
        proc = _Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.popen.poll() is not None:
                raise MeshError(f"{p.exit_line()} (log: {p.log})")

    def _wait(self, what: str, predicate: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.config.ready_timeout_s
        while time.monotonic() < deadline:
            self._check_alive()
            if predicate():
                return
            time.sleep(0.1)
        limit = self.config.ready_timeout_s
        raise MeshError(f"timed out after {limit:.0f}s waiting for {what}; logs in {self.log_dir}")

    def _wait_service(self, service: str, count: int) -> list[dict[str, str]]:
        metas: list[dict[str, str]] = []

        def ready() -> bool:
            nonlocal metas
            metas = [service_meta(e) for e in passing_instances(self.consul, service, token=self.consul_token)]
            return len(metas) >= count

        self._wait(f"{count} passing {service}", ready)
        return metas

    def worker_metas(self) -> list[dict[str, str]]:
        """Consul Meta of the passing workers now (grpc_address, role, metrics address, ...)."""
        return [service_meta(e) for e in passing_instances(self.consul, "dynamo-worker", token=self.consul_token)]

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> Mesh:
        c = self.config
        try:
            if c.consul:
                self.consul = c.consul
                management = c.consul_token
            else:
                self._agent = start_consul_dev(acl=c.acl)
                self.consul = self._agent.address
                management = self._agent.token
            if management and c.acl:
                self.consul_token = management
                self.role_tokens = create_role_tokens(self.consul, management)
            common = ["--consul", self.consul, "--namespace", c.namespace]
            for i in range(c.workers):
                args = ["worker", *common, "--engine", c.engine, "--port", "0"]
                if c.model:
                    args += ["--model", c.model]
                if c.speedup_ratio is not None and c.engine == "mocker":
                    args += ["--speedup-ratio", str(c.speedup_ratio)]
                if i < len(c.worker_pools):
                    args += ["--pool", c.worker_pools[i]]
                if i < len(c.worker_roles):
                    args += ["--role", c.worker_roles[i]]
                self._spawn(f"worker-{i}", [*args, *c.worker_args], "worker")
            if c.pools_config is not None:
                gr = ["global-router", *common, "--config", str(c.pools_config), "--port", "0", *c.router_args]
                self._spawn("global-router", gr, "router")
            elif self.starts_router:
                events = ["--no-router-kv-events"] if c.router_mode == "approx" else []
                self._spawn("router", ["router", *common, *events, "--port", "0", *c.router_args], "router")
            fe_mode = {"approx": "kv-service"}.get(c.router_mode, c.router_mode)
            self._spawn(
                "frontend",
                [
                    "frontend", *common, "--router-mode", fe_mode,
                    "--grpc-port", str(c.grpc_port), "--http-port", str(c.http_port), *c.frontend_args,
                ],
                "frontend",
            )
            self._wait_service("dynamo-worker", c.workers)
            if self.starts_router:
                self.router_grpc = self._wait_service("dynamo-router", 1)[0].get("grpc_address", "")
            fe = self._wait_service("dynamo-frontend", 1)[0]
            self.frontend_grpc = fe.get("grpc_address", "")
            self.frontend_http = fe.get("http_address", "")
            self.frontend_metrics = fe.get("metrics_address", "")
            self._wait("the frontend to report ready", self._frontend_ready)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def starts_router(self) -> bool:
        c = self.config
        if c.pools_config is not None:
            return True
        return c.start_router if c.start_router is not None else c.router_mode in ("kv-service", "approx")

    def _frontend_ready(self) -> bool:
        import grpc

        from dynamo_grpc.kserve.v2 import grpc_service_pb2, grpc_service_pb2_grpc

        with self._probe_channel(self.frontend_grpc) as ch:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
            try:
                if not stub.ServerReady(grpc_service_pb2.ServerReadyRequest(), timeout=2).ready:
                    return False
                index = stub.RepositoryIndex(grpc_service_pb2.RepositoryIndexRequest(ready=True), timeout=2)
                self.models = [m.name for m in index.models if m.state == "READY"]
                return True
            except grpc.RpcError:
                return False

    def _probe_channel(self, address: str) -> grpc.Channel:
        """A channel to a mesh process: with TLS on, verified against the mesh CA, with its client certificate."""
        import grpc

        sec = self.config.security
        if sec is None or sec.tls is None:
            return grpc.insecure_channel(address)
        t = sec.tls
        creds = grpc.ssl_channel_credentials(
            t.ca.read_bytes(), t.client_key.read_bytes(), t.client_cert.read_bytes()
        )
        return grpc.secure_channel(address, creds)

    def proc(self, name: str) -> subprocess.Popen[bytes]:
        for p in self.procs:
            if p.name == name:
                return p.popen
        raise KeyError(name)

    def stop(self) -> None:
        """SIGTERM the mesh (frontend first) so workers drain and deregister, then the agent we started."""
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.stop_timeout_s
        for p in reversed(self.procs):
            try:
                p.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()
        self.procs.clear()
        if self._agent is not None:
            self._agent.stop()
            self._agent = None

    def __enter__(self) -> Mesh:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


