"""Consul ACL denials, explained: which permission on which resource the token lacks, and the rule that
would grant it.

Consul (>= 1.13, and consul-dev) answers a denied call with 403 ``Permission denied: token with AccessorID
'<id>' lacks permission '<resource>:<access>' on "<segment>"``. py-consul raises that body as
``consul.ACLPermissionDenied``; the discovery client turns it into ``ConsulPermissionDenied``, which is
still a ``consul.ACLPermissionDenied`` (callers that catch py-consul's class keep working) and is our
``errors.PermissionDenied``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import consul

from dynamo_grpc import errors
from dynamo_grpc.discovery.config import ConsulSettings

ANONYMOUS_ACCESSOR = "00000000-0000-0000-0000-000000000002"
_DENIED = re.compile(
    r"Permission denied: (?:token with AccessorID '(?P<accessor>[^']*)'|provided token) "
    r"lacks permission '(?P<resource>[a-z_]+):(?P<access>[a-z]+)'(?: on (?P<segment>\".*\"|\S+))?"
)


@dataclass(frozen=True)
class Denial:
    """One parsed 403: the permission (``service:write``), its segment and the token's AccessorID."""

    resource: str
    access: str
    segment: str | None
    accessor: str

    @property
    def permission(self) -> str:
        return f"{self.resource}:{self.access}"

    def rule(self) -> str:
        """The policy rule that grants it, in Consul's HCL."""
        if self.segment is None:
            return f'{self.resource} = "{self.access}"'
        return f'{self.resource} {json.dumps(self.segment)} {{ policy = "{self.access}" }}'


def parse_denial(body: str) -> Denial | None:
    m = _DENIED.search(body)
    if m is None:
        return None
    segment = m.group("segment")
    if segment is not None and segment.startswith('"'):
        try:
            segment = json.loads(segment)
        except ValueError:
            segment = segment.strip('"')
    return Denial(m.group("resource"), m.group("access"), segment, m.group("accessor") or "")


def _whose(settings: ConsulSettings, denial: Denial | None) -> str:
    if not settings.token or (denial is not None and denial.accessor == ANONYMOUS_ACCESSOR):
        return "the anonymous token (no CONSUL_HTTP_TOKEN set)"
    source = settings.token_source or "the configured token"
    accessor = f", AccessorID '{denial.accessor}'" if denial is not None and denial.accessor else ""
    return f"this token ({source}{accessor})"


class ConsulPermissionDenied(consul.ACLPermissionDenied, errors.PermissionDenied):
    """Consul refused a call for lack of a permission; the message names it and the rule to add."""

    def __init__(self, message: str, denial: Denial | None, body: str) -> None:
        errors.PermissionDenied.__init__(self, message)
        self.denial = denial
        self.body = body


def explain(body: str, settings: ConsulSettings, what: str = "") -> ConsulPermissionDenied:
    """The error for a 403 ``body`` that ``what`` (e.g. "registering dynamo-worker") received."""
    denial = parse_denial(body)
    doing = f"{what}: " if what else ""
    if denial is None:
        if "ACL not found" in body:
            message = (
                f"{doing}consul does not know {_whose(settings, None)} (ACL not found): check "
                "CONSUL_HTTP_TOKEN against the agent's tokens"
            )
        else:
            message = f"{doing}consul denied the call for {_whose(settings, None)}: {body.strip()}"
        return ConsulPermissionDenied(message, None, body)
    on = f" on '{denial.segment}'" if denial.segment is not None else ""
    message = (
        f"{doing}consul denied {denial.permission}{on} for {_whose(settings, denial)}; give its policy "
        f"{denial.rule()} (or a {denial.resource}_prefix rule covering it)"
    )
    return ConsulPermissionDenied(message, denial, body)
