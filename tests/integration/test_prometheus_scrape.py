"""A real Prometheus server (Debian's `prometheus`) finds every process of a mesh through Consul with the
shipped deploy/prometheus/run-local.yml, scrapes their /metrics, and answers a PromQL histogram_quantile over
the frontend's true TTFT histogram.

`make test` installs the package (apt); where it cannot be installed the test is skipped, saying so.
Debian builds Prometheus without the Consul discoverer (`consul_sd_configs` is "not found in type
config.ScrapeConfig" there). With such a build the test keeps the shipped job (its relabel rules, its
services) and swaps only the discoverer for `http_sd_configs` served by `ConsulHttpSd` below: a faithful
stand-in of Prometheus' Consul discovery, giving each passing instance of the job's services the same
`__meta_consul_*` labels Prometheus documents (service, service_id, tags, service_metadata_<key>), read from
the mesh's real Consul. An upstream Prometheus uses `consul_sd_configs` itself.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from dynamo_grpc.launch.consul_http import passing_instances
from dynamo_grpc.launch.mesh import Mesh, MeshConfig

pytestmark = pytest.mark.slow

PROMETHEUS = shutil.which("prometheus")
CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "run-local.yml"
METRICS = ["--metrics-port", "0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _query(base: str, path: str, **params: str) -> Any:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]


def _has_consul_sd(tmp: Path) -> bool:
    promtool = shutil.which("promtool")
    probe = tmp / "probe.yml"
    probe.write_text("scrape_configs: [{job_name: p, consul_sd_configs: [{server: '127.0.0.1:1'}]}]\n")
    if promtool is None:
        return False
    return subprocess.run([promtool, "check", "config", str(probe)], capture_output=True).returncode == 0


class ConsulHttpSd:
    """Prometheus HTTP service discovery answering what `consul_sd_configs` would discover (see module doc)."""

    def __init__(self, consul: str, token: str | None, services: list[str]) -> None:
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps(outer.groups()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.consul, self.token, self.services = consul, token, services
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/sd"

    def groups(self) -> list[dict[str, Any]]:
        out = []
        for name in self.services:
            for e in passing_instances(self.consul, name, token=self.token):
                svc, node = e["Service"], e["Node"]
                labels = {
                    "__meta_consul_service": svc["Service"],
                    "__meta_consul_service_id": svc["ID"],
                    "__meta_consul_service_address": svc.get("Address", ""),
                    "__meta_consul_service_port": str(svc.get("Port", "")),
                    "__meta_consul_node": node.get("Node", ""),
                    "__meta_consul_tags": "," + ",".join(svc.get("Tags") or []) + ",",
                    **{f"__meta_consul_service_metadata_{k}": v for k, v in (svc.get("Meta") or {}).items()},
                }
                address = f"{svc.get('Address') or node.get('Address')}:{svc['Port']}"
                out.append({"targets": [address], "labels": labels})
        return out

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    cfg = MeshConfig(
        workers=2, speedup_ratio=1000.0, router_mode="kv-service", http_port=0, ready_timeout_s=90.0,
        worker_args=METRICS, frontend_args=METRICS, router_args=METRICS,
    )  # fmt: skip
    with Mesh(cfg) as m:
        yield m


@pytest.fixture(scope="module")
def prometheus(mesh: Mesh, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if PROMETHEUS is None:
        pytest.skip("Debian's `prometheus` is not installed (make test installs it with apt-get where it can)")
    tmp = tmp_path_factory.mktemp("prometheus")
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["global"]["scrape_interval"] = "1s"
    sd = cfg["scrape_configs"][0]["consul_sd_configs"][0]
    sd["server"] = mesh.consul.split("://")[-1]  # the shipped file, pointed at this mesh's consul-dev
    sd["refresh_interval"] = "1s"
    if mesh.consul_token:
        sd["token"] = mesh.consul_token
    job = cfg["scrape_configs"][0]
    bridge = None
    if not _has_consul_sd(tmp):  # Debian's build: same job, same relabelling, discovery via the stand-in
        consul_url = mesh.consul if "://" in mesh.consul else f"http://{mesh.consul}"
        bridge = ConsulHttpSd(consul_url, mesh.consul_token, sd["services"])
        job["http_sd_configs"] = [{"url": bridge.url, "refresh_interval": "1s"}]
        del job["consul_sd_configs"]
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = _free_port()
    log = open(tmp / "prometheus.log", "wb")  # closed in finally
    proc = subprocess.Popen(
        [
            PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if bridge is not None:
            bridge.stop()


def _wait(what: str, fn: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except OSError as e:  # prometheus still starting
            last = e
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last}")


async def test_prometheus_scrapes_every_process_and_charts_ttft(mesh: Mesh, prometheus: str) -> None:
    seen: list[Any] = []

    def all_up() -> list[dict[str, Any]] | None:
        seen[:] = _query(prometheus, "/api/v1/targets")["activeTargets"]
        up = [t for t in seen if t["health"] == "up"]
        return up if len(up) == 4 else None  # frontend, router, 2 workers

    try:
        up = _wait("4 targets up (frontend, router, 2 workers)", all_up)
    except AssertionError as e:
        raise AssertionError(f"{e}; targets: {[(t['scrapeUrl'], t['health'], t['lastError']) for t in seen]}") from None
    assert sorted(t["labels"]["component"] for t in up) == ["frontend", "router", "worker", "worker"]

    body = {"model": mesh.models[0], "prompt": "how fast", "max_tokens": 8, "ignore_eos": True}
    async with aiohttp.ClientSession() as s:
        for _ in range(6):
            async with s.post(f"http://{mesh.frontend_http}/v1/completions", json=body) as r:
                assert r.status == 200

    ttft_buckets = 'dynamo_frontend_time_to_first_token_seconds_bucket{component="frontend"}'
    q = f"histogram_quantile(0.9, sum by (le) ({ttft_buckets}))"

    def ttft() -> float | None:
        result = _query(prometheus, "/api/v1/query", query=q)["result"]
        return float(result[0]["value"][1]) if result else None

    def counted() -> bool:
        res = _query(prometheus, "/api/v1/query", query="sum(dynamo_frontend_time_to_first_token_seconds_count)")
        return bool(res["result"]) and float(res["result"][0]["value"][1]) >= 6

    _wait("the 6 requests in the scraped TTFT histogram", counted)
    p90 = _wait("a TTFT p90", ttft)
    assert 0 < p90 < 5, p90  # a real quantile of a sped-up mocker's first tokens, not NaN/+Inf
    # the workers' and the router's series came through Consul too
    for metric in ("dynamo_worker_kv_usage_ratio", "dynamo_router_decisions_total"):

        def scraped(m: str = metric) -> bool:
            res = _query(prometheus, "/api/v1/query", query=f"count({m})")["result"]
            return bool(res) and float(res[0]["value"][1]) >= 1

        # each target has its own scrape phase: the router's decisions may land a scrape after the frontend's TTFT
        _wait(f"{metric} in Prometheus", scraped)
