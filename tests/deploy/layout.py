"""Where the deployment material lives and how tests read it: rendered overlays, the compose file, and the
real CLI parser of each role (a container command line is checked by the parser that will run it)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import re
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

from dynamo_grpc import cli
from dynamo_grpc.envflags import env_name
from tests.deploy.kustomize import render

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "docker-compose.yml"
OVERLAYS = sorted(p.parent.name for p in (KUBE / "overlays").glob("*/kustomization.yaml"))
#: overlays that need something not in this release: overlay -> the CLI's refusal they must hit today.
#: When the feature lands the test naming it fails: delete the entry.
PENDING: dict[str, str] = {}
#: environment variables the processes read today (grep os.environ / env.get in src/), plus the downward-API
#: POD_IP that manifests expand into args with $(POD_IP)
ENV_READ = {
    "CONSUL_HTTP_ADDR",
    "CONSUL_HTTP_TOKEN",
    "CONSUL_HTTP_TOKEN_FILE",
    "CONSUL_HTTP_SSL",
    "CONSUL_HTTP_SSL_VERIFY",
    "CONSUL_CACERT",
    "CONSUL_CLIENT_CERT",
    "CONSUL_CLIENT_KEY",
    "DYN_LOG",
}
DOWNWARD = {"POD_IP"}


def rendered(overlay: str) -> list[dict[str, Any]]:
    return render(KUBE / "overlays" / overlay)


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def parser(role: str) -> argparse.ArgumentParser:
    module = importlib.import_module(cli.ROLES[role][0])
    p: argparse.ArgumentParser = module.build_parser()
    return p


def parse(argv: list[str], env: dict[str, str] | None = None) -> argparse.Namespace:
    """Parse ``[role, *flags]`` with the role's real parser, under exactly ``env`` (the container's environment:
    every flag also reads ``DYN_<FLAG>``); ValueError carries argparse's message."""
    role, *rest = argv
    if role not in cli.ROLES:
        raise ValueError(f"unknown role {role!r}")
    err = io.StringIO()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("DYN_", "CONSUL_"))}
    try:
        with contextlib.redirect_stderr(err), mock.patch.dict(os.environ, {**clean, **(env or {})}, clear=True):
            return parser(role).parse_args(rest)
    except SystemExit as e:
        lines = err.getvalue().strip().splitlines() or [str(e.code)]
        raise ValueError(lines[-1]) from None


def env_names(role: str) -> set[str]:
    """The variables a role's options read (envflags: DYN_<FLAG> and the historic names)."""
    p = parser(role)
    return {n for a in p._actions if (n := env_name(a)) is not None}


def container_env(container: dict[str, Any], pod_ip: str = "10.0.0.7") -> dict[str, str]:
    """A container's environment as the kubelet builds it: literal values with $(VAR) expanded, the downward-API
    POD_IP, and a placeholder for values from ConfigMaps and Secrets."""
    out: dict[str, str] = {}
    for e in container.get("env", []):
        if "value" in e:
            out[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: out.get(m.group(1), m.group(0)), str(e["value"]))
        elif "fieldRef" in e.get("valueFrom", {}):
            out[e["name"]] = pod_ip
        elif e["name"] == "CONSUL_HTTP_ADDR":
            out[e["name"]] = "http://consul-server.consul.svc:8500"
        else:
            out[e["name"]] = "from-a-secret"
    return out


def containers(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(Deployment, container) pairs."""
    return [(o, c) for o in objects if o["kind"] == "Deployment" for c in o["spec"]["template"]["spec"]["containers"]]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None
