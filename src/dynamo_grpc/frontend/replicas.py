"""Frontend replicas: several frontend processes on one KServe (and HTTP) port, routing as one.

A Python frontend is bound to one core; `dynamo-grpc frontend --replicas N` scales it the way Python
servers do: a supervisor starts N frontend processes that bind the same ports with SO_REUSEPORT (the
kernel spreads connections over them; Linux >= 3.9, also FreeBSD/macOS with different balancing; not
on Windows, where --replicas is refused). Each replica registers its own `dynamo-frontend` instance
and serves its own /metrics (``--metrics-port P`` gives replica i port P+i) and health port.

Every replica runs its embedded KV router with replica sync (``--router-replica-sync``, Dynamo's
name): each embedded router publishes its decisions and their lifecycle on one ZMQ PUB per process
(advertised in the frontend's Consul Meta) and follows the other frontends', so active-load terms
agree across replicas (router/replicas.py: events as they happen, snapshots every second for late
joiners, a silent replica's load expired after 3 s).

SO_REUSEPORT is off unless replicas are asked for, so a port conflict is still an error; with
replicas, a stale frontend must not silently share the port either. The supervisor holds an
exclusive ``flock`` on a lock file named for the host and gRPC port, writes its group id in it and
checks, before any replica binds, that no process holds the ports at all (a bind without
SO_REUSEPORT fails against any listener, reuse or not). Replicas are started with the group id and
refuse to bind unless the lock is still held and names their group. A second supervisor on the same
port fails on the lock; a leftover replica of a dead supervisor fails the port check.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from dynamo_grpc.launch.children import check_ports, with_parent_death

log = logging.getLogger("dynamo_grpc.frontend.replicas")

#: flags whose value each replica gets from the supervisor (stripped from the inherited command line)
_PER_REPLICA = ("--replicas", "--ready-file", "--grpc-port", "--http-port", "--metrics-port", "--health-port",
                "--replica-group")


def add_replica_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="run N frontend processes on the same ports (SO_REUSEPORT), each with its embedded router, "
        "router replica sync on; --metrics-port/--health-port P give replica i port P+i (default 1)",
    )
    p.add_argument(
        "--router-replica-sync",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="share the embedded KV router's in-flight load with the other frontends in the namespace "
        "(events on a ZMQ PUB advertised in Consul); default: on with --replicas > 1, else off "
        "(--no-router-replica-sync keeps replicas apart, e.g. to measure the herding it prevents)",
    )
    p.add_argument("--replica-group", default=None, help=argparse.SUPPRESS)  # set by the supervisor


#: how long a replica waits for its first model before it listens anyway (it then answers UNAVAILABLE)
REPLICA_WARMUP_S = 30.0


async def wait_for_models(registry: Any, timeout: float) -> bool:
    """A replica starts listening once it serves a model (or after ``timeout``): with SO_REUSEPORT the
    kernel gives a listening replica its share of new connections at once, so one still discovering its
    workers would answer them "no live worker" while its siblings could serve them."""
    deadline = time.monotonic() + timeout
    while not registry.models():
        if time.monotonic() > deadline:
            log.warning("no model discovered within %.0fs; listening anyway", timeout)
            return False
        await asyncio.sleep(0.1)
    return True


def lock_path(host: str, port: int) -> Path:
    return Path(tempfile.gettempdir()) / f"dynamo-grpc-frontend-{host.replace(':', '_')}-{port}.lock"


def check_replica_args(args: argparse.Namespace) -> None:
    """Refuse what replicas cannot do, before anything starts."""
    if args.replicas < 1:
        raise ValueError("--replicas must be >= 1")
    replicated = args.replicas > 1 or bool(args.replica_group)
    if replicated and not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("--replicas needs SO_REUSEPORT, which this platform does not have")
    if args.router_replica_sync is None:  # not set: on for replicas of an embedded router
        args.router_replica_sync = replicated and args.router_mode != "kv-service"
    if args.router_replica_sync and args.router_mode == "kv-service":
        raise ValueError("--router-replica-sync applies to the embedded router; --router-mode kv-service has none")


def verify_group(host: str, port: int, group: str) -> None:
    """A replica's check before it binds with SO_REUSEPORT: its supervisor still holds the lock."""
    path = lock_path(host, port)
    try:
        content = path.read_text().split()
    except OSError as e:
        why = f"replica of group {group}: lock {path} unreadable ({e})"
        raise SystemExit(f"{why}; refusing to share port {port}") from None
    if not content or content[0] != group:
        raise SystemExit(f"port {port} belongs to frontend group {content[:1]} (lock {path}), not {group}")
    with open(path) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # held exclusively: our supervisor is alive
        fcntl.flock(fh, fcntl.LOCK_UN)
    why = f"frontend group {group}'s supervisor is gone (lock {path} free)"
    raise SystemExit(f"{why}; refusing to share port {port}")


def hold_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``port`` (0: a free one) with SO_REUSEPORT and never listening: the replicas, which bind
    with SO_REUSEPORT too, can share the port, while any other process's bind fails, so the port cannot be
    taken in the seconds before the replicas listen (they wait for a model first). A socket that does not
    listen gets no connections."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
    except OSError:
        s.close()
        raise
    return s


def _strip(argv: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in _PER_REPLICA:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def _offset(port: int | None, i: int) -> int:
    """Replica i's port for a flag given as ``port`` (a fixed port: port + i; 0 or -1 stay as they are)."""
    if port is None:
        return -1
    return port + i if port > 0 else port


class Supervisor:
    """Starts N replicas, restarts one that dies (after 1 s), stops all on SIGTERM/SIGINT."""

    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.args = args
        self.base = _strip(argv)
        self.group = secrets.token_hex(6)
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = False
        self._lock: IO[str] | None = None
        self._held: list[socket.socket] = []  # the shared ports, held for the group while it lives (hold_port)
        self.run_dir = Path(tempfile.mkdtemp(prefix="dynamo-frontend-replicas-"))

    def acquire(self) -> None:
        a = self.args
        picked = []
        for flag in ("grpc_port", "http_port"):  # 0: a free port, held from this moment
            if getattr(a, flag) == 0:
                self._held.append(hold_port(a.host, 0))
                setattr(a, flag, self._held[-1].getsockname()[1])
                picked.append(getattr(a, flag))
        path = lock_path(a.host, a.grpc_port)
        fh = open(path, "a+")  # held open (and locked) for the supervisor's life
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().split()
            fh.close()
            pid = holder[1] if len(holder) > 1 else "?"
            self._release_ports()
            raise SystemExit(
                f"port {a.grpc_port} is served by another frontend replica group (supervisor pid {pid}, "
                f"lock {path}); stop it first or change --grpc-port"
            ) from None
        ports = [(p, f) for p, f in ((a.grpc_port, "--grpc-port"), (a.http_port, "--http-port")) if p not in picked]
        ports += [(_offset(a.metrics_port, i), "--metrics-port") for i in range(a.replicas)]
        ports += [(_offset(a.health_port, i), "--health-port") for i in range(a.replicas)]
        try:
            check_ports(a.host, ports)  # without SO_REUSEPORT: any holder, stale replica or not, fails this
            for port in (a.grpc_port, a.http_port):  # checked free: now held for the group (hold_port)
                if port > 0 and port not in picked:
                    self._held.append(hold_port(a.host, port))
        except (SystemExit, OSError):
            fh.close()
            self._release_ports()
            raise
        fh.seek(0)
        fh.truncate()
        fh.write(f"{self.group} {os.getpid()}\n")
        fh.flush()
        self._lock = fh

    def _argv(self, i: int) -> list[str]:
        a = self.args
        argv = [*self.base, "--replicas", "1", "--replica-group", self.group, "--grpc-port", str(a.grpc_port),
                "--http-port", str(a.http_port), "--metrics-port", str(_offset(a.metrics_port, i)),
                "--ready-file", str(self.run_dir / f"ready-{i}.json")]
        if a.health_port is not None:
            argv += ["--health-port", str(_offset(a.health_port, i))]
        return argv

    async def _spawn(self, i: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir / f"ready-{i}.json").unlink()
        self.procs[i] = await asyncio.create_subprocess_exec(
            *with_parent_death([sys.executable, "-m", "dynamo_grpc.frontend.main", *self._argv(i)]),
            stdin=asyncio.subprocess.DEVNULL,
        )
        log.info("frontend replica %d started (pid %d)", i, self.procs[i].pid)

    async def _keep(self, i: int) -> None:
        while not self.stopping:
            await self._spawn(i)
            code = await self.procs[i].wait()
            if self.stopping:
                return
            log.error("frontend replica %d (pid %d) exited with %s; restarting in 1 s", i, self.procs[i].pid, code)
            await asyncio.sleep(1.0)

    async def _ready(self) -> None:
        files = [self.run_dir / f"ready-{i}.json" for i in range(self.args.replicas)]
        while not all(f.exists() for f in files):
            await asyncio.sleep(0.1)
        replicas = [json.loads(f.read_text()) for f in files]
        log.info("%d frontend replicas serving on %s", len(replicas), replicas[0]["grpc_address"])
        if self.args.ready_file:
            data: dict[str, Any] = {k: replicas[0][k] for k in ("grpc_address", "http_address")}
            data["replicas"] = replicas
            tmp = Path(self.args.ready_file).with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.args.ready_file)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        keepers = [asyncio.create_task(self._keep(i)) for i in range(self.args.replicas)]
        ready = asyncio.create_task(self._ready())
        await done.wait()
        self.stopping = True
        ready.cancel()
        for p in self.procs.values():
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs.values():
            try:
                await asyncio.wait_for(p.wait(), max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                p.kill()
                await p.wait()
        for k in keepers:
            k.cancel()
        await asyncio.gather(*keepers, ready, return_exceptions=True)
        if self._lock is not None:
            self._lock.close()
        self._release_ports()
        return 0

    def _release_ports(self) -> None:
        for sock in self._held:
            sock.close()
        self._held.clear()


def run_replicas(args: argparse.Namespace, argv: list[str]) -> int:
    """`frontend --replicas N` (N > 1): the supervisor's whole life."""
    sup = Supervisor(args, argv)
    sup.acquire()
    return asyncio.run(sup.run())
