"""transport/: reflection and health seen by a real grpcurl, graceful drain, retries, TLS/mTLS and reload."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
import pytest
from aiohttp import web
from cryptography import x509

from dynamo_grpc.transport import (
    ChannelOptions,
    ClientAuth,
    GrpcServer,
    ServerOptions,
    TlsConfig,
    open_channel,
    use_tls,
)
from dynamo_grpc.transport.certs import CertPaths, Issued, generate_ca, grpcurl_line, issue, write_local_certs
from dynamo_grpc.transport.channel import default_tls
from dynamo_grpc.v1 import common_pb2, events_pb2, events_pb2_grpc, router_pb2, router_pb2_grpc
from tests.helpers.grpcurl import grpcurl, grpcurl_path

ROOT = Path(__file__).resolve().parents[2]
EVENTS = "dynamo_grpc.v1.KvEventsService"
ROUTER = "dynamo_grpc.v1.RouterService"


class FlakyRouter(router_pb2_grpc.RouterServiceServicer):
    """Fails the first ``failures`` Route calls with UNAVAILABLE, then answers."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def Route(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return router_pb2.RouteResponse(worker=common_pb2.WorkerId(instance_id="w1"), address="x", mode="kv")


@pytest.fixture
async def server() -> AsyncIterator[GrpcServer]:
    srv = GrpcServer()
    from tests.helpers.stream_server import SlowReplay

    srv.add(events_pb2_grpc.add_KvEventsServiceServicer_to_server, SlowReplay(3, 0.01), EVENTS)
    srv.add(router_pb2_grpc.add_RouterServiceServicer_to_server, FlakyRouter(0), ROUTER)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(0)


async def test_grpcurl_lists_and_describes_services(server: GrpcServer) -> None:
    res = await asyncio.to_thread(grpcurl, server.address, "list")
    assert res.returncode == 0, res.stderr
    services = set(res.stdout.split())
    assert {EVENTS, ROUTER, "grpc.health.v1.Health"} <= services
    desc = await asyncio.to_thread(grpcurl, server.address, "describe", ROUTER)
    assert desc.returncode == 0, desc.stderr
    assert "rpc Route ( .dynamo_grpc.v1.RouteRequest ) returns ( .dynamo_grpc.v1.RouteResponse )" in desc.stdout
    msg = await asyncio.to_thread(grpcurl, server.address, "describe", "dynamo_grpc.v1.KvEventBatch")
    assert "uint64 seq = 3;" in msg.stdout


async def test_grpcurl_health_per_service(server: GrpcServer) -> None:
    res = await asyncio.to_thread(grpcurl, server.address, "grpc.health.v1.Health/Check", data={"service": ROUTER})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["status"] == "SERVING"
    await server.set_serving(False, ROUTER)
    res = await asyncio.to_thread(grpcurl, server.address, "grpc.health.v1.Health/Check", data={"service": ROUTER})
    assert json.loads(res.stdout)["status"] == "NOT_SERVING"
    # the other service is unaffected
    res = await asyncio.to_thread(grpcurl, server.address, "grpc.health.v1.Health/Check", data={"service": EVENTS})
    assert json.loads(res.stdout)["status"] == "SERVING"
    # an unknown service is NOT_FOUND, as the health protocol says
    res = await asyncio.to_thread(grpcurl, server.address, "grpc.health.v1.Health/Check", data={"service": "nope"})
    assert res.returncode != 0 and "NotFound" in res.stderr


async def test_grpcurl_calls_a_streaming_method(server: GrpcServer) -> None:
    res = await asyncio.to_thread(grpcurl, server.address, f"{EVENTS}/Replay", data={"from_seq": 5})
    assert res.returncode == 0, res.stderr
    seqs = [json.loads(chunk)["batch"]["seq"] for chunk in res.stdout.replace("}\n{", "}\x00{").split("\x00")]
    assert seqs == ["6", "7", "8"]


async def test_idempotent_calls_retry_unavailable() -> None:
    flaky = FlakyRouter(failures=2)
    srv = GrpcServer()
    srv.add(router_pb2_grpc.add_RouterServiceServicer_to_server, flaky, ROUTER)
    await srv.start()
    try:
        retrying = open_channel(srv.address, ChannelOptions(idempotent=(f"{ROUTER}/Route",)))
        resp = await router_pb2_grpc.RouterServiceStub(retrying).Route(router_pb2.RouteRequest(model="m"), timeout=5)
        assert resp.worker.instance_id == "w1"
        assert flaky.calls == 3
        await retrying.close()

        flaky.calls, flaky.failures = 0, 1
        plain = open_channel(srv.address)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await router_pb2_grpc.RouterServiceStub(plain).Route(router_pb2.RouteRequest(model="m"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        await plain.close()
    finally:
        await srv.stop(0)


async def test_sigterm_drains_in_flight_stream_and_refuses_new_calls() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.helpers.stream_server", "--batches", "10", "--interval", "0.1",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        address = json.loads(line)["address"]
        channel = open_channel(address)
        stub = events_pb2_grpc.KvEventsServiceStub(channel)
        call = stub.Replay(events_pb2.ReplayRequest(from_seq=0), timeout=30)
        first = await call.read()
        assert first.batch.seq == 1
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        with pytest.raises(grpc.aio.AioRpcError):
            # new RPCs are refused once the server stops accepting
            await events_pb2_grpc.KvEventsServiceStub(open_channel(address)).Replay(
                events_pb2.ReplayRequest(from_seq=100), timeout=5
            ).read()
        rest = []
        while (msg := await call.read()) is not grpc.aio.EOF:
            rest.append(msg.batch.seq)
        assert rest == list(range(2, 11)), "the in-flight stream must finish during the drain"
        assert await call.code() == grpc.StatusCode.OK
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        await channel.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# ---------------------------------------------------------------------------------------------- TLS
HEALTH = "grpc.health.v1.Health"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return write_local_certs(tmp_path_factory.mktemp("certs"))


def _server_tls(certs: CertPaths, **kw: object) -> TlsConfig:
    return TlsConfig(str(certs.server_cert), str(certs.server_key), str(certs.ca), **kw)  # type: ignore[arg-type]


async def _tls_server(tls: TlsConfig, *, public: bool = False, batches: int = 3, interval: float = 0.01,
                      health_port: int | None = None) -> GrpcServer:
    from tests.helpers.stream_server import SlowReplay

    srv = GrpcServer(ServerOptions(tls=tls, public=public, health_port=health_port))
    srv.add(events_pb2_grpc.add_KvEventsServiceServicer_to_server, SlowReplay(batches, interval), EVENTS)
    await srv.start()
    return srv


async def _replay(channel: grpc.aio.Channel, from_seq: int = 0) -> list[int]:
    call = events_pb2_grpc.KvEventsServiceStub(channel).Replay(events_pb2.ReplayRequest(from_seq=from_seq), timeout=10)
    return [r.batch.seq async for r in call]


async def _refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _replay(channel)
    await channel.close()
    return err.value.code()


def _secure(address: str, tls: TlsConfig) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=tls.channel_args())  # type: ignore[arg-type]


async def test_internal_listener_requires_a_client_certificate_from_the_ca(certs: CertPaths, tmp_path: Path) -> None:
    srv = await _tls_server(_server_tls(certs))
    try:
        no_cert = TlsConfig(ca_file=str(certs.ca))
        assert await _refused(_secure(srv.address, no_cert)) == grpc.StatusCode.UNAVAILABLE
        # a certificate from another CA (that the client itself trusts) is refused too
        rogue = generate_ca("rogue CA")
        rogue.write(tmp_path / "rogue-ca.pem", tmp_path / "rogue-ca.key")
        issue(rogue, "intruder", (), server=False).write(tmp_path / "bad.pem", tmp_path / "bad.key")
        wrong_ca = TlsConfig(
            ca_file=str(certs.ca), client_cert_file=str(tmp_path / "bad.pem"), client_key_file=str(tmp_path / "bad.key")
        )
        assert await _refused(_secure(srv.address, wrong_ca)) == grpc.StatusCode.UNAVAILABLE
        assert await _refused(grpc.aio.insecure_channel(srv.address)) == grpc.StatusCode.UNAVAILABLE
        # the server kept serving: a client with a certificate from the CA works
        good = TlsConfig(
            ca_file=str(certs.ca), client_cert_file=str(certs.client_cert), client_key_file=str(certs.client_key)
        )
        async with _secure(srv.address, good) as ch:
            assert await _replay(ch) == [1, 2, 3]
        # a peer process dials with its own server pair (the default client pair), through open_channel
        ch = open_channel(srv.address, ChannelOptions(tls=_server_tls(certs)))
        assert await _replay(ch, 10) == [11, 12, 13]
        await ch.close()
    finally:
        await srv.stop(0)


async def test_public_listener_accepts_tls_clients_without_a_certificate(certs: CertPaths) -> None:
    srv = await _tls_server(_server_tls(certs), public=True)
    try:
        async with _secure(srv.address, TlsConfig(ca_file=str(certs.ca))) as ch:
            assert await _replay(ch) == [1, 2, 3]
        assert await _refused(grpc.aio.insecure_channel(srv.address)) == grpc.StatusCode.UNAVAILABLE
    finally:
        await srv.stop(0)
    # --tls-client-auth require makes the public listener mTLS as well
    srv = await _tls_server(_server_tls(certs, client_auth=ClientAuth.REQUIRE), public=True)
    try:
        assert await _refused(_secure(srv.address, TlsConfig(ca_file=str(certs.ca)))) == grpc.StatusCode.UNAVAILABLE
        ch = _secure(srv.address, TlsConfig(
            ca_file=str(certs.ca), client_cert_file=str(certs.client_cert), client_key_file=str(certs.client_key)
        ))
        assert await _replay(ch) == [1, 2, 3]
        await ch.close()
    finally:
        await srv.stop(0)


async def test_server_name_override_verifies_a_certificate_issued_for_another_name(tmp_path: Path) -> None:
    ca = generate_ca()
    ca.write(tmp_path / "ca.pem", tmp_path / "ca.key")
    issue(ca, "router", ("router.mesh.internal",)).write(tmp_path / "s.pem", tmp_path / "s.key")
    server = TlsConfig(str(tmp_path / "s.pem"), str(tmp_path / "s.key"), str(tmp_path / "ca.pem"))
    srv = await _tls_server(server)
    try:
        # dialled by IP, the name check fails ...
        assert await _refused(open_channel(srv.address, ChannelOptions(tls=server))) == grpc.StatusCode.UNAVAILABLE
        # ... unless the expected name is given
        named = TlsConfig(
            str(tmp_path / "s.pem"), str(tmp_path / "s.key"), str(tmp_path / "ca.pem"),
            server_name="router.mesh.internal",
        )
        ch = open_channel(srv.address, ChannelOptions(tls=named))
        assert await _replay(ch) == [1, 2, 3]
        await ch.close()
    finally:
        await srv.stop(0)


async def test_use_tls_makes_every_channel_of_the_process_dial_with_tls(certs: CertPaths) -> None:
    srv = await _tls_server(_server_tls(certs))
    try:
        use_tls(_server_tls(certs))
        ch = open_channel(srv.address)  # what routing.py / engine_client.py do, unchanged
        assert await _replay(ch) == [1, 2, 3]
        await ch.close()
    finally:
        use_tls(None)
        await srv.stop(0)
    assert default_tls() is None


async def test_health_port_serves_probes_in_plaintext_only_health(certs: CertPaths) -> None:
    srv = await _tls_server(_server_tls(certs), health_port=0)
    try:
        assert srv.health_port
        probe = f"127.0.0.1:{srv.health_port}"
        res = await asyncio.to_thread(grpcurl, probe, f"{HEALTH}/Check", data={"service": EVENTS})
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["status"] == "SERVING"
        # the probe listener shares the statuses of the TLS server
        await srv.set_serving(False, EVENTS)
        res = await asyncio.to_thread(grpcurl, probe, f"{HEALTH}/Check", data={"service": EVENTS})
        assert json.loads(res.stdout)["status"] == "NOT_SERVING"
        # and exposes nothing else: no application service without a certificate
        ch = grpc.aio.insecure_channel(probe)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _replay(ch)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        await ch.close()
        res = await asyncio.to_thread(grpcurl, probe, "list")
        assert set(res.stdout.split()) == {HEALTH, "grpc.reflection.v1alpha.ServerReflection"}
    finally:
        await srv.stop(0)
    assert srv._health_server is None


def _grpcurl_tls(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([grpcurl_path(), "-max-time", "20", *args], capture_output=True, text=True, timeout=30)


async def test_grpcurl_with_cacert_lists_services(certs: CertPaths) -> None:
    public = await _tls_server(_server_tls(certs), public=True)
    internal = await _tls_server(_server_tls(certs))
    try:
        res = await asyncio.to_thread(_grpcurl_tls, *shlex.split(grpcurl_line(public.address, certs))[1:])
        assert res.returncode == 0, res.stderr
        assert {EVENTS, HEALTH} <= set(res.stdout.split())
        # internal listeners want the client certificate as well
        res = await asyncio.to_thread(_grpcurl_tls, *shlex.split(grpcurl_line(internal.address, certs))[1:])
        assert res.returncode != 0
        line = grpcurl_line(internal.address, certs, client_cert=True)
        res = await asyncio.to_thread(_grpcurl_tls, *shlex.split(line)[1:])
        assert res.returncode == 0, res.stderr
        assert EVENTS in res.stdout.split()
    finally:
        await public.stop(0)
        await internal.stop(0)


async def _https_site(tls: TlsConfig, public: bool) -> tuple[web.AppRunner, str]:
    async def ping(_: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/ping", ping)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls.ssl_context_server(public))
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"127.0.0.1:{port}"


async def test_https_server_with_the_same_config(certs: CertPaths) -> None:
    runner, address = await _https_site(_server_tls(certs), public=False)
    try:
        client = TlsConfig(
            ca_file=str(certs.ca), client_cert_file=str(certs.client_cert), client_key_file=str(certs.client_key)
        )
        async with aiohttp.ClientSession() as s:
            async with s.get(f"https://{address}/ping", ssl=client.ssl_context_client()) as r:
                assert r.status == 200 and await r.json() == {"ok": True}
            # plaintext HTTP to the TLS port fails
            with pytest.raises(aiohttp.ClientError):
                async with s.get(f"http://{address}/ping") as r:
                    await r.read()
            # internal setting: a client without a certificate is refused in the handshake
            with pytest.raises(aiohttp.ClientError):
                async with s.get(f"https://{address}/ping", ssl=TlsConfig(ca_file=str(certs.ca)).ssl_context_client()):
                    pass
    finally:
        await runner.cleanup()
    # the public setting (default --tls-client-auth none) serves clients that only bring the CA
    runner, address = await _https_site(_server_tls(certs), public=True)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"https://{address}/ping", ssl=TlsConfig(ca_file=str(certs.ca)).ssl_context_client()) as r:
                assert r.status == 200
    finally:
        await runner.cleanup()


# -------------------------------------------------------------------------------------- TLS reload
def _peer_serial(address: str, certs: CertPaths) -> int:
    """Open a NEW connection and return the serial of the certificate the server presents."""
    host, port = address.rsplit(":", 1)
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    ctx.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw, server_hostname=host) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _live_copy(certs: CertPaths, directory: Path) -> tuple[TlsConfig, Issued]:
    """The server pair copied to files the test may replace, and the CA to issue the replacement."""
    shutil.copy(certs.server_cert, directory / "server.pem")
    shutil.copy(certs.server_key, directory / "server-key.pem")
    ca = Issued(certs.ca.read_bytes(), certs.ca_key.read_bytes())
    return TlsConfig(str(directory / "server.pem"), str(directory / "server-key.pem"), str(certs.ca),
                     reload_interval_s=0.1), ca


async def _stream_survives_reload(address: str, certs: CertPaths, replace: Callable[[], Awaitable[int]]) -> None:
    ch = _secure(address, TlsConfig(
        ca_file=str(certs.ca), client_cert_file=str(certs.client_cert), client_key_file=str(certs.client_key)
    ))
    call = events_pb2_grpc.KvEventsServiceStub(ch).Replay(events_pb2.ReplayRequest(from_seq=0), timeout=30)
    seen = [(await call.read()).batch.seq for _ in range(3)]
    old_serial = await asyncio.to_thread(_peer_serial, address, certs)
    new_serial = await replace()
    assert new_serial != old_serial
    deadline = asyncio.get_running_loop().time() + 10
    while (served := await asyncio.to_thread(_peer_serial, address, certs)) != new_serial:
        assert served == old_serial
        assert asyncio.get_running_loop().time() < deadline, "new connections never saw the new certificate"
        await asyncio.sleep(0.05)
    while (msg := await call.read()) is not grpc.aio.EOF:
        seen.append(msg.batch.seq)
    assert await call.code() == grpc.StatusCode.OK
    assert seen == list(range(1, 41)), "the stream opened before the reload must run on uninterrupted"
    await ch.close()


async def test_reload_on_file_change_keeps_streams_and_serves_the_new_certificate(
    certs: CertPaths, tmp_path: Path
) -> None:
    tls, ca = _live_copy(certs, tmp_path)
    srv = await _tls_server(tls, batches=40, interval=0.05)

    async def replace() -> int:
        new = issue(ca, "dynamo-grpc rotated")
        new.write(tmp_path / "server.pem", tmp_path / "server-key.pem")  # the mtime poll notices
        return new.cert.serial_number

    try:
        await _stream_survives_reload(srv.address, certs, replace)
    finally:
        await srv.stop(0)


async def test_sighup_reloads_certificates_for_grpc_and_https(certs: CertPaths, tmp_path: Path) -> None:
    tls, ca = _live_copy(certs, tmp_path)
    tls.certs.poll_interval_s = 3600  # only the signal can trigger this reload
    srv = await _tls_server(tls, batches=40, interval=0.05)
    runner, https = await _https_site(tls, public=False)

    async def replace() -> int:
        new = issue(ca, "dynamo-grpc sighup")
        new.write(tmp_path / "server.pem", tmp_path / "server-key.pem")
        await asyncio.sleep(0.3)
        assert await asyncio.to_thread(_peer_serial, srv.address, certs) != new.cert.serial_number
        os.kill(os.getpid(), signal.SIGHUP)
        return new.cert.serial_number

    try:
        await _stream_survives_reload(srv.address, certs, replace)
        # the aiohttp listener's live SSL context took the new certificate too
        assert await asyncio.to_thread(_peer_serial, https, certs) == x509.load_pem_x509_certificate(
            (tmp_path / "server.pem").read_bytes()
        ).serial_number
    finally:
        await runner.cleanup()
        await srv.stop(0)
    assert tls.certs._task is None, "the last listener's stop ends the file watch"


async def test_a_real_process_configured_by_env_reloads_on_sighup(certs: CertPaths, tmp_path: Path) -> None:
    tls, ca = _live_copy(certs, tmp_path)
    env = {
        **os.environ, "DYN_TLS_CERT": str(tls.cert_file), "DYN_TLS_KEY": str(tls.key_file), "DYN_TLS_CA": str(certs.ca),
        "DYN_TLS_RELOAD_S": "3600",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.helpers.stream_server", "--batches", "40", "--interval", "0.05",
        "--health-port", "0", cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        started = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))

        async def replace() -> int:
            new = issue(ca, "dynamo-grpc process")
            new.write(tmp_path / "server.pem", tmp_path / "server-key.pem")
            proc.send_signal(signal.SIGHUP)
            return new.cert.serial_number

        await _stream_survives_reload(started["address"], certs, replace)
        probe = f"127.0.0.1:{started['health_port']}"
        res = await asyncio.to_thread(grpcurl, probe, f"{HEALTH}/Check", data={"service": EVENTS})
        assert json.loads(res.stdout)["status"] == "SERVING", res.stderr
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_broken_replacement_is_refused_and_the_server_keeps_its_certificate(
    certs: CertPaths, tmp_path: Path
) -> None:
    tls, ca = _live_copy(certs, tmp_path)
    srv = await _tls_server(tls)
    try:
        before = await asyncio.to_thread(_peer_serial, srv.address, certs)
        # a new certificate next to the old key (a rotation caught half-way), then garbage
        (tmp_path / "server.pem").write_bytes(issue(ca, "half-way").cert_pem)
        assert not tls.certs.poll()
        (tmp_path / "server-key.pem").write_text("not a key")
        assert not tls.certs.reload()
        assert await asyncio.to_thread(_peer_serial, srv.address, certs) == before
        ch = _secure(srv.address, TlsConfig(
            ca_file=str(certs.ca), client_cert_file=str(certs.client_cert), client_key_file=str(certs.client_key)
        ))
        assert await _replay(ch) == [1, 2, 3]
        await ch.close()
    finally:
        await srv.stop(0)
