"""deploy/kubernetes, rendered offline: schema-valid objects whose commands, ports, probes and env are the
ones our processes really take (a container's settings are its args plus its DYN_<FLAG> environment, parsed
together by the role's real parser). Overlays are rendered by tests/deploy/kustomize.py (and compared with
`kubectl kustomize` where kubectl is installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.layout import (
    DOWNWARD,
    ENV_READ,
    KUBE,
    OVERLAYS,
    PENDING,
    ROOT,
    container_env,
    containers,
    env_names,
    flag,
    parse,
    rendered,
)

#: the oldest Kubernetes these manifests target (native grpc probes GA 1.27, preStop sleep 1.30)
K8S_VERSIONS = ["1.30.0", "1.37.0"]
GRPC_PORT = {"frontend": "grpc_port", "router": "port", "worker": "port"}


def expand(args: list[str]) -> list[str]:
    """Kubernetes' $(VAR) expansion for the downward-API variables the manifests use."""
    return [re.sub(r"\$\(POD_IP\)", "10.0.0.7", a) for a in args]


def key(o: dict[str, Any]) -> tuple[str, str, str]:
    return o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]


def test_every_variant_has_an_overlay() -> None:
    assert {"aggregated", "torch", "trtllm", "disagg"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_renderer_agrees_with_kubectl_kustomize(overlay: str) -> None:
    kubectl = shutil.which("kubectl")
    ours = sorted(rendered(overlay), key=key)
    if kubectl is None:  # no binary on this machine: the renderer's own contract still holds
        assert len({key(o) for o in ours}) == len(ours), "duplicate objects"
        return
    out = subprocess.run([kubectl, "kustomize", str(KUBE / "overlays" / overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    theirs = sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=key)
    assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_validate_against_kubernetes_schemas(overlay: str, version: str) -> None:
    for obj in rendered(overlay):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {exc.message}") from None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_container_commands_parse_with_the_real_cli(overlay: str) -> None:
    for dep, c in containers(rendered(overlay)):
        args = expand(c["args"])
        if overlay in PENDING and args[0] == "worker":
            with pytest.raises(ValueError, match=re.escape(PENDING[overlay])):
                parse(args, container_env(c))
            continue
        ns = parse(args, container_env(c))
        assert ns is not None, dep["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_probes_and_scrape_annotations_match_the_flags(overlay: str) -> None:
    objects = rendered(overlay)
    for dep, c in containers(objects):
        if overlay in PENDING and c["args"][0] == "worker":
            continue
        role, ns = c["args"][0], parse(c["args"], container_env(c))
        name = dep["metadata"]["name"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["grpc"] == getattr(ns, GRPC_PORT[role]), name
        assert ports["metrics"] == ns.metrics_port
        assert ports["health"] == ns.health_port, f"{name}: probes need the plaintext --health-port"
        if role == "frontend":
            assert ports["http"] == ns.http_port
        else:
            assert ports["zmq"] == ns.zmq_port > 0, f"{name}: a fixed --zmq-port for the NetworkPolicies"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == ns.health_port, f"{name} {probe}"
        ann = dep["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == ports["metrics"]
        assert ns.host == "0.0.0.0" and ns.advertise_host == "10.0.0.7", f"{name}: bind all, advertise the pod IP"
    by_component = {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: c for d, c in containers(objects)
    }
    for svc in (o for o in objects if o["kind"] == "Service"):
        target = by_component[svc["spec"]["selector"]["app.kubernetes.io/component"]]
        names = {p["name"] for p in target["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, f"Service {svc['metadata']['name']}: {port}"
    router_svc = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "dynamo-router")
    frontend = by_component["frontend"]
    host, port = parse(frontend["args"], container_env(frontend)).router.split(":")
    assert host == router_svc["metadata"]["name"] and int(port) == router_svc["spec"]["ports"][0]["port"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_variables_are_ones_the_processes_read(overlay: str) -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "src" / "dynamo_grpc").rglob("*.py"))
    for name in ENV_READ:
        assert re.search(rf"[\"']{name}[\"']", source), f"{name} is not read anywhere in src/"
    for dep, c in containers(rendered(overlay)):
        env = {e["name"] for e in c["env"]}
        known = ENV_READ | DOWNWARD | env_names(c["args"][0])
        assert env <= known, f"{dep['metadata']['name']}: {sorted(env - known)}"
        text = " ".join([*c["args"], *(str(e.get("value", "")) for e in c["env"])])
        for ref in re.findall(r"\$\((\w+)\)", text):
            assert ref in env, f"{dep['metadata']['name']}: $({ref}) is not defined"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_prestop_and_drain(overlay: str) -> None:
    for dep, c in containers(rendered(overlay)):
        spec = dep["spec"]["template"]["spec"]
        pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        drain = float(flag(c["args"], "--drain-grace") or 0)
        assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 5, dep["metadata"]["name"]
        if c["args"][0] == "worker":
            assert drain > 0, "workers must drain in-flight streams on SIGTERM"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pdbs_and_network_policies_select_real_pods(overlay: str) -> None:
    objects = rendered(overlay)
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in objects if d["kind"] == "Deployment"]

    def selects(selector: dict[str, str]) -> bool:
        return any(selector.items() <= labels.items() for labels in pods)

    deployments = [d for d in objects if d["kind"] == "Deployment"]
    for pdb in (o for o in objects if o["kind"] == "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        matched = [d for d in deployments if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matched) == 1, f"PDB {pdb['metadata']['name']} selects {len(matched)} Deployments"
    for np in (o for o in objects if o["kind"] == "NetworkPolicy"):
        assert selects(np["spec"]["podSelector"].get("matchLabels", {})), np["metadata"]["name"]
    # every worker port but the health one, which only kubelet (from the node, outside NetworkPolicies) dials
    worker_ports = {
        p["containerPort"]
        for d, c in containers(objects)
        if c["args"][0] == "worker"
        for p in c["ports"]
        if p["name"] != "health"
    }
    frontend = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "dynamo-frontend")
    public = [r for r in frontend["spec"]["ingress"] if "from" not in r]
    assert [sorted(p["port"] for p in r["ports"]) for r in public] == [[8000, 8001]], "clients reach 8000/8001 only"
    worker_np = next(o for o in objects if o["kind"] == "NetworkPolicy" and o["metadata"]["name"] == "dynamo-worker")
    allowed = {p["port"] for r in worker_np["spec"]["ingress"] for p in r["ports"]}
    assert worker_ports <= allowed, "every worker port is reachable by its callers"


def test_gpu_variant_requests_gpus_and_tolerates_the_taint() -> None:
    for _dep, c in containers(rendered("trtllm")):
        if c["args"][0] == "worker":
            assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
    spec = next(d for d, c in containers(rendered("trtllm")) if c["args"][0] == "worker")["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])


def test_disagg_pools_are_separate_deployments() -> None:
    workers = [d for d in rendered("disagg") if d["kind"] == "Deployment" and "worker" in d["metadata"]["name"]]
    pools = {d["spec"]["selector"]["matchLabels"]["dynamo-grpc/pool"] for d in workers}
    assert pools == {"prefill", "decode"} and len(workers) == 2


def test_secure_variant_mounts_what_its_tls_and_curve_variables_name() -> None:
    """overlays/secure: mTLS for every process, CURVE for the event publishers/subscribers; every file a DYN_TLS_* or
    DYN_ZMQ_CURVE_* variable names lies in a mounted Secret, and the settings parse."""
    for dep, c in containers(rendered("secure")):
        role, env = c["args"][0], container_env(c)
        name = dep["metadata"]["name"]
        assert {"DYN_TLS_CERT", "DYN_TLS_KEY", "DYN_TLS_CA"} <= env.keys(), name
        if role != "frontend":  # the frontend runs kv-service here: it subscribes to no event socket
            assert {"DYN_ZMQ_CURVE_SECRET_KEY", "DYN_ZMQ_CURVE_ALLOW"} <= env.keys(), name
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
        for var, path in env.items():
            if var.startswith(("DYN_TLS_", "DYN_ZMQ_CURVE_")) and path.startswith("/"):
                mount = next((m for m in mounts if path.startswith(m + "/")), None)
                assert mount is not None and "secret" in mounts[mount], f"{name}: {var}={path} is in no Secret mount"
        ns = parse(c["args"], env)
        assert ns.cert_file == env["DYN_TLS_CERT"] and ns.ca_file == env["DYN_TLS_CA"]
