"""deploy/docker-compose.yml against the compose-spec schema and our CLI; deploy/Dockerfile through hadolint
and the rules it must keep; Prometheus and Grafana config pointing at what the processes serve."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.layout import DEPLOY, ENV_READ, compose, flag, parse

SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
DYNAMO = {"router", "worker-1", "worker-2", "worker-torch", "frontend"}
GRPC_PORT_FLAG = {"frontend": "--grpc-port", "router": "--port", "worker": "--port"}


def services() -> dict[str, Any]:
    svcs: dict[str, Any] = compose()["services"]
    return svcs


def test_compose_file_is_valid_compose_spec() -> None:
    schema = json.loads(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_has_the_topology() -> None:
    svcs = services()
    assert set(svcs) == DYNAMO | {"consul", "prometheus", "grafana"}
    assert svcs["consul"]["image"].startswith("hashicorp/consul:")
    assert svcs["worker-torch"]["profiles"] == ["torch"]
    for name, svc in svcs.items():
        assert ":" in svc["image"] and not svc["image"].endswith(":latest"), f"{name}: pin the image tag"


@pytest.mark.parametrize("name", sorted(DYNAMO))
def test_compose_commands_parse_and_bind_their_own_address(name: str) -> None:
    svc = services()[name]
    args = svc["command"]
    parse(args)
    ip = svc["networks"]["mesh"]["ipv4_address"]
    assert flag(args, "--host") == ip, "bind the service's own address: processes advertise their bind address"
    health = svc["healthcheck"]["test"]
    # the plaintext grpc.health.v1 listener: it keeps answering when the gRPC port turns TLS on
    assert health[-1] == f"{ip}:{flag(args, '--health-port')}", "healthcheck asks the --health-port"
    if args[0] != "frontend":
        assert flag(args, "--zmq-port"), "a fixed --zmq-port for firewalls"
    assert set(svc["environment"]) <= ENV_READ


def test_compose_consul_acl_token_is_the_one_the_processes_use() -> None:
    acl = json.loads((DEPLOY / "consul" / "acl.json").read_text())["acl"]
    assert acl["enabled"] and acl["default_policy"] == "deny"
    doc = compose()
    token_file = DEPLOY / doc["secrets"]["consul_token"]["file"]
    assert token_file.read_text().strip() == acl["tokens"]["initial_management"]
    for name in DYNAMO:
        env = services()[name]["environment"]
        assert env["CONSUL_HTTP_TOKEN_FILE"] == "/run/secrets/consul_token"
        assert env["CONSUL_HTTP_ADDR"] == "http://consul:8500"


def test_prometheus_scrapes_every_metrics_port() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    for name in DYNAMO:
        port = flag(services()[name]["command"], "--metrics-port")
        assert f"{name}:{port}" in targets, f"{name}'s /metrics is not scraped"
    assert all(job["metrics_path"] == "/metrics" for job in prom["scrape_configs"])


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090"
    dash = json.loads((DEPLOY / "grafana/dashboards/dynamo-grpc-overview.json").read_text())
    assert {p["datasource"]["uid"] for p in dash["panels"]} == {ds["uid"]}
    mounts = services()["grafana"]["volumes"]
    assert "./grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/dynamo-grpc.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln else "") for ln in lines]


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run([hadolint, "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_rules() -> None:
    ins = dockerfile_instructions()
    args = {v.split("=", 1)[0]: v.split("=", 1)[1] for k, v in ins if k == "ARG" and "=" in v}
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), "pinned slim Python base"
    users = [v for k, v in ins if k == "USER"]
    assert users and not users[-1].startswith(("0", "root")), "the final stage runs as a non-root user"
    assert ("ENTRYPOINT", '["dynamo-grpc"]') in ins
    assert any(k == "HEALTHCHECK" and "healthcheck.py" in v for k, v in ins)
    assert ("STOPSIGNAL", "SIGTERM") in ins
    assert {"WITH_TORCH", "WITH_MODEL"} <= set(args) and args["WITH_TORCH"] == "0"
    copied = [s for k, v in ins if k == "COPY" and "--from" not in v for s in v.split()[:-1]]
    for src in copied:
        assert (DEPLOY.parent / src).exists(), f"COPY {src}: no such path in the build context"
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for src in copied:
        assert f"!{src}" in ignore or f"!{src}/**" in ignore, f"{src} is excluded from the build context"


def test_every_bind_mount_source_exists_and_consul_loads_its_acl_file() -> None:
    mounts: dict[str, str] = {}
    for name, svc in services().items():
        for vol in svc.get("volumes", []):
            src, dst = vol.split(":")[:2]
            assert (DEPLOY / src).exists(), f"{name}: {src} does not exist"
            mounts[dst] = src
    config_file = flag(services()["consul"]["command"], "-config-file") or next(
        a.split("=", 1)[1] for a in services()["consul"]["command"] if a.startswith("-config-file=")
    )
    assert mounts[config_file] == "./consul/acl.json"
    assert not config_file.startswith("/consul/config/"), "the image's entrypoint loads that dir already"
