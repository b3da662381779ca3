"""Process hygiene for launchers: children die with their parent, ports are checked before anything
starts, and a child's failure is reported by its own last line.

``with_parent_death(argv)`` is the command line to give ``subprocess.Popen`` instead of ``argv``: a short
Python trampoline that asks the kernel (``prctl(PR_SET_PDEATHSIG, SIGTERM)``) to send it SIGTERM when the
process that started it dies, however it dies (SIGKILL included), then execs ``argv`` in place (same pid;
the setting survives exec), so a killed run-local never leaves a frontend holding its ports. The children
handle SIGTERM as a graceful stop (workers deregister). Other platforms have no such call: there the
children outlive a SIGKILLed launcher (a clean stop or Ctrl-C still stops them).

Why not a ``preexec_fn``: it makes ``subprocess`` fork() (instead of vfork) and run Python in the child,
and fork() runs gRPC's at-fork handlers, which restart its poller thread in the child; ``close_fds`` then
closes that poller's epoll fd and the child aborts before exec with "epoll_wait: Bad file descriptor"
(exit -6; grpc/grpc#43055, grpcio 1.80 to 1.83). Any launcher with live gRPC calls (a benchmark's client,
the planner's probes) hit it now and then. Without a ``preexec_fn`` ``subprocess`` uses vfork, which runs
no at-fork handlers.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

PR_SET_PDEATHSIG = 1


#: argv[1]: the launcher's pid, argv[2:]: the command to exec (``python -I -S``: no site, no PYTHON* variables;
#: the command still gets the whole environment)
_TRAMPOLINE = f"""
import ctypes, os, signal, sys
if sys.platform.startswith("linux"):
    if ctypes.CDLL(None, use_errno=True).prctl({PR_SET_PDEATHSIG}, int(signal.SIGTERM), 0, 0, 0) != 0:
        os.write(2, b"warning: prctl(PR_SET_PDEATHSIG) failed; this process will outlive its launcher\\n")
    if os.getppid() != int(sys.argv[1]):  # the launcher died before prctl took effect
        sys.exit(0)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def with_parent_death(argv: Sequence[str]) -> list[str]:
    """``argv`` run through the trampoline above: it dies (SIGTERM) with this process. Give the result
    to ``subprocess.Popen`` (or asyncio's ``create_subprocess_exec``) without a ``preexec_fn``."""
    if not argv:
        raise ValueError("with_parent_death needs a command")
    return [sys.executable, "-I", "-S", "-c", _TRAMPOLINE, str(os.getpid()), *argv]


def port_in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` would fail now (a listener holds it). Port 0 or < 0: never."""
    if port <= 0:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def check_ports(host: str, ports: Iterable[tuple[int, str]]) -> None:
    """Refuse to start when a port is taken: ``SystemExit("port 8001 is in use (change it with
    --grpc-port)")``, one line naming the port and the flag, instead of a bind traceback later."""
    for port, flag in ports:
        if port_in_use(host, port):
            raise SystemExit(f"port {port} is in use (change it with {flag})")


def last_line(path: Path) -> str:
    """The last non-empty line of a child's log (its own explanation of why it exited)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, os.path.getsize(path) - 8192))
            lines = [ln.strip() for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""
