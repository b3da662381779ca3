"""Throwaway certificates for a mesh on one machine (run-local, tests).

A fresh CA per run, and certificates it signs for 127.0.0.1 / localhost (SAN IP and DNS), so
TLS and mTLS can be switched on without an operator's PKI:

    python -m dynamo_grpc.transport.certs DIR

writes ``ca.pem``, ``server.pem``/``server-key.pem`` (serverAuth + clientAuth: every process also
dials its peers with it) and ``client.pem``/``client-key.pem`` (clientAuth only, for grpcurl or a
test client), and prints the ``DYN_TLS_*`` exports and a grpcurl line. Keys are EC P-256, files
0600. The CA key is written too (``ca-key.pem``) so a test can issue a replacement certificate for
a reload.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: names every local certificate is valid for
LOCAL_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    def write(self, cert_path: Path, key_path: Path) -> None:
        _write(cert_path, self.cert_pem, 0o644)
        _write(key_path, self.key_pem, 0o600)


@dataclass(frozen=True)
class CertPaths:
    """Where :func:`write_local_certs` put each file."""

    directory: Path
    ca: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def env(self) -> dict[str, str]:
        """The ``DYN_TLS_*`` variables that turn TLS/mTLS on for every process of the mesh."""
        return {
            "DYN_TLS_CERT": str(self.server_cert),
            "DYN_TLS_KEY": str(self.server_key),
            "DYN_TLS_CA": str(self.ca),
        }


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write then rename, so a process polling the file for reload never reads half of it."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    pkcs8 = serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dynamo-grpc run-local"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def generate_ca(common_name: str = "dynamo-grpc local CA", days: int = 30) -> Issued:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(
    ca: Issued,
    common_name: str,
    hosts: Sequence[str] = LOCAL_HOSTS,
    *,
    server: bool = True,
    client: bool = True,
    days: int = 30,
) -> Issued:
    """A leaf certificate signed by ``ca``, valid for ``hosts`` (IP or DNS SANs), with a fresh serial."""
    if not (server or client):
        raise ValueError("a certificate must allow server or client authentication")
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key must be an EC key (as generate_ca writes)")
    ca_cert = ca.cert
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def write_local_certs(directory: str | os.PathLike[str], hosts: Sequence[str] = LOCAL_HOSTS) -> CertPaths:
    """Create a new CA and a server and a client certificate for ``hosts`` under ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths = CertPaths(
        directory=d,
        ca=d / "ca.pem",
        ca_key=d / "ca-key.pem",
        server_cert=d / "server.pem",
        server_key=d / "server-key.pem",
        client_cert=d / "client.pem",
        client_key=d / "client-key.pem",
    )
    ca = generate_ca()
    ca.write(paths.ca, paths.ca_key)
    issue(ca, "dynamo-grpc", hosts, server=True, client=True).write(paths.server_cert, paths.server_key)
    issue(ca, "dynamo-grpc client", (), server=False, client=True).write(paths.client_cert, paths.client_key)
    return paths


def grpcurl_line(address: str, paths: CertPaths, *args: str, client_cert: bool = False) -> str:
    """A ready-to-paste grpcurl command against a TLS listener (``list`` when no args).

    ``client_cert`` adds ``-cert/-key`` for listeners that require one (internal ones under mTLS).
    """
    cmd = ["grpcurl", "-cacert", str(paths.ca)]
    if client_cert:
        cmd += ["-cert", str(paths.client_cert), "-key", str(paths.client_key)]
    cmd += [address, *(args or ("list",))]
    return shlex.join(cmd)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dynamo_grpc.transport.certs", description=__doc__.split("\n\n")[0])
    p.add_argument("directory", help="where to write ca.pem, server.pem, client.pem and their keys")
    p.add_argument(
        "--host",
        action="append",
        default=None,
        help=f"a name or IP the server certificate is valid for (repeatable; default {' '.join(LOCAL_HOSTS)})",
    )
    args = p.parse_args(argv)
    paths = write_local_certs(args.directory, tuple(args.host) if args.host else LOCAL_HOSTS)
    for key, value in paths.env().items():
        print(f"export {key}={shlex.quote(value)}")
    print(f"# {grpcurl_line('127.0.0.1:8001', paths)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
