"""The Kubernetes connector through the official `kubernetes` client, against a local HTTP stand-in of the API
server: the apps/v1 Deployment `scale` subresource (GET/PATCH, autoscaling/v1 Scale bodies), pods list by label
selector and pod PATCH (merge patch of annotations), with the ReplicaSet's documented choice on scale-down
(pods with the lowest controller.kubernetes.io/pod-deletion-cost go first). It is a faithful stand-in of those
request/response shapes, not a cluster; a real-cluster check runs when KUBECONFIG is set (test below)."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("kubernetes", reason="the kubernetes connector needs the planner extra: dynamo-grpc[planner]")

from dynamo_grpc.planner.connectors.base import ConnectorError
from dynamo_grpc.planner.connectors.kubernetes import (
    DELETION_COST,
    DRAIN_ANNOTATION,
    KubernetesConnector,
    api_client,
)

NS = "llm"
SELECTOR = "app.kubernetes.io/component=worker-decode"


class FakeApiServer:
    """State: one Deployment per name with its pods; every request logged as (method, path, content-type, body)."""

    def __init__(self) -> None:
        self.replicas = {"dynamo-worker-decode": 3}
        self.pods: dict[str, dict[str, Any]] = {
            f"decode-{i}": {"ip": f"10.0.0.{i}", "phase": "Running", "annotations": {}} for i in range(3)
        }
        self.log: list[tuple[str, str, str, Any]] = []

    def scale_body(self, name: str) -> dict[str, Any]:
        n = self.replicas[name]
        return {
            "kind": "Scale", "apiVersion": "autoscaling/v1",
            "metadata": {"name": name, "namespace": NS, "resourceVersion": "1"},
            "spec": {"replicas": n}, "status": {"replicas": n, "selector": SELECTOR},
        }  # fmt: skip

    def pod_body(self, name: str) -> dict[str, Any]:
        p = self.pods[name]
        labels = dict(kv.split("=") for kv in SELECTOR.split(","))
        return {
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": name, "namespace": NS, "labels": labels, "annotations": p["annotations"]},
            "status": {"phase": p["phase"], "podIP": p["ip"]},
        }  # fmt: skip

    def handle(self, method: str, raw_path: str, ctype: str, body: Any) -> tuple[int, Any]:
        self.log.append((method, raw_path, ctype, body))
        url = urllib.parse.urlparse(raw_path)
        parts = url.path.strip("/").split("/")
        if parts[:4] == ["apis", "apps", "v1", "namespaces"] and parts[5] == "deployments" and parts[7:] == ["scale"]:
            name = parts[6]
            if parts[4] != NS or name not in self.replicas:
                return 404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404}
            if method == "PATCH":
                if not isinstance(body, dict) or ctype not in (
                    "application/merge-patch+json", "application/strategic-merge-patch+json"
                ):  # fmt: skip
                    return 415, {"kind": "Status", "reason": "UnsupportedMediaType", "code": 415}
                want = int(body["spec"]["replicas"])
                self._reconcile(name, want)
            return 200, self.scale_body(name)
        if parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
            if len(parts) == 5 and method == "GET":
                sel = urllib.parse.parse_qs(url.query).get("labelSelector", [""])[0]
                assert sel == SELECTOR, sel
                items = [self.pod_body(n) for n in sorted(self.pods)]
                return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
            if len(parts) == 6 and method == "PATCH":
                if ctype != "application/merge-patch+json" or not isinstance(body, dict):
                    return 415, {"kind": "Status", "reason": "UnsupportedMediaType", "code": 415}
                self.pods[parts[5]]["annotations"].update(body["metadata"]["annotations"])
                return 200, self.pod_body(parts[5])
        return 404, {"kind": "Status", "reason": "NotFound", "code": 404}

    def _reconcile(self, name: str, want: int) -> None:
        """The ReplicaSet controller: new pods up to ``want``; beyond it, lowest deletion cost goes first."""
        while len(self.pods) < want:
            i = max(int(n.split("-")[1]) for n in self.pods) + 1 if self.pods else 0
            self.pods[f"decode-{i}"] = {"ip": f"10.0.0.{i}", "phase": "Pending", "annotations": {}}
        while len(self.pods) > want:
            cost = {n: int(p["annotations"].get(DELETION_COST, "0")) for n, p in self.pods.items()}
            del self.pods[min(cost, key=lambda n: (cost[n], n))]
        self.replicas[name] = want


@pytest.fixture
def apiserver() -> Iterator[tuple[FakeApiServer, str]]:
    state = FakeApiServer()

    class H(http.server.BaseHTTPRequestHandler):
        def _do(self, method: str) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            body = json.loads(raw) if raw else None
            status, out = state.handle(method, self.path, self.headers.get("Content-Type", ""), body)
            data = json.dumps(out).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._do("GET")

        def do_PATCH(self) -> None:
            self._do("PATCH")

        def log_message(self, *_: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield state, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def connector(url: str, loads: dict[str, float]) -> KubernetesConnector:
    return KubernetesConnector(
        {"decode": "dynamo-worker-decode"},
        NS,
        api_client(url),
        load_of=lambda pod: loads.get(pod.status.pod_ip),
    )


def test_reads_and_raises_replicas_through_the_scale_subresource(apiserver: tuple[FakeApiServer, str]) -> None:
    state, url = apiserver
    conn = connector(url, {})
    assert asyncio.run(conn.replicas()) == {"decode": 3}
    asyncio.run(conn.scale("decode", 5))
    method, path, ctype, body = state.log[-1]
    assert (method, path) == ("PATCH", f"/apis/apps/v1/namespaces/{NS}/deployments/dynamo-worker-decode/scale")
    assert ctype == "application/merge-patch+json" and body == {"spec": {"replicas": 5}}
    assert not any(m == "PATCH" and "/pods/" in p for m, p, _, _ in state.log)  # scale-up marks no pod
    assert asyncio.run(conn.replicas()) == {"decode": 5}


def test_scale_down_marks_the_least_loaded_pod_before_lowering_replicas(
    apiserver: tuple[FakeApiServer, str],
) -> None:
    state, url = apiserver
    # decode-1 has the fewest in-flight streams; decode-2's load cannot be read (kept: never removed blind)
    conn = connector(url, {"10.0.0.0": 7, "10.0.0.1": 2})
    asyncio.run(conn.scale("decode", 2))
    patches = [(p, b) for m, p, _, b in state.log if m == "PATCH"]
    assert patches[0][0] == f"/api/v1/namespaces/{NS}/pods/decode-1"
    ann = patches[0][1]["metadata"]["annotations"]
    assert int(ann[DELETION_COST]) < 0 and ann[DRAIN_ANNOTATION] == "planner"
    assert patches[1] == (f"/apis/apps/v1/namespaces/{NS}/deployments/dynamo-worker-decode/scale",
                          {"spec": {"replicas": 2}})  # fmt: skip
    assert sorted(state.pods) == ["decode-0", "decode-2"]  # exactly the marked pod went


def test_unknown_pool_and_missing_deployment_are_named(apiserver: tuple[FakeApiServer, str]) -> None:
    _, url = apiserver
    conn = connector(url, {})
    with pytest.raises(ConnectorError, match="unknown pool 'prefill'"):
        asyncio.run(conn.scale("prefill", 1))
    missing = KubernetesConnector({"decode": "nope"}, NS, api_client(url))
    with pytest.raises(ConnectorError, match="deployments/nope/scale: 404"):
        asyncio.run(missing.replicas())


@pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="a real cluster check: set KUBECONFIG and "
                    "DYN_TEST_DEPLOYMENT=<namespace>/<deployment> to run it")  # fmt: skip
def test_real_cluster_reads_a_deployment_scale() -> None:
    ns, _, name = os.environ.get("DYN_TEST_DEPLOYMENT", "default/dynamo-worker").partition("/")
    conn = KubernetesConnector({"worker": name}, ns, api_client(kubeconfig=os.environ["KUBECONFIG"]))
    assert asyncio.run(conn.replicas())["worker"] >= 0
