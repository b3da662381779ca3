"""The Kubernetes connector: each pool is a Deployment, scaled through its ``scale`` subresource.

Uses the official ``kubernetes`` client (the ``planner`` extra): in-cluster service-account auth when it runs in a
pod, else the kubeconfig (``$KUBECONFIG`` or ``~/.kube/config``), or an explicit API server URL (``--kube-api``).

Scale-down: the scale subresource cannot say which pod goes, but the ReplicaSet controller deletes the pods
with the lowest ``controller.kubernetes.io/pod-deletion-cost`` first. So the planner picks the least-loaded pods
(fewest in-flight streams, read from each pod's ``/metrics``), marks them with a deletion cost below every other
pod's and a ``dynamo-grpc.io/drain`` annotation, and only then lowers ``replicas``. The kubelet's SIGTERM starts
the worker's own drain: it deregisters from Consul first, finishes its streams within ``--drain-grace`` (the
manifest's terminationGracePeriodSeconds is longer) and hands back what is left, so the frontend migrates it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from dynamo_grpc.planner.connectors.base import ConnectorError
from dynamo_grpc.planner.connectors.local import inflight_streams

log = logging.getLogger("dynamo_grpc.planner.kubernetes")

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
DRAIN_ANNOTATION = "dynamo-grpc.io/drain"
#: the cost given to a pod chosen to go (other pods keep theirs, 0 by default)
VICTIM_COST = -1000
#: the client (37.x) would label a dict body ``application/json-patch+json``, which the API server refuses
#: for an object; ours are merge patches, and say so
MERGE_PATCH = "application/merge-patch+json"


def api_client(api_url: str | None = None, kubeconfig: str | None = None) -> Any:
    """A ``kubernetes.client.ApiClient``: ``api_url`` (no auth: a test stand-in or ``kubectl proxy``), else
    in-cluster config, else the kubeconfig."""
    from kubernetes import client, config

    if api_url:
        cfg = client.Configuration()
        cfg.host = api_url
        return client.ApiClient(cfg)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=kubeconfig)
    return client.ApiClient()


class KubernetesConnector:
    def __init__(
        self,
        deployments: dict[str, str],
        namespace: str = "default",
        client: Any = None,
        metrics_port: int = 9002,
        load_of: Callable[[Any], float | None] | None = None,
    ) -> None:
        """``deployments``: pool -> Deployment name. ``load_of(pod)``: in-flight streams of a pod (default: its
        ``/metrics`` on ``metrics_port``, the port deploy/kubernetes/worker gives workers)."""
        from kubernetes import client as k8s

        if not deployments:
            raise ValueError("the kubernetes connector needs at least one pool")
        self.deployments = deployments
        self.namespace = namespace
        self.api = client if client is not None else api_client()
        self.apps = k8s.AppsV1Api(self.api)
        self.core = k8s.CoreV1Api(self.api)
        self.metrics_port = metrics_port
        self.load_of = load_of or self._pod_inflight

    def _deployment(self, pool: str) -> str:
        try:
            return self.deployments[pool]
        except KeyError:
            raise ConnectorError(f"unknown pool {pool!r} (pools: {', '.join(self.deployments)})") from None

    def _pod_inflight(self, pod: Any) -> float | None:
        ip = getattr(pod.status, "pod_ip", None)
        return inflight_streams(f"{ip}:{self.metrics_port}") if ip else None

    # -- sync calls (run in a thread) --------------------------------------------------------
    def _read(self, pool: str) -> Any:
        from kubernetes.client.exceptions import ApiException

        name = self._deployment(pool)
        try:
            return self.apps.read_namespaced_deployment_scale(name, self.namespace)
        except ApiException as e:
            raise ConnectorError(f"pool {pool}: reading deployments/{name}/scale: {e.status} {e.reason}") from None

    def _replicas_sync(self) -> dict[str, int]:
        return {pool: int(self._read(pool).spec.replicas or 0) for pool in self.deployments}

    def _scale_sync(self, pool: str, replicas: int) -> None:
        from kubernetes.client.exceptions import ApiException

        if replicas < 0:
            raise ConnectorError(f"pool {pool}: replicas must be >= 0, got {replicas}")
        name = self._deployment(pool)
        scale = self._read(pool)
        have = int(scale.spec.replicas or 0)
        if replicas == have:
            return
        try:
            if replicas < have:
                selector = getattr(scale.status, "selector", None) or ""
                self._mark_victims(pool, selector, have - replicas)
            self.apps.patch_namespaced_deployment_scale(
                name, self.namespace, {"spec": {"replicas": replicas}}, _content_type=MERGE_PATCH
            )
        except ApiException as e:
            raise ConnectorError(
                f"pool {pool}: scaling deployments/{name} to {replicas}: {e.status} {e.reason}"
            ) from None
        log.info("pool %s: deployments/%s replicas %d -> %d", pool, name, have, replicas)

    def _mark_victims(self, pool: str, selector: str, n: int) -> list[str]:
        """Annotate the ``n`` least-loaded live pods so the ReplicaSet deletes exactly them."""
        pods: list[Any] = list(self.core.list_namespaced_pod(self.namespace, label_selector=selector).items)
        live = [p for p in pods if p.metadata.deletion_timestamp is None]

        def key(p: Any) -> tuple[int, float, str]:
            running = (getattr(p.status, "phase", "") or "") == "Running"
            load = self.load_of(p) if running else 0.0
            # not yet running: holds no work, goes first; unreadable load: goes last
            return (int(running), load if load is not None else float("inf"), p.metadata.name)

        victims = sorted(live, key=key)[:n]
        for p in victims:
            body = {"metadata": {"annotations": {DELETION_COST: str(VICTIM_COST), DRAIN_ANNOTATION: "planner"}}}
            self.core.patch_namespaced_pod(p.metadata.name, self.namespace, body, _content_type=MERGE_PATCH)
            log.info("pool %s: pod %s marked to go (deletion cost %d)", pool, p.metadata.name, VICTIM_COST)
        return [str(p.metadata.name) for p in victims]

    # -- the connector interface ---------------------------------------------------------------
    async def replicas(self) -> dict[str, int]:
        return await asyncio.to_thread(self._replicas_sync)

    async def scale(self, pool: str, replicas: int) -> None:
        await asyncio.to_thread(self._scale_sync, pool, replicas)

    async def close(self) -> None:
        await asyncio.to_thread(self.api.close)
