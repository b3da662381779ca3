"""Where the deployment material lives and how tests read it: rendered overlays, the compose file, and the
real CLI parser of each role (a container command line is checked by the parser that will run it)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
from pathlib import Path
from typing import Any

import yaml

from dynamo_grpc import cli
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


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``[role, *flags]`` with the role's real parser; ValueError carries argparse's message."""
    role, *rest = argv
    if role not in cli.ROLES:
        raise ValueError(f"unknown role {role!r}")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return parser(role).parse_args(rest)
    except SystemExit:
        raise ValueError(err.getvalue().strip().splitlines()[-1]) from None


def containers(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(Deployment, container) pairs."""
    return [(o, c) for o in objects if o["kind"] == "Deployment" for c in o["spec"]["template"]["spec"]["containers"]]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None
