"""``/v1/tools``: discovery and invocation. The stage order of an invocation is written once, here.

 1 identity     SVID → actor; DPoP proof + access token → subject (broker.identity.principal has its own order).
                First: nothing is revealed to an unauthenticated peer.
 2 visibility   the tool exists and policy lets this (subject, actor) see it — else 404 unknown_tool, exactly
                like a missing tool, and before arguments so a schema error cannot reveal a hidden tool.
 3 arguments    strict JSON, then the tool's input JSON Schema: policy only ever sees well-typed arguments.
 4 txn token    a presented Txn-Token is verified and bound to this tool, subject, actor, DPoP key and the
                exact arguments (before injection: the agent's intent is what was locked).
 5 policy       deny rules (a deny beats any obligation), then obligations. With a txn token they were
                discharged at the exchange; without one, MFA and approvals are demanded here.
 6 injection    server-side arguments computed from the principal override what the agent sent.
 7 guard        revocations, DPoP replay and txn single use in one atomic store step — last, so a refused
                call never burns a proof or a token.
 8 audit        the decision is written before anything leaves the broker: never forwarded unaudited.
 9 forward      the canonical bytes of the injected arguments, with a Txn-Token (the agent's, or minted here).
10 filter       the backend's answer is masked and row-filtered before the agent sees it.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from aiohttp import web

from broker.canonical import canonicalize
from broker.context import CTX
from broker.errors import InvalidTxnToken, TxnTokenMismatch
from broker.gateway.forward import json_response, upstream_headers
from broker.gateway.guard import final_guard
from broker.gateway.middleware import audit_decision
from broker.gateway.stages import (
    Visible,
    authenticate,
    check_arguments,
    decide,
    discharge_approvals,
    mint_for_call,
    policy_env,
    read_json_body,
    require_mfa,
    runtime_of,
    visible_names,
    visible_tool,
)
from broker.identity.principal import Principal
from broker.observability import traceparent_for
from broker.policy.engine import PolicyError
from broker.resources import FORWARDER, METRICS, SIGNER, STATE
from broker.runtime import Runtime
from broker.txn.tokens import (
    TxnClaims,
    check_invocation,
    txn_replay_key,
    verify_txn_token,
)

log = structlog.get_logger("broker.discovery")

#: how long past its expiry a consumed txn stays recorded (covers clock skew between replicas)
TXN_LEEWAY = 5
GRANT_LIFETIME = 300


async def invoke_tool(request: web.Request) -> web.StreamResponse:
    ctx = request[CTX]
    ctx.route = "invoke"
    runtime = runtime_of(request)
    app = request.app

    principal = await authenticate(request, runtime)  # 1
    visible = await visible_tool(request, runtime, principal, request.match_info["name"])  # 2
    tool = visible.tool
    arguments = check_arguments(request, tool, await read_json_body(request, runtime.limits))  # 3
    decision = decide(request, runtime, visible, principal, arguments)  # 4
    presented = presented_txn_token(request, runtime, principal, visible, arguments)  # 5
    if presented is None:
        require_mfa(decision, principal)
        await discharge_approvals(request, runtime, principal, visible, arguments, decision, approval_id=None)
    forwarded = tool.filters.inject(arguments, subject=principal.claims, actor_id=principal.actor_id)  # 6
    injected = {name: forwarded[name] for name in tool.config.inject}
    body = canonicalize(forwarded)  # what executes is exactly what was decided on (and, with a token, locked)
    if presented is not None and canonicalize(presented.forwarded_arguments()) != body:
        # the backend verifies the body against the token: refuse here, before the token is consumed
        raise TxnTokenMismatch(
            "server-side arguments changed since the exchange; exchange again", reason="txn_injected_mismatch"
        )
    now = time.time()
    txn_claim = None
    if presented is not None:
        ctx.txn = presented.txn
        ttl = max(1.0, presented.exp - now + TXN_LEEWAY)
        txn_claim = (presented.txn, txn_replay_key(presented.txn), ttl)
    await final_guard(app[STATE], app[METRICS], principal, tool=tool.name, txn=txn_claim)  # 7
    await runtime.counters.record(
        app[STATE], tool.name, arguments, subject=principal.subject, actor_id=principal.actor_id, now=now
    )
    if presented is not None:
        app[METRICS].txn_tokens.labels(tool=tool.name, event="consumed").inc()
        txn_token = request.headers["Txn-Token"]
    else:
        txn_token = mint_for_call(request, runtime, principal, tool.name, arguments, injected).token

    ctx.decision = "allow"  # 8
    audit_decision(app, ctx)

    headers = upstream_headers(  # 9
        request_id=ctx.request_id,
        traceparent=traceparent_for(request.headers.get("traceparent")),
        extra={"Txn-Token": txn_token},
    )
    answer = await app[FORWARDER].call(tool.target, body, headers)
    if tool.filters.filters_response:  # 10
        filtered = tool.filters.filter_response(
            answer.body, subject=principal.claims, actor_id=principal.actor_id
        )
        answer = answer.with_body(filtered)
    return json_response(answer, ctx.request_id)


def presented_txn_token(
    request: web.Request, runtime: Runtime, principal: Principal, visible: Visible, arguments: dict[str, Any]
) -> TxnClaims | None:
    """The agent's Txn-Token, verified and bound to this call; required for ``txn_token: required`` tools."""
    values = request.headers.getall("Txn-Token", [])
    tool = visible.tool
    metrics = request.app[METRICS]
    if not values:
        if tool.config.txn_token == "required":
            metrics.txn_tokens.labels(tool=tool.name, event="rejected").inc()
            raise InvalidTxnToken(
                "this tool needs a transaction token (POST /v1/token)", reason="txn_missing"
            )
        return None
    try:
        if len(values) != 1:
            raise InvalidTxnToken("send exactly one Txn-Token header", reason="txn_multiple")
        config = runtime.config
        claims = verify_txn_token(
            values[0],
            keys=request.app[SIGNER].verification_keys(time.time()),
            issuer=config.server.public_url,
            audience=config.identity.trust_domain,
            now=time.time(),
            max_bytes=config.server.limits.max_token_bytes,
        )
        check_invocation(
            claims,
            tool=tool.name,
            arguments=arguments,
            subject=principal.subject,
            actor_id=principal.actor_id,
            jkt=principal.jkt,
        )
    except Exception:
        metrics.txn_tokens.labels(tool=tool.name, event="rejected").inc()
        raise
    return claims


async def list_tools(request: web.Request) -> web.StreamResponse:
    """Discovery: the same visibility decision as invocation, each visible tool with a signed grant."""
    ctx = request[CTX]
    ctx.route = "discovery"
    runtime = runtime_of(request)
    app = request.app
    principal = await authenticate(request, runtime)
    now = int(time.time())
    policies = runtime.policies
    await final_guard(app[STATE], app[METRICS], principal)
    env, _ = await policy_env(request, runtime, principal, list(runtime.tools), now)
    visible: list[tuple[str, dict[str, Any]]] = []
    for name in await visible_names(request, runtime, principal, list(runtime.tools), env):
        env.bind_tool(name)
        try:
            constraints = policies.grant_constraints(name, env)
        except PolicyError as exc:  # a constraint that cannot be evaluated hides the tool (fail closed)
            log.warning("grant constraints failed; tool hidden", tool=name, error=str(exc))
            continue
        visible.append((name, constraints))
    signer = app[SIGNER]
    tools = []
    for name, constraints in visible:
        tool = runtime.tools[name]
        grant = signer.sign(
            {
                "iss": runtime.config.server.public_url,
                "tool": name,
                "sub": principal.subject,
                "act": {"sub": principal.actor_id},
                "constraints": constraints,
                "policy_version": runtime.policy_version,
                "iat": now,
                "exp": min(now + GRANT_LIFETIME, principal.token.exp),
            },
            typ="grant+jwt",
        )
        tools.append(
            {
                "name": name,
                "description": tool.config.description,
                "input_schema": tool.config.input_schema,
                "grant": grant,
            }
        )
    ctx.decision, ctx.status = "allow", 200
    audit_decision(app, ctx)
    return web.json_response({"tools": tools}, headers={"Cache-Control": "no-store"})
