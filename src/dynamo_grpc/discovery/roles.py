"""Per-role Consul ACL policies and tokens: each process gets only what its role needs.

- worker: registers ``dynamo-worker`` (and keeps its TTL check passing), publishes its model cards under
  ``dynamo/models/`` held by a session;
- router: registers ``dynamo-router``, reads the other ``dynamo-*`` services and the model cards;
- frontend: registers ``dynamo-frontend``, reads the ``dynamo-*`` services and the model cards; it may
  not write cards or any other service.

Every role reads nodes (``node_prefix ""``): Consul filters health answers by ``node:read`` as well as
``service:read``. ``create_role_tokens`` creates them through Consul's ACL HTTP API with a management
token, so it works against consul-dev and a real agent alike; ``acl_file`` writes the same policies as a
consul-dev ``--acl-file`` with chosen secrets.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

_READ_MESH = """
service_prefix "dynamo-" { policy = "read" }
key_prefix "dynamo/models/" { policy = "read" }
node_prefix "" { policy = "read" }
"""

ROLE_RULES: dict[str, str] = {
    "worker": """
service_prefix "dynamo-worker" { policy = "write" }
key_prefix "dynamo/models/" { policy = "write" }
session_prefix "" { policy = "write" }
node_prefix "" { policy = "read" }
""".strip(),
    "router": ('service "dynamo-router" { policy = "write" }' + _READ_MESH).strip(),
    "frontend": ('service "dynamo-frontend" { policy = "write" }' + _READ_MESH).strip(),
}


def policy_name(role: str) -> str:
    return f"dynamo-{role}"


@dataclass(frozen=True)
class RoleToken:
    role: str
    accessor_id: str
    secret_id: str


class ConsulACLError(RuntimeError):
    """The ACL API refused a call (the message carries Consul's status and answer)."""


def _call(address: str, token: str, method: str, path: str, body: Any = None, timeout: float = 10.0) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"{address.rstrip('/')}{path}", data=data, method=method, headers={"X-Consul-Token": token}
    )
    context = ssl.create_default_context() if address.startswith("https://") else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace").strip()
        raise ConsulACLError(f"{method} {path}: HTTP {exc.code}: {text}") from None


def ensure_policy(address: str, management_token: str, name: str, rules: str) -> str:
    """Create the policy, or bring an existing one of that name to ``rules``; returns its ID."""
    body = {"Name": name, "Description": "dynamo-grpc role policy", "Rules": rules}
    try:
        return str(_call(address, management_token, "PUT", "/v1/acl/policy", body)["ID"])
    except ConsulACLError as exc:
        if "already exists" not in str(exc):
            raise
    existing = _call(address, management_token, "GET", f"/v1/acl/policy/name/{name}")
    _call(address, management_token, "PUT", f"/v1/acl/policy/{existing['ID']}", body)
    return str(existing["ID"])


def create_role_tokens(
    address: str, management_token: str, roles: tuple[str, ...] = tuple(ROLE_RULES)
) -> dict[str, RoleToken]:
    """A fresh token per role, linked to that role's policy (created or updated first)."""
    out: dict[str, RoleToken] = {}
    for role in roles:
        pid = ensure_policy(address, management_token, policy_name(role), ROLE_RULES[role])
        token = _call(
            address,
            management_token,
            "PUT",
            "/v1/acl/token",
            {"Description": f"dynamo-grpc {role}", "Policies": [{"ID": pid}]},
        )
        out[role] = RoleToken(role, str(token["AccessorID"]), str(token["SecretID"]))
    return out


def acl_file(secrets: dict[str, str]) -> dict[str, Any]:
    """consul-dev's ``--acl-file`` document: the role policies and a token per role with the given
    SecretIDs (``{"worker": "s1", ...}``)."""
    return {
        "policies": [{"Name": policy_name(role), "Rules": ROLE_RULES[role]} for role in secrets],
        "tokens": [
            {"SecretID": secret, "Description": f"dynamo-grpc {role}", "Policies": [{"Name": policy_name(role)}]}
            for role, secret in secrets.items()
        ],
    }
