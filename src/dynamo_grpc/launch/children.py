"""Process hygiene for launchers: children die with their parent, ports are checked before anything
starts, and a child's failure is reported by its own last line.

``die_with_parent`` is a ``preexec_fn`` for ``subprocess.Popen``. On Linux it asks the kernel
(``prctl(PR_SET_PDEATHSIG, SIGTERM)``) to send the child SIGTERM when the process that started it dies,
however it dies (SIGKILL included), so a killed run-local never leaves a frontend holding its ports. The
children handle SIGTERM as a graceful stop (workers deregister). Other platforms have no such call: there
the children outlive a SIGKILLed launcher (a clean stop or Ctrl-C still stops them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

PR_SET_PDEATHSIG = 1


def _set_pdeathsig(prctl: Callable[..., int], parent: int) -> None:
    if prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        os.write(2, b"warning: prctl(PR_SET_PDEATHSIG) failed; this process will outlive its launcher\n")
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that ties the child's life to this process (Linux); None elsewhere. libc is
    loaded here, before the fork: the child only makes the one system call."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    parent = os.getpid()
    return lambda: _set_pdeathsig(prctl, parent)


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
