"""consul-dev's ACL system: policies, tokens, the anonymous and management tokens, and the authorizer
each request gets.

As in Consul (``acl { enabled = true, default_policy = "deny" }``): a request's token comes from
``X-Consul-Token``, ``Authorization: Bearer`` or ``?token=``; no token is the anonymous token; an unknown
secret is 403 ``ACL not found``; a token linked to ``global-management`` may do anything; any other token
gets its policies' rules, and what no rule covers falls back to the default policy (``allow`` grants all
but the ``acl`` resource). A denial is 403 with Consul's message, which names the token's AccessorID, the
permission and the segment, so a client can say which rule is missing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dynamo_grpc.consul_dev.acl_rules import Access, Rules, RulesError, parse_rules
from dynamo_grpc.consul_dev.state import ConsulError

ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"
ANONYMOUS_SECRET = "anonymous"
MANAGEMENT_POLICY_ID = "00000000-0000-0000-0000-000000000001"
MANAGEMENT_POLICY_NAME = "global-management"
DEFAULT_POLICIES = ("allow", "deny")


class ACLDenied(ConsulError):
    """403 with Consul's (>= 1.13) message naming the missing permission."""

    def __init__(self, accessor: str, resource: str, access: Access, segment: str | None) -> None:
        on = f" on {json.dumps(segment)}" if segment is not None else ""
        super().__init__(
            403,
            f"Permission denied: token with AccessorID '{accessor}' lacks permission '{resource}:{access.word}'{on}",
        )


@dataclass
class Authorizer:
    """What one request's token may do. ``rules`` None with ``management`` True: everything."""

    accessor: str
    rules: Rules
    default_allow: bool
    management: bool = False
    identity: tuple[str, int] = ("", 0)  # (accessor, ACL version): answers cached per identity

    def level(self, resource: str, segment: str = "") -> Access:
        if self.management:
            return Access.WRITE
        found = self.rules.lookup(resource, segment)
        if found is not None:
            return found
        return Access.WRITE if self.default_allow and resource != "acl" else Access.DENY

    def allows(self, resource: str, need: Access, segment: str = "") -> bool:
        return self.level(resource, segment) >= need

    def require(self, resource: str, need: Access, segment: str | None = None) -> None:
        if not self.allows(resource, need, segment or ""):
            raise ACLDenied(self.accessor, resource, need, segment)

    def require_prefix_write(self, resource: str, prefix: str) -> None:
        """Consul's ``KeyWritePrefix``: write on the prefix, and no narrower rule that denies it."""
        if self.management:
            return
        if not self.allows(resource, Access.WRITE, prefix) or any(
            lvl < Access.WRITE for lvl in self.rules.under(resource, prefix)
        ):
            raise ACLDenied(self.accessor, resource, Access.WRITE, prefix)


ALLOW_ALL = Authorizer(accessor="", rules=Rules(), default_allow=True, management=True)


@dataclass
class Policy:
    id: str
    name: str
    description: str
    rules_text: str
    rules: Rules
    create_index: int
    modify_index: int

    def to_json(self) -> dict[str, Any]:
        digest = hashlib.blake2b(self.rules_text.encode(), digest_size=32).digest()
        return {
            "ID": self.id,
            "Name": self.name,
            "Description": self.description,
            "Rules": self.rules_text,
            "Hash": base64.b64encode(digest).decode(),
            "CreateIndex": self.create_index,
            "ModifyIndex": self.modify_index,
        }

    def link(self) -> dict[str, str]:
        return {"ID": self.id, "Name": self.name}


@dataclass
class Token:
    accessor_id: str
    secret_id: str
    description: str
    policy_ids: list[str]
    create_index: int
    modify_index: int
    local: bool = False
    create_time: str = field(default_factory=lambda: datetime.now(UTC).isoformat().replace("+00:00", "Z"))


class ACL:
    """The ACL state of one agent (kept in memory, like everything in consul-dev)."""

    def __init__(self, default_policy: str = "deny", initial_management: str = "") -> None:
        if default_policy not in DEFAULT_POLICIES:
            raise ValueError(f"acl default policy must be allow or deny, not {default_policy!r}")
        self.default_allow = default_policy == "allow"
        self.index = 0
        self.version = 0  # bumped on every change: cached filtered answers are per (token, version)
        self.policies: dict[str, Policy] = {}
        self.tokens: dict[str, Token] = {}  # by AccessorID
        self._by_secret: dict[str, str] = {}
        self.bootstrapped = False
        self._cache: dict[str, Authorizer] = {}
        mgmt = Policy(
            MANAGEMENT_POLICY_ID,
            MANAGEMENT_POLICY_NAME,
            "Builtin Policy that grants unlimited access",
            "",
            Rules(),
            0,
            0,
        )
        self._put_policy(mgmt)
        self._put_token(Token(ANONYMOUS_ACCESSOR, ANONYMOUS_SECRET, "Anonymous Token", [], 0, 0))
        if initial_management:
            self._put_token(
                Token(str(uuid.uuid4()), initial_management, "Initial Management Token", [MANAGEMENT_POLICY_ID], 0, 0)
            )
            self.bootstrapped = True  # Consul inserts the initial management token as the bootstrap

    def _next(self) -> int:
        self.index += 1
        self.version += 1
        return self.index

    def _put_policy(self, policy: Policy) -> None:
        self.policies[policy.id] = policy
        self.version += 1

    def _put_token(self, token: Token) -> None:
        old = self.tokens.get(token.accessor_id)
        if old is not None:
            self._by_secret.pop(old.secret_id, None)
        self.tokens[token.accessor_id] = token
        self._by_secret[token.secret_id] = token.accessor_id
        self.version += 1

    # -- resolving a request's token ---------------------------------------------------------------------

    def authorize(self, secret: str) -> Authorizer:
        """The request's authorizer; merged once per token and ACL version (heartbeats are frequent)."""
        cached = self._cache.get(secret)
        if cached is not None and cached.identity[1] == self.version:
            return cached
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[secret] = authz = self._build(secret)
        return authz

    def _build(self, secret: str) -> Authorizer:
        accessor = self._by_secret.get(secret or ANONYMOUS_SECRET)
        if accessor is None:
            raise ConsulError(403, "ACL not found")
        token = self.tokens[accessor]
        rules = Rules()
        management = False
        for pid in token.policy_ids:
            policy = self.policies.get(pid)
            if policy is None:
                continue  # a deleted policy grants nothing
            management = management or pid == MANAGEMENT_POLICY_ID
            rules.merge(policy.rules)
        return Authorizer(accessor, rules, self.default_allow, management, (accessor, self.version))

    def token(self, secret: str) -> Token:
        accessor = self._by_secret.get(secret or ANONYMOUS_SECRET)
        if accessor is None:
            raise ConsulError(403, "ACL not found")
        return self.tokens[accessor]

    # -- the API's writes (also used by the start-up file) -----------------------------------------------

    def bootstrap(self) -> Token:
        if self.bootstrapped:
            raise ConsulError(403, f"Permission denied: ACL bootstrap no longer allowed (reset index: {self.index})")
        idx = self._next()
        token = Token(
            str(uuid.uuid4()),
            str(uuid.uuid4()),
            "Bootstrap Token (Global Management)",
            [MANAGEMENT_POLICY_ID],
            idx,
            idx,
        )
        self._put_token(token)
        self.bootstrapped = True
        return token

    def policy_by_name(self, name: str) -> Policy | None:
        return next((p for p in self.policies.values() if p.name == name), None)

    def upsert_policy(self, body: dict[str, Any], policy_id: str | None = None) -> Policy:
        """Create (``policy_id`` None) or update a policy from a decoded, lower-cased API body."""
        _refuse_unknown(body, {"id", "name", "description", "rules", "datacenters"}, "Policy")
        if body.get("datacenters"):
            raise ConsulError(400, "Invalid Policy: Datacenters: consul-dev has one datacenter; omit it")
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise ConsulError(400, "Invalid Policy: no name set")
        text = body.get("rules") or ""
        if not isinstance(text, str):
            raise ConsulError(400, "Invalid Policy: Rules must be a string (HCL or JSON)")
        try:
            rules = parse_rules(text)
        except RulesError as exc:
            raise ConsulError(400, f"Invalid Policy: {exc}") from None
        same_name = self.policy_by_name(name)
        if policy_id is None:
            if same_name is not None:
                raise ConsulError(400, f"Invalid Policy: A Policy with Name {name!r} already exists")
            idx = self._next()
            policy = Policy(str(uuid.uuid4()), name, str(body.get("description") or ""), text, rules, idx, idx)
        else:
            old = self.policies.get(policy_id)
            if old is None:
                raise ConsulError(400, f"Invalid Policy: Cannot find policy {policy_id}")
            if policy_id == MANAGEMENT_POLICY_ID:
                raise ConsulError(400, "Changing the Rules for the builtin global-management policy is not permitted")
            if same_name is not None and same_name.id != policy_id:
                raise ConsulError(400, f"Invalid Policy: A policy with name {name!r} already exists")
            idx = self._next()
            policy = Policy(policy_id, name, str(body.get("description") or ""), text, rules, old.create_index, idx)
        self._put_policy(policy)
        return policy

    def upsert_token(self, body: dict[str, Any], accessor_id: str | None = None) -> Token:
        """Create (``accessor_id`` None) or update a token from a decoded, lower-cased API body."""
        _refuse_unknown(body, {"accessorid", "secretid", "description", "policies", "local"}, "Token")
        policy_ids: list[str] = []
        for link in body.get("policies") or []:
            link = {str(k).lower(): v for k, v in link.items()} if isinstance(link, dict) else {}
            policy = self.policies.get(link.get("id") or "") or self.policy_by_name(link.get("name") or "")
            if policy is None:
                raise ConsulError(
                    400, f"Invalid Token: No such ACL policy with ID/Name {link.get('id') or link.get('name')!r}"
                )
            policy_ids.append(policy.id)
        if accessor_id is None:
            accessor_id = str(body.get("accessorid") or uuid.uuid4())
            if accessor_id in self.tokens:
                raise ConsulError(400, "Invalid Token: AccessorID is already in use")
            secret = str(body.get("secretid") or uuid.uuid4())
            if secret in self._by_secret:
                raise ConsulError(400, "Invalid Token: SecretID is already in use")
            idx = self._next()
            token = Token(
                accessor_id, secret, str(body.get("description") or ""), policy_ids, idx, idx, bool(body.get("local"))
            )
        else:
            old = self.tokens.get(accessor_id)
            if old is None:
                raise ConsulError(400, f"Cannot find token {accessor_id!r}")
            if body.get("secretid") and body["secretid"] != old.secret_id:
                raise ConsulError(400, "Changing a token's SecretID is not permitted")
            idx = self._next()
            token = Token(
                accessor_id,
                old.secret_id,
                str(body.get("description") or old.description),
                policy_ids,
                old.create_index,
                idx,
                old.local,
                old.create_time,
            )
        self._put_token(token)
        return token

    def delete_token(self, accessor_id: str) -> None:
        if accessor_id == ANONYMOUS_ACCESSOR:
            raise ConsulError(403, "Permission denied: Delete operation not permitted on the anonymous token")
        token = self.tokens.pop(accessor_id, None)
        if token is not None:
            self._by_secret.pop(token.secret_id, None)
            self._next()

    def token_json(self, token: Token) -> dict[str, Any]:
        links = [self.policies[p].link() for p in token.policy_ids if p in self.policies]
        digest = hashlib.blake2b(json.dumps(links).encode(), digest_size=32).digest()
        return {
            "AccessorID": token.accessor_id,
            "SecretID": token.secret_id,
            "Description": token.description,
            "Policies": links or None,
            "Local": token.local,
            "CreateTime": token.create_time,
            "Hash": base64.b64encode(digest).decode(),
            "CreateIndex": token.create_index,
            "ModifyIndex": token.modify_index,
        }

    # -- the start-up file -------------------------------------------------------------------------------

    def load(self, doc: dict[str, Any]) -> None:
        """Apply ``{"policies": [<policy body>...], "tokens": [<token body>...]}`` (API body shapes). A
        token whose AccessorID is the anonymous token's updates its policies (what ``consul acl token
        update -id anonymous`` does)."""
        unknown = set(doc) - {"policies", "tokens"}
        if unknown:
            raise ValueError(f"ACL file: unknown field(s) {sorted(unknown)} (expected policies, tokens)")
        try:
            for body in doc.get("policies") or []:
                self.upsert_policy(lower_keys(body))
            for body in doc.get("tokens") or []:
                body = lower_keys(body)
                accessor = body.get("accessorid")
                if accessor == ANONYMOUS_ACCESSOR or accessor in self.tokens:
                    self.upsert_token(body, str(accessor))
                else:
                    self.upsert_token(body)
        except ConsulError as exc:
            raise ValueError(f"ACL file: {exc.message}") from None


def lower_keys(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ConsulError(400, "Request decode failed: expected a JSON object")
    return {str(k).replace("_", "").lower(): v for k, v in body.items()}


def _refuse_unknown(body: dict[str, Any], known: set[str], what: str) -> None:
    """Roles, identities, templated policies, expirations: not implemented, so refused by name."""
    unknown = sorted(
        k
        for k, v in body.items()
        if k not in known
        and k not in ("createindex", "modifyindex", "hash", "createtime")
        and v not in (None, [], "", {})
    )
    if unknown:
        raise ConsulError(400, f"Invalid {what}: consul-dev does not implement field(s) {unknown}")
