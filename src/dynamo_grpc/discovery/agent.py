"""Find or start a Consul agent for run-local: CONSUL_HTTP_ADDR, else ``consul agent -dev``, else
consul-dev."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class AgentHandle:
    """An agent address and, when we started it, the process to stop."""

    address: str
    kind: str  # "external" | "consul" | "consul-dev"
    process: subprocess.Popen[bytes] | None = None
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] | None = None
    #: a management token when we started the agent with ACLs on (None: ACLs off, or not ours)
    token: str | None = None

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``. Safe to call twice."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> AgentHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_ready(
    address: str, timeout: float, proc: subprocess.Popen[bytes] | None = None, token: str | None = None
) -> None:
    """Poll /v1/status/leader until the agent has a leader (a dev agent elects itself in a moment).
    For an https address only the TCP port is awaited (we may hold no client certificate)."""
    deadline = time.monotonic() + timeout
    if address.startswith("https://"):
        host, _, port = address[len("https://") :].rpartition(":")
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"agent exited with code {proc.returncode} before it was ready")
            try:
                socket.create_connection((host, int(port)), timeout=1.0).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"agent at {address} not ready after {timeout}s")
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"agent exited with code {proc.returncode} before it was ready")
        try:
            req = urllib.request.Request(
                f"{address}/v1/status/leader", headers={"X-Consul-Token": token} if token else {}
            )
            with urllib.request.urlopen(req, timeout=1.0) as resp:
                if resp.read().strip() not in (b"", b'""'):
                    return
        except (OSError, urllib.error.URLError) as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"agent at {address} not ready after {timeout}s ({last})")


def _with_parent_death(argv: list[str]) -> list[str]:
    from dynamo_grpc.launch.children import with_parent_death  # launch imports this module: import late

    return with_parent_death(argv)


def start_consul_dev(
    port: int = 0,
    *,
    acl_token: str = "",
    acl: bool = False,
    acl_file: str | None = None,
    time_scale: float | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 15.0,
    extra_args: list[str] | None = None,
) -> AgentHandle:
    """Start ``python -m dynamo_grpc.consul_dev.main`` on 127.0.0.1 and wait until it answers.

    ``acl_token``: ACLs on (default deny) with this initial management token; ``acl``: ACLs on with a
    fresh random management token (in ``handle.token``); ``acl_file``: policies and tokens to load. The
    agent dies with this process (Linux)."""
    fd, addr_file = tempfile.mkstemp(prefix="consul-dev-", suffix=".addr")
    os.close(fd)
    os.unlink(addr_file)
    argv = [
        sys.executable,
        "-m",
        "dynamo_grpc.consul_dev.main",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--addr-file",
        addr_file,
    ]
    if acl and not acl_token:
        acl_token = secrets.token_hex(16)
    if acl_token:
        argv += ["--acl-bootstrap-token", acl_token]
    if acl_file:
        argv += ["--acl-file", acl_file]
    if time_scale is not None:
        argv += ["--time-scale", repr(time_scale)]
    child_env = dict(os.environ if env is None else env)
    argv += ["--log-level", child_env.get("DYN_LOG", "warning"), *(extra_args or [])]
    child_env.pop("CONSUL_DEV_ACL_TOKEN", None)
    child_env.pop("CONSUL_DEV_ACL_BOOTSTRAP_TOKEN", None)
    proc = subprocess.Popen(
        _with_parent_death(argv),
        env=child_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout
        while not os.path.exists(addr_file):
            if proc.poll() is not None:
                raise RuntimeError(f"consul-dev exited with code {proc.returncode} before listening")
            if time.monotonic() > deadline:
                raise TimeoutError("consul-dev did not start listening in time")
            time.sleep(0.02)
        with open(addr_file, encoding="utf-8") as fh:
            address = fh.read().strip()
        os.unlink(addr_file)
        wait_ready(address, max(1.0, deadline - time.monotonic()), proc, acl_token or None)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return AgentHandle(
        address=address, kind="consul-dev", process=proc, argv=argv, env=child_env, token=acl_token or None
    )


def start_consul_binary(binary: str, *, timeout: float = 30.0) -> AgentHandle:
    """``consul agent -dev`` on a free HTTP port, DNS off, bound to loopback."""
    port = free_port()
    argv = [
        binary,
        "agent",
        "-dev",
        "-client",
        "127.0.0.1",
        "-bind",
        "127.0.0.1",
        f"-http-port={port}",
        "-dns-port=-1",
    ]
    proc = subprocess.Popen(
        _with_parent_death(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"http://127.0.0.1:{port}"
    try:
        wait_ready(address, timeout, proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return AgentHandle(address=address, kind="consul", process=proc, argv=argv)


def ensure_agent(
    env: Mapping[str, str] | None = None, *, consul_binary: str = "consul", acl: bool = False
) -> AgentHandle:
    """The agent run-local should use: CONSUL_HTTP_ADDR if set (we start nothing; the user's
    CONSUL_HTTP_TOKEN applies), else a ``consul`` binary on PATH as a dev agent, else consul-dev (with
    ``acl``: ACLs on, deny by default, the management token in ``handle.token``). ``handle.stop()``
    stops what we started."""
    env = os.environ if env is None else env
    if env.get("CONSUL_HTTP_ADDR"):
        from dynamo_grpc.discovery.config import ConsulSettings

        return AgentHandle(address=ConsulSettings.from_env(env).address, kind="external")
    binary = shutil.which(consul_binary, path=env.get("PATH"))
    if binary:
        return start_consul_binary(binary)
    return start_consul_dev(env=env, acl=acl)
