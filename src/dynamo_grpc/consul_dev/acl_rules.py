"""Consul ACL rules: parse a policy's ``Rules`` (HCL or JSON) and decide what a set of policies allows.

The rule language is Consul's: segmented resources (``service``, ``key``, ``node``, ``session``,
``agent``, ``event``, ``query``) have exact rules (``key "a/b" { policy = "read" }``) and prefix rules
(``key_prefix "a/" { policy = "write" }``); an exact rule beats any prefix rule and the longest prefix
wins. Global resources (``acl``, ``operator``, ``keyring``, ``mesh``, ``peering``) take a bare
``acl = "write"``. Levels are ``deny < read < list < write`` (``list`` exists for keys only); when two
policies of one token give the same rule, ``deny`` wins, then the most permissive (Consul's merge).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any


class Access(IntEnum):
    DENY = 0
    READ = 1
    LIST = 2
    WRITE = 3

    @property
    def word(self) -> str:
        return self.name.lower()


SEGMENTED = ("agent", "event", "key", "node", "query", "service", "session")
GLOBAL = ("acl", "keyring", "mesh", "operator", "peering")
_LEVELS = {"deny": Access.DENY, "read": Access.READ, "list": Access.LIST, "write": Access.WRITE}


class RulesError(ValueError):
    """A policy's rules do not parse; the message says where."""


@dataclass
class Rules:
    """The merged rules of one or more policies."""

    exact: dict[str, dict[str, Access]] = field(default_factory=dict)
    prefix: dict[str, dict[str, Access]] = field(default_factory=dict)
    global_: dict[str, Access] = field(default_factory=dict)

    def merge(self, other: Rules) -> None:
        for mine, theirs in ((self.exact, other.exact), (self.prefix, other.prefix)):
            for resource, segs in theirs.items():
                table = mine.setdefault(resource, {})
                for seg, level in segs.items():
                    table[seg] = _stronger(table.get(seg), level)
        for resource, level in other.global_.items():
            self.global_[resource] = _stronger(self.global_.get(resource), level)

    def lookup(self, resource: str, segment: str) -> Access | None:
        """The level the rules give ``resource`` on ``segment``; None when no rule covers it."""
        if resource in GLOBAL:
            return self.global_.get(resource)
        exact = self.exact.get(resource, {})
        if segment in exact:
            return exact[segment]
        best: str | None = None
        for pre in self.prefix.get(resource, {}):
            if segment.startswith(pre) and (best is None or len(pre) > len(best)):
                best = pre
        return None if best is None else self.prefix[resource][best]

    def under(self, resource: str, prefix: str) -> list[Access]:
        """Levels of every rule strictly inside ``prefix`` (for a recursive delete)."""
        out = [lvl for seg, lvl in self.exact.get(resource, {}).items() if seg.startswith(prefix)]
        out += [lvl for seg, lvl in self.prefix.get(resource, {}).items() if seg.startswith(prefix) and seg != prefix]
        return out


def _stronger(current: Access | None, new: Access) -> Access:
    if current is None:
        return new
    if Access.DENY in (current, new):
        return Access.DENY
    return max(current, new)


def _level(resource: str, value: Any) -> Access:
    level = _LEVELS.get(value) if isinstance(value, str) else None
    if level is None or (level is Access.LIST and resource != "key"):
        raise RulesError(f"Invalid {resource} policy: {value!r}")
    return level


def rules_from_tree(tree: dict[str, Any]) -> Rules:
    """Rules from the decoded JSON (or HCL) document: ``{"key_prefix": {"a/": {"policy": "read"}}}``."""
    rules = Rules()
    for name, body in tree.items():
        if name in GLOBAL:
            rules.global_[name] = _stronger(rules.global_.get(name), _level(name, body))
            continue
        resource, is_prefix = (name[: -len("_prefix")], True) if name.endswith("_prefix") else (name, False)
        if resource not in SEGMENTED:
            raise RulesError(f"Unknown rule type {name!r}")
        if not isinstance(body, dict):
            raise RulesError(f"{name} must be a block of segments")
        table = (rules.prefix if is_prefix else rules.exact).setdefault(resource, {})
        for segment, spec in body.items():
            if not isinstance(spec, dict):
                raise RulesError(f"{name} {segment!r} must be a block")
            unknown = set(spec) - {"policy", "intentions"}
            if unknown or (set(spec) & {"intentions"} and resource != "service"):
                raise RulesError(f"{name} {segment!r}: unknown field(s) {sorted(unknown or {'intentions'})}")
            if "intentions" in spec:
                _level(resource, spec["intentions"])  # validated; consul-dev serves no intentions to guard
            if "policy" not in spec:
                raise RulesError(f"{name} {segment!r}: missing policy")
            table[segment] = _stronger(table.get(segment), _level(resource, spec["policy"]))
    return rules


def parse_rules(text: str) -> Rules:
    """Parse a policy's ``Rules`` string, HCL or JSON, as Consul accepts both."""
    if not text.strip():
        return Rules()
    try:
        tree = json.loads(text) if text.lstrip().startswith("{") else _parse_hcl(text)
    except ValueError as exc:
        raise RulesError(f"Failed to parse ACL rules: {exc}") from None
    if not isinstance(tree, dict):
        raise RulesError("Failed to parse ACL rules: not an object")
    return rules_from_tree(tree)


# -- the HCL subset policies use: `name "label" { attr = "value" }` and `attr = "value"` ----------------

_TOKEN = re.compile(
    r'\s+|#[^\n]*|//[^\n]*|/\*.*?\*/|"(?P<str>(?:[^"\\]|\\.)*)"|(?P<ident>[A-Za-z_][A-Za-z0-9_-]*)|(?P<punct>[{}=])',
    re.S,
)


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            line = text.count("\n", 0, pos) + 1
            raise ValueError(f"line {line}: unexpected {text[pos]!r}")
        pos = m.end()
        if m.group("str") is not None:
            out.append(("str", json.loads(f'"{m.group("str")}"')))
        elif m.group("ident") is not None:
            out.append(("ident", m.group("ident")))
        elif m.group("punct") is not None:
            out.append((m.group("punct"), m.group("punct")))
    return out


def _parse_hcl(text: str) -> dict[str, Any]:
    toks = _tokens(text)
    body, pos = _body(toks, 0)
    if pos != len(toks):
        raise ValueError(f"unexpected {toks[pos][1]!r}")
    return body


def _body(toks: list[tuple[str, str]], pos: int) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {}
    while pos < len(toks) and toks[pos][0] != "}":
        kind, name = toks[pos]
        if kind not in ("ident", "str"):
            raise ValueError(f"expected a name, got {name!r}")
        pos += 1
        labels: list[str] = []
        while pos < len(toks) and toks[pos][0] == "str":
            labels.append(toks[pos][1])
            pos += 1
        if pos >= len(toks):
            raise ValueError(f"unexpected end after {name!r}")
        if toks[pos][0] == "=" and not labels:
            if pos + 1 >= len(toks) or toks[pos + 1][0] not in ("str", "ident"):
                raise ValueError(f"{name} = needs a string value")
            out[name] = toks[pos + 1][1]
            pos += 2
        elif toks[pos][0] == "{":
            block, pos = _body(toks, pos + 1)
            if pos >= len(toks):
                raise ValueError(f"unclosed block {name!r}")
            pos += 1
            target = out.setdefault(name, {})
            for label in labels[:-1]:
                target = target.setdefault(label, {})
            if labels:
                target.setdefault(labels[-1], {}).update(block)
            else:
                target.update(block)
        else:
            raise ValueError(f"expected '=' or '{{' after {name!r}")
    return out, pos
