"""The discovery client's reading of Consul's 403 bodies: the permission, the segment and the rule."""

from __future__ import annotations

from dynamo_grpc.discovery.acl import ANONYMOUS_ACCESSOR, explain, parse_denial
from dynamo_grpc.discovery.config import ConsulSettings


def test_parse_consul_denials() -> None:
    d = parse_denial(
        "Permission denied: token with AccessorID 'abc-1' lacks permission 'key:write' on \"dynamo/models/m/w\""
    )
    assert d is not None and (d.permission, d.segment, d.accessor) == ("key:write", "dynamo/models/m/w", "abc-1")
    assert d.rule() == 'key "dynamo/models/m/w" { policy = "write" }'
    g = parse_denial("Permission denied: provided token lacks permission 'acl:read'")
    assert g is not None and (g.permission, g.segment, g.accessor) == ("acl:read", None, "")
    assert g.rule() == 'acl = "read"'
    assert parse_denial("ACL not found") is None


def test_messages_say_whose_token_and_what_to_add() -> None:
    env = ConsulSettings.from_env({"CONSUL_HTTP_TOKEN": "s"})
    body = "Permission denied: token with AccessorID 'abc' lacks permission 'session:write' on \"node-1\""
    err = explain(body, env, "publishing a card")
    assert err.message == (
        "publishing a card: consul denied session:write on 'node-1' for this token (CONSUL_HTTP_TOKEN, "
        'AccessorID \'abc\'); give its policy session "node-1" { policy = "write" } (or a session_prefix '
        "rule covering it)"
    )
    anon = f"Permission denied: token with AccessorID '{ANONYMOUS_ACCESSOR}' lacks permission 'service:write' on \"s\""
    assert "for the anonymous token (no CONSUL_HTTP_TOKEN set)" in explain(anon, ConsulSettings()).message
    assert (
        "this token (CONSUL_HTTP_TOKEN_FILE /run/t, AccessorID 'x')"
        in explain(
            "Permission denied: token with AccessorID 'x' lacks permission 'key:read' on \"k\"",
            ConsulSettings(token="t", token_source="CONSUL_HTTP_TOKEN_FILE /run/t"),
        ).message
    )
    assert explain("ACL not found", env).denial is None
