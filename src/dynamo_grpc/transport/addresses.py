"""What a process advertises in Consul, and the flags every role shares for it.

A process binds ``--host`` and advertises ``--advertise-host`` (default: the bind host). Binding every
interface (``0.0.0.0`` / ``::``) advertises an address nobody can dial, so then, like Consul's own
``advertise_addr``, the default is this machine's first non-loopback address (in a container or a pod,
its IP); a machine with none refuses to start and names ``--advertise-host``.

``--metrics-port`` is one flag with one meaning on every role: the Prometheus ``/metrics`` port,
``0`` (the default) any free port, ``-1`` off; the bound address goes into Consul Meta
``metrics_address`` so ``consul_sd_configs`` finds every process.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket

METRICS_META = "metrics_address"
DEFAULT_METRICS_PORT = 0
_WILDCARDS = ("0.0.0.0", "::", "")


def add_address_flags(parser: argparse.ArgumentParser, zmq: bool = False) -> None:
    """``--advertise-host`` and ``--metrics-port`` (and ``--zmq-port`` for processes that publish events)."""
    g = parser.add_argument_group("addresses")
    g.add_argument(
        "--advertise-host",
        default=None,
        help="host other processes dial (in Consul); default: --host, or with 0.0.0.0 this machine's first "
        "non-loopback address",
    )
    g.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help="Prometheus /metrics port (Consul Meta metrics_address); 0: any free port (default), -1: off",
    )
    if zmq:
        g.add_argument(
            "--zmq-port",
            type=int,
            default=0,
            help="fixed port of the ZeroMQ event publisher (for NetworkPolicies); 0: any free port (default)",
        )


def is_wildcard(host: str) -> bool:
    return host in _WILDCARDS


def first_non_loopback() -> str | None:
    """This machine's first non-loopback IPv4 address (no packet is sent), or None."""
    candidates: list[str] = []
    try:
        candidates += socket.gethostbyname_ex(socket.gethostname())[2]
    except OSError:
        pass
    try:  # the source address the kernel would use for a non-local destination; UDP connect sends nothing
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            candidates.append(s.getsockname()[0])
    except OSError:
        pass
    for c in candidates:
        if not ipaddress.ip_address(c).is_loopback and not ipaddress.ip_address(c).is_unspecified:
            return c
    return None


def advertise_host(bind_host: str, advertise: str | None) -> str:
    """The host to advertise; ValueError (naming the flag) when binding every interface leaves none."""
    if advertise:
        if is_wildcard(advertise):
            raise ValueError(f"--advertise-host {advertise!r}: advertise an address peers can dial, not a wildcard")
        return advertise
    if not is_wildcard(bind_host):
        return bind_host
    found = first_non_loopback()
    if found is None:
        raise ValueError(
            f"--host {bind_host} binds every interface but this machine has no non-loopback address to "
            "advertise; set --advertise-host (DYN_ADVERTISE_HOST)"
        )
    return found


def with_host(address: str, host: str) -> str:
    """``host:port`` (or ``tcp://host:port``) with its host replaced; IPv6 hosts get brackets."""
    scheme, sep, rest = address.rpartition("://")
    _old, _, port = rest.rpartition(":")
    h = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{scheme}{sep}{h}:{port}"


def check_metrics_port(port: int) -> None:
    if port < -1 or port > 65535:
        raise ValueError(f"--metrics-port {port}: want a port, 0 (any free port) or -1 (off)")
