"""What a process advertises: --advertise-host, the wildcard bind rule, and host replacement in addresses."""

from __future__ import annotations

import pytest

from dynamo_grpc.transport import addresses
from dynamo_grpc.transport.addresses import advertise_host, check_metrics_port, with_host


def test_bind_host_is_advertised_unless_told_otherwise() -> None:
    assert advertise_host("10.1.2.3", None) == "10.1.2.3"
    assert advertise_host("0.0.0.0", "10.9.9.9") == "10.9.9.9"


def test_wildcard_bind_advertises_the_first_non_loopback_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(addresses, "first_non_loopback", lambda: "192.168.7.7")
    assert advertise_host("0.0.0.0", None) == "192.168.7.7"
    monkeypatch.setattr(addresses, "first_non_loopback", lambda: None)
    with pytest.raises(ValueError, match="--advertise-host"):
        advertise_host("0.0.0.0", None)


def test_a_wildcard_is_never_advertised() -> None:
    with pytest.raises(ValueError, match="--advertise-host"):
        advertise_host("127.0.0.1", "0.0.0.0")


def test_first_non_loopback_is_not_loopback() -> None:
    found = addresses.first_non_loopback()
    assert found is None or not found.startswith("127.")


def test_with_host_keeps_scheme_and_port() -> None:
    assert with_host("0.0.0.0:9000", "10.0.0.7") == "10.0.0.7:9000"
    assert with_host("tcp://0.0.0.0:9004", "10.0.0.7") == "tcp://10.0.0.7:9004"
    assert with_host("[::]:9000", "fd00::7") == "[fd00::7]:9000"


def test_metrics_port_range() -> None:
    check_metrics_port(-1)
    check_metrics_port(0)
    with pytest.raises(ValueError, match="--metrics-port"):
        check_metrics_port(-2)
