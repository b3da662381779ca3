"""deploy/kubernetes, rendered offline: schema-valid objects whose commands, ports, probes and env are the
ones our processes really take. Overlays are rendered by tests/deploy/kustomize.py (and compared with
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

from tests.deploy.layout import DOWNWARD, ENV_READ, KUBE, OVERLAYS, PENDING, ROOT, containers, flag, parse, rendered

#: the oldest Kubernetes these manifests target (native grpc probes GA 1.27, preStop sleep 1.30)
K8S_VERSIONS = ["1.30.0", "1.37.0"]
GRPC_PORT_FLAG = {"frontend": "--grpc-port", "router": "--port", "worker": "--port"}


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
                parse(args)
            continue
        ns = parse(args)
        assert ns is not None, dep["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ports_probes_and_scrape_annotations_match_the_flags(overlay: str) -> None:
    objects = rendered(overlay)
    for dep, c in containers(objects):
        role, args = c["args"][0], c["args"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        grpc_port = int(flag(args, GRPC_PORT_FLAG[role]) or 0)
        assert ports["grpc"] == grpc_port, dep["metadata"]["name"]
        assert ports["metrics"] == int(flag(args, "--metrics-port") or 0)
        if role == "frontend":
            assert ports["http"] == int(flag(args, "--http-port") or 0)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == grpc_port, f"{dep['metadata']['name']} {probe}"
        ann = dep["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and int(ann["prometheus.io/port"]) == ports["metrics"]
        assert flag(args, "--host") == "$(POD_IP)", "bind the pod IP: processes advertise their bind address"
    by_component = {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: c for d, c in containers(objects)
    }
    for svc in (o for o in objects if o["kind"] == "Service"):
        target = by_component[svc["spec"]["selector"]["app.kubernetes.io/component"]]
        names = {p["name"] for p in target["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, f"Service {svc['metadata']['name']}: {port}"
    router_svc = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "dynamo-router")
    host, port = flag(by_component["frontend"]["args"], "--router").split(":")  # type: ignore[union-attr]
    assert host == router_svc["metadata"]["name"] and int(port) == router_svc["spec"]["ports"][0]["port"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_variables_are_ones_the_processes_read(overlay: str) -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "src" / "dynamo_grpc").rglob("*.py"))
    for name in ENV_READ:
        assert re.search(rf"[\"']{name}[\"']", source), f"{name} is not read anywhere in src/"
    for dep, c in containers(rendered(overlay)):
        env = {e["name"] for e in c["env"]}
        assert env <= ENV_READ | DOWNWARD, f"{dep['metadata']['name']}: {sorted(env - ENV_READ - DOWNWARD)}"
        for ref in re.findall(r"\$\((\w+)\)", " ".join(c["args"])):
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
    worker_ports = {p["containerPort"] for d, c in containers(objects) if c["args"][0] == "worker" for p in c["ports"]}
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
