"""The client over HTTPS with mutual TLS, configured only through Consul's environment variables."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import aiohttp
import pytest

from dynamo_grpc.discovery import ConsulSettings, Discovery, Instance
from dynamo_grpc.discovery.agent import start_consul_dev

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(cwd: Path, name: str, cn: str, ext: str) -> None:
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={cn}",
        cwd=cwd,
    )
    (cwd / f"{name}.ext").write_text(ext)
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "1",
        "-extfile",
        f"{name}.ext",
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=dynamo-test-ca",
        cwd=d,
    )
    _issue(d, "server", "127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    _issue(d, "client", "dynamo-client", "extendedKeyUsage=clientAuth\n")
    return d


async def test_mtls_via_environment(pki: Path) -> None:
    agent = start_consul_dev(
        extra_args=[
            "--tls-cert",
            str(pki / "server.pem"),
            "--tls-key",
            str(pki / "server.key"),
            "--tls-client-ca",
            str(pki / "ca.pem"),
        ]
    )
    try:
        assert agent.address.startswith("https://")
        env = {
            "CONSUL_HTTP_ADDR": agent.address,
            "CONSUL_CACERT": str(pki / "ca.pem"),
            "CONSUL_CLIENT_CERT": str(pki / "client.pem"),
            "CONSUL_CLIENT_KEY": str(pki / "client.key"),
        }
        async with Discovery(ConsulSettings.from_env(env), watch_wait=5) as d:
            await d.register(Instance("dynamo-worker", "tls-1", "127.0.0.1", 7000), ttl=5.0)
            snaps = d.watch("dynamo-worker")
            snap = await asyncio.wait_for(snaps.__anext__(), 10)
            assert [i.instance_id for i in snap] == ["tls-1"]
            await snaps.aclose()  # type: ignore[attr-defined]
        # Without a client certificate the agent refuses the handshake.
        no_cert = {k: v for k, v in env.items() if not k.startswith("CONSUL_CLIENT")}
        async with Discovery(ConsulSettings.from_env(no_cert)) as anonymous:
            with pytest.raises(aiohttp.ClientError):
                await anonymous.register(Instance("dynamo-worker", "tls-2", "127.0.0.1", 7001))
        # Nor does the client trust an agent it cannot verify.
        async with Discovery(
            ConsulSettings.from_env({**env, "CONSUL_CACERT": str(pki / "client.pem")})
        ) as d2:
            with pytest.raises(aiohttp.ClientConnectorError):
                await d2.register(Instance("dynamo-worker", "tls-3", "127.0.0.1", 7002))
    finally:
        agent.stop()
