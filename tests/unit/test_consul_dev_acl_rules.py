"""Consul's ACL rule language and precedence, as consul-dev evaluates it."""

from __future__ import annotations

import pytest

from dynamo_grpc.consul_dev.acl import ACL, ANONYMOUS_ACCESSOR, ACLDenied
from dynamo_grpc.consul_dev.acl_rules import Access, Rules, RulesError, parse_rules
from dynamo_grpc.consul_dev.state import ConsulError


def test_hcl_and_json_rules_mean_the_same() -> None:
    hcl = parse_rules(
        """
        # the worker's rules
        service_prefix "dynamo-worker" { policy = "write" }
        key_prefix "dynamo/models/" {
          policy = "write"   // cards
        }
        key "dynamo/models/locked" { policy = "deny" }
        /* everyone reads nodes */
        node_prefix "" { policy = "read" }
        operator = "read"
        """
    )
    json_rules = parse_rules(
        '{"service_prefix": {"dynamo-worker": {"policy": "write"}},'
        ' "key_prefix": {"dynamo/models/": {"policy": "write"}},'
        ' "key": {"dynamo/models/locked": {"policy": "deny"}},'
        ' "node_prefix": {"": {"policy": "read"}}, "operator": "read"}'
    )
    assert hcl == json_rules
    assert hcl.lookup("service", "dynamo-worker-7") is Access.WRITE
    assert hcl.lookup("service", "dynamo-frontend") is None
    assert hcl.lookup("key", "dynamo/models/m/w1") is Access.WRITE
    assert hcl.lookup("key", "dynamo/models/locked") is Access.DENY  # exact beats prefix
    assert hcl.lookup("node", "any-node") is Access.READ
    assert hcl.lookup("operator", "") is Access.READ


def test_longest_prefix_wins_and_deny_wins_a_merge() -> None:
    rules = parse_rules('key_prefix "" { policy = "read" }\nkey_prefix "a/b/" { policy = "deny" }')
    assert rules.lookup("key", "a/x") is Access.READ
    assert rules.lookup("key", "a/b/c") is Access.DENY
    merged = Rules()
    merged.merge(parse_rules('service "s" { policy = "write" }'))
    merged.merge(parse_rules('service "s" { policy = "read" }'))
    assert merged.lookup("service", "s") is Access.WRITE  # most permissive of two grants
    merged.merge(parse_rules('service "s" { policy = "deny" }'))
    assert merged.lookup("service", "s") is Access.DENY  # but an explicit deny wins


@pytest.mark.parametrize(
    "text",
    [
        'servce_prefix "" { policy = "read" }',  # unknown resource
        'service "x" { policy = "list" }',  # list exists for keys only
        'key "x" { policy = "admin" }',
        'key "x" { polcy = "read" }',
        'key "x" { policy = "read"',
        "acl = ",
        '{"key": ',
    ],
)
def test_bad_rules_are_refused(text: str) -> None:
    with pytest.raises(RulesError):
        parse_rules(text)


def test_denial_message_has_consuls_shape() -> None:
    acl = ACL("deny")
    anon = acl.authorize("")
    with pytest.raises(ACLDenied) as err:
        anon.require("service", Access.WRITE, "dynamo-worker")
    assert err.value.status == 403
    assert err.value.message == (
        f"Permission denied: token with AccessorID '{ANONYMOUS_ACCESSOR}' lacks permission "
        "'service:write' on \"dynamo-worker\""
    )
    with pytest.raises(ConsulError, match="ACL not found"):
        acl.authorize("no-such-secret")


def test_default_allow_grants_all_but_acl() -> None:
    anon = ACL("allow").authorize("")
    assert anon.allows("key", Access.WRITE, "anything")
    assert not anon.allows("acl", Access.READ)


def test_recursive_delete_needs_write_on_everything_under_the_prefix() -> None:
    acl = ACL("deny", initial_management="root")
    acl.upsert_policy({"name": "p", "rules": 'key_prefix "a/" { policy = "write" }\nkey "a/keep" { policy = "read" }'})
    acl.upsert_token({"secretid": "t", "policies": [{"Name": "p"}]})
    authz = acl.authorize("t")
    authz.require_prefix_write("key", "a/x/")
    with pytest.raises(ACLDenied, match="'key:write' on \"a/\""):
        authz.require_prefix_write("key", "a/")
    acl.authorize("root").require_prefix_write("key", "")
