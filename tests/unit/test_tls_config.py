"""transport/tls.py and certs.py: one config from flags or DYN_TLS_* variables, refused when inconsistent,
and run-local certificates that verify with the standard library."""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shlex
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from dynamo_grpc.transport import ClientAuth, TlsConfig, TlsFileError, add_tls_flags
from dynamo_grpc.transport.certs import CertPaths, generate_ca, grpcurl_line, issue, write_local_certs
from dynamo_grpc.transport.reload import CertReloader

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return write_local_certs(tmp_path_factory.mktemp("certs"))


def _parse(argv: list[str], env: dict[str, str], public: bool = True) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_tls_flags(p, public=public, env=env)
    return p.parse_args(argv)


def test_env_variables_give_the_same_config_as_flags(certs: CertPaths, tmp_path: Path) -> None:
    client = issue(generate_ca(), "other", ())
    client.write(tmp_path / "c.pem", tmp_path / "c.key")
    flags = _parse(
        [
            "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key), "--tls-ca", str(certs.ca),
            "--tls-client-cert", str(tmp_path / "c.pem"), "--tls-client-key", str(tmp_path / "c.key"),
            "--tls-server-name", "localhost", "--tls-client-auth", "require", "--tls-reload-interval", "0.5",
            "--health-port", "9100",
        ],
        env={},
    )
    env = _parse(
        [],
        env={
            "DYN_TLS_CERT": str(certs.server_cert), "DYN_TLS_KEY": str(certs.server_key), "DYN_TLS_CA": str(certs.ca),
            "DYN_TLS_CLIENT_CERT": str(tmp_path / "c.pem"), "DYN_TLS_CLIENT_KEY": str(tmp_path / "c.key"),
            "DYN_TLS_SERVER_NAME": "localhost", "DYN_TLS_CLIENT_AUTH": "require", "DYN_TLS_RELOAD_S": "0.5",
            "DYN_HEALTH_PORT": "9100",
        },
    )
    a, b = TlsConfig.from_args(flags), TlsConfig.from_args(env)
    assert a is not None and a == b
    assert a.client_auth is ClientAuth.REQUIRE and a.reload_interval_s == 0.5 and a.server_name == "localhost"
    assert flags.health_port == env.health_port == 9100
    # the client pair is the one given, not the server's
    assert a.certs.client_pair is not None and a.certs.client_pair.cert_file == str(tmp_path / "c.pem")
    assert b.certs.server_pair is not None and b.certs.server_pair.cert_file == str(certs.server_cert)


def test_flags_override_the_environment(certs: CertPaths) -> None:
    ns = _parse(["--tls-ca", str(certs.ca)], env={"DYN_TLS_CA": "/nonexistent/ca.pem"}, public=False)
    cfg = TlsConfig.from_args(ns)
    assert cfg is not None and cfg.ca_file == str(certs.ca)


def test_from_env_without_a_parser(certs: CertPaths) -> None:
    env = {"DYN_TLS_CERT": str(certs.server_cert), "DYN_TLS_KEY": str(certs.server_key), "DYN_TLS_CA": str(certs.ca)}
    cfg = TlsConfig.from_env(env=env)
    assert cfg == TlsConfig(str(certs.server_cert), str(certs.server_key), str(certs.ca))
    assert TlsConfig.from_env(env={}) is None


def test_client_pair_defaults_to_the_server_pair(certs: CertPaths) -> None:
    cfg = TlsConfig(str(certs.server_cert), str(certs.server_key), str(certs.ca))
    assert cfg.certs.client_pair == cfg.certs.server_pair


def test_no_tls_setting_means_plaintext_and_internal_parsers_have_no_client_auth() -> None:
    assert TlsConfig.from_args(_parse([], env={})) is None
    with pytest.raises(SystemExit):
        _parse(["--tls-client-auth", "none"], env={}, public=False)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tls-cert", "{cert}"], "--tls-cert and --tls-key go together"),
        (["--tls-ca", "{ca}", "--tls-client-cert", "{cert}"], "--tls-client-cert and --tls-client-key go together"),
        (["--tls-cert", "{cert}", "--tls-key", "{key}", "--tls-client-auth", "require"], "needs --tls-ca"),
        (["--tls-server-name", "x"], "--tls-server-name given but TLS is off"),
        (["--tls-client-auth", "optional"], "--tls-client-auth given but TLS is off"),
        (["--tls-ca", "/nonexistent/ca.pem"], "cannot read CA file '/nonexistent/ca.pem'"),
        (["--tls-cert", "{cert}", "--tls-key", "{ca_key}"], "does not belong to certificate"),
        (["--tls-cert", "{key}", "--tls-key", "{key}"], "does not parse"),
        (["--tls-ca", "{ca}", "--tls-reload-interval", "0"], "--tls-reload-interval must be positive"),
    ],
)
def test_inconsistent_settings_are_refused_naming_the_flag(certs: CertPaths, argv: list[str], message: str) -> None:
    files = {
        "cert": str(certs.server_cert), "key": str(certs.server_key), "ca": str(certs.ca), "ca_key": str(certs.ca_key)
    }
    with pytest.raises(TlsFileError, match=message):
        TlsConfig.from_args(_parse([a.format(**files) for a in argv], env={}))


def test_a_main_passing_its_parser_exits_with_usage(certs: CertPaths, capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser(prog="dynamo-grpc worker")
    add_tls_flags(p, public=False, env={})
    with pytest.raises(SystemExit) as exit_:
        TlsConfig.from_args(p.parse_args(["--tls-cert", str(certs.server_cert)]), p)
    assert exit_.value.code == 2
    assert "dynamo-grpc worker: error: --tls-cert and --tls-key go together" in capsys.readouterr().err


def test_bad_values_are_refused_naming_the_setting(certs: CertPaths, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(["--tls-client-auth", "sometimes"], env={})
    assert "--tls-client-auth" in capsys.readouterr().err
    env = {"DYN_TLS_CA": str(certs.ca), "DYN_TLS_CLIENT_AUTH": "sometimes"}
    with pytest.raises(TlsFileError, match=re.escape("--tls-client-auth must be none | optional | require, not 'so")):
        TlsConfig.from_env(public=True, env=env)
    for var, flag in (("DYN_HEALTH_PORT", "--health-port"), ("DYN_TLS_RELOAD_S", "--tls-reload-interval")):
        with pytest.raises(SystemExit):
            _parse([], env={var: "soon"})
        assert flag in capsys.readouterr().err


def test_optional_client_auth_is_refused_on_grpc_and_honoured_on_http(certs: CertPaths) -> None:
    cfg = TlsConfig(str(certs.server_cert), str(certs.server_key), str(certs.ca), client_auth=ClientAuth.OPTIONAL)
    with pytest.raises(TlsFileError, match="optional is not available on gRPC"):
        cfg.server_credentials(public=True)
    assert cfg.ssl_context_server(public=True).verify_mode == ssl.CERT_OPTIONAL
    # internal listeners require a certificate whenever a CA is set, whatever the public setting
    assert cfg.ssl_context_server(public=False).verify_mode == ssl.CERT_REQUIRED
    cfg.server_credentials(public=False)


def test_public_listener_policy(certs: CertPaths) -> None:
    cfg = TlsConfig(str(certs.server_cert), str(certs.server_key), str(certs.ca))
    assert cfg.client_auth_for(public=True) is ClientAuth.NONE
    assert cfg.client_auth_for(public=False) is ClientAuth.REQUIRE
    no_ca = TlsConfig(str(certs.server_cert), str(certs.server_key))
    assert no_ca.client_auth_for(public=False) is ClientAuth.NONE


def test_local_certificates_cover_loopback_and_chain_to_the_ca(certs: CertPaths) -> None:
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    server.verify_directly_issued_by(ca)
    x509.load_pem_x509_certificate(certs.client_cert.read_bytes()).verify_directly_issued_by(ca)
    # the standard library accepts the chain and the hostname
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    assert oct(os.stat(certs.server_key).st_mode & 0o777) == "0o600"


def test_issued_certificates_get_fresh_serials() -> None:
    ca = generate_ca()
    a, b = issue(ca, "a"), issue(ca, "a")
    assert a.cert.serial_number != b.cert.serial_number


def test_reloader_keeps_the_old_pair_when_the_new_key_does_not_match(certs: CertPaths, tmp_path: Path) -> None:
    ca = generate_ca()
    first = issue(ca, "first")
    first.write(tmp_path / "s.pem", tmp_path / "s.key")
    r = CertReloader((str(tmp_path / "s.pem"), str(tmp_path / "s.key")), None, None)
    assert r.server_pair is not None and r.server_pair.serial == first.cert.serial_number
    assert not r.poll()  # unchanged files: no reload
    second = issue(ca, "second")
    (tmp_path / "s.pem").write_bytes(second.cert_pem)  # the key is not replaced yet
    assert not r.poll()
    assert r.server_pair.serial == first.cert.serial_number
    second.write(tmp_path / "s.pem", tmp_path / "s.key")
    assert r.poll()
    assert r.server_pair.serial == second.cert.serial_number


def test_certs_command_writes_files_and_prints_exports(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "dynamo_grpc.transport.certs", str(tmp_path / "c")],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in res.stdout.splitlines())
    assert {k: shlex.split(v)[0] for k, v in exports.items()} == {
        "DYN_TLS_CERT": str(tmp_path / "c" / "server.pem"),
        "DYN_TLS_KEY": str(tmp_path / "c" / "server-key.pem"),
        "DYN_TLS_CA": str(tmp_path / "c" / "ca.pem"),
    }
    assert "grpcurl -cacert" in res.stderr
    assert TlsConfig.from_env(env={k: shlex.split(v)[0] for k, v in exports.items()}) is not None


def test_grpcurl_line(certs: CertPaths) -> None:
    assert grpcurl_line("127.0.0.1:8001", certs) == f"grpcurl -cacert {certs.ca} 127.0.0.1:8001 list"
    line = grpcurl_line("127.0.0.1:9000", certs, "describe", "x.Y", client_cert=True)
    assert shlex.split(line) == [
        "grpcurl", "-cacert", str(certs.ca), "-cert", str(certs.client_cert), "-key", str(certs.client_key),
        "127.0.0.1:9000", "describe", "x.Y",
    ]
