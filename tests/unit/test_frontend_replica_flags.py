"""`frontend --replicas` / `--router-replica-sync` as parsed (frontend/replicas.py): what each combination
turns on, what is refused, and what each replica's command line gets from the supervisor."""

from __future__ import annotations

import argparse
import socket

import pytest

from dynamo_grpc.frontend.main import build_parser
from dynamo_grpc.frontend.replicas import _offset, _strip, check_replica_args, hold_port


def _args(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(list(argv))
    check_replica_args(args)
    return args


def test_sync_follows_replicas_unless_told() -> None:
    assert _args().router_replica_sync is False
    assert _args("--router-replica-sync").router_replica_sync is True
    assert _args("--replicas", "2").router_replica_sync is True
    assert _args("--replicas", "2", "--no-router-replica-sync").router_replica_sync is False
    assert _args("--replica-group", "abc").router_replica_sync is True  # a replica of a supervisor
    assert _args("--replicas", "2", "--router-mode", "kv-service").router_replica_sync is False


def test_refused_combinations_name_the_flag() -> None:
    with pytest.raises(ValueError, match="--replicas must be >= 1"):
        _args("--replicas", "0")
    with pytest.raises(ValueError, match="--router-replica-sync applies to the embedded router"):
        _args("--router-replica-sync", "--router-mode", "kv-service")


def test_replica_command_line_drops_what_the_supervisor_sets() -> None:
    argv = ["--replicas", "3", "--grpc-port=9000", "--http-port", "9001", "--namespace", "x",
            "--metrics-port", "9100", "--ready-file", "r.json", "--router-replica-sync"]
    assert _strip(argv) == ["--namespace", "x", "--router-replica-sync"]
    assert [_offset(9100, i) for i in range(3)] == [9100, 9101, 9102]
    assert _offset(0, 2) == 0 and _offset(-1, 2) == -1 and _offset(None, 1) == -1


def test_a_held_port_admits_the_replicas_and_refuses_anyone_else() -> None:
    """The supervisor holds the shared port from the moment it picks it (replicas listen only once they serve a
    model): a replica's SO_REUSEPORT bind shares it and gets the connections, a plain bind fails."""
    held = hold_port("127.0.0.1", 0)
    port = held.getsockname()[1]
    replica = socket.socket()
    try:
        with pytest.raises(OSError), socket.socket() as stranger:
            stranger.bind(("127.0.0.1", port))
        replica.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        replica.bind(("127.0.0.1", port))
        replica.listen()
        for _ in range(8):  # every connection reaches the listening replica, none the held socket
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                conn, _ = replica.accept()
                conn.close()
    finally:
        replica.close()
        held.close()
