"""Tiny synchronous reads of a Consul agent's HTTP API, for the launcher's readiness checks.

The launcher runs outside any event loop (pytest fixtures, the run-local command), so it
uses urllib rather than the async discovery client.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any


def passing_instances(
    consul: str, service: str, timeout: float = 5.0, token: str | None = None
) -> list[dict[str, Any]]:
    """Passing instances of ``service`` as Consul's ``/v1/health/service`` returns them. ``token``:
    the ACL token to read with (default CONSUL_HTTP_TOKEN); an ACL agent filters what it may not read."""
    req = urllib.request.Request(f"{consul.rstrip('/')}/v1/health/service/{service}?passing=true")
    token = token or os.environ.get("CONSUL_HTTP_TOKEN")
    if token:
        req.add_header("X-Consul-Token", token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            entries: list[dict[str, Any]] = json.loads(resp.read())
    except (urllib.error.URLError, OSError, json.JSONDecodeError):
        return []
    return entries


def service_meta(entry: dict[str, Any]) -> dict[str, str]:
    meta: dict[str, str] = entry.get("Service", {}).get("Meta") or {}
    return meta
