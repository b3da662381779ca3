"""Consul's ACL HTTP API (the part a deployment script needs): bootstrap, policies and tokens.

Writes need ``acl:write``, reads ``acl:read`` (a management token has both); ``/v1/acl/token/self`` needs
only a valid token. With ACLs off every endpoint answers 401 ``ACL support disabled``, as Consul does.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from dynamo_grpc.consul_dev.acl import ACL, Authorizer, Policy, lower_keys
from dynamo_grpc.consul_dev.acl_rules import Access
from dynamo_grpc.consul_dev.state import ConsulError

ACL_KEY: web.AppKey[ACL | None] = web.AppKey("acl", object)  # type: ignore[arg-type]


def _reply(data: Any, acl: ACL) -> web.Response:
    return web.Response(
        text=json.dumps(data), content_type="application/json", headers={"X-Consul-Index": str(max(1, acl.index))}
    )


def _acl(request: web.Request) -> ACL:
    acl = request.app[ACL_KEY]
    if acl is None:
        raise ConsulError(401, "ACL support disabled")
    return acl


def _authz(request: web.Request, need: Access) -> Authorizer:
    authz: Authorizer = request["authz"]
    authz.require("acl", need)
    return authz


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = json.loads(await request.read() or b"{}")
    except ValueError as exc:
        raise ConsulError(400, f"Request decode failed: {exc}") from None
    return lower_keys(data)


async def bootstrap(request: web.Request) -> web.Response:
    acl = _acl(request)
    return _reply(acl.token_json(acl.bootstrap()), acl)


async def policy_create(request: web.Request) -> web.Response:
    acl = _acl(request)
    _authz(request, Access.WRITE)
    return _reply(acl.upsert_policy(await _body(request)).to_json(), acl)


async def policy_update(request: web.Request) -> web.Response:
    acl = _acl(request)
    _authz(request, Access.WRITE)
    return _reply(acl.upsert_policy(await _body(request), request.match_info["id"]).to_json(), acl)


def _found(policy: Policy | None, acl: ACL) -> web.Response:
    if policy is None:
        raise ConsulError(404, "ACL not found")
    return _reply(policy.to_json(), acl)


async def policy_read(request: web.Request) -> web.Response:
    acl = _acl(request)
    _authz(request, Access.READ)
    return _found(acl.policies.get(request.match_info["id"]), acl)


async def policy_read_by_name(request: web.Request) -> web.Response:
    acl = _acl(request)
    _authz(request, Access.READ)
    return _found(acl.policy_by_name(request.match_info["name"]), acl)


async def policy_list(request: web.Request) -> web.Response:
    acl = _acl(request)
    _authz(request, Access.READ)
    return _reply([{k: v for k, v in p.to_json().items() if k != "Rules"} for p in acl.policies.values()], acl)


async def token_create(request: web.Request) -> web.Response:
    acl = _acl(request)
    _authz(request, Access.WRITE)
    return _reply(acl.token_json(acl.upsert_token(await _body(request))), acl)


async def token_update(request: web.Request) -> web.Response:
    acl = _acl(request)
    _authz(request, Access.WRITE)
    return _reply(acl.token_json(acl.upsert_token(await _body(request), request.match_info["id"])), acl)


async def token_self(request: web.Request) -> web.Response:
    acl = _acl(request)
    return _reply(acl.token_json(acl.token(request["secret"])), acl)


async def token_read(request: web.Request) -> web.Response:
    acl = _acl(request)
    _authz(request, Access.READ)
    token = acl.tokens.get(request.match_info["id"])
    if token is None:
        raise ConsulError(404, "ACL not found")
    return _reply(acl.token_json(token), acl)


async def token_delete(request: web.Request) -> web.Response:
    acl = _acl(request)
    _authz(request, Access.WRITE)
    acl.delete_token(request.match_info["id"])
    return _reply(True, acl)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_put("/v1/acl/bootstrap", bootstrap)
    router.add_put("/v1/acl/policy", policy_create)
    router.add_get("/v1/acl/policies", policy_list)
    router.add_get("/v1/acl/policy/name/{name}", policy_read_by_name)
    router.add_get("/v1/acl/policy/{id}", policy_read)
    router.add_put("/v1/acl/policy/{id}", policy_update)
    router.add_put("/v1/acl/token", token_create)
    router.add_get("/v1/acl/token/self", token_self)
    router.add_get("/v1/acl/token/{id}", token_read)
    router.add_put("/v1/acl/token/{id}", token_update)
    router.add_delete("/v1/acl/token/{id}", token_delete)
