"""``/v1/tools``: discovery and invocation over HTTP — a transport over :mod:`broker.gateway.pipeline`.

Invocation: identity, then :func:`~broker.gateway.pipeline.authorize` (visibility, arguments, counters,
policy, txn token, obligations, injection, guard, mint, audit — the order and its reasons are written there),
then the forward of the canonical bytes it decided on, and the response path (filters) before the agent sees
anything. The body is read inside the pipeline's argument stage, after visibility, so a schema or JSON error
cannot reveal a hidden tool. Refusals are BrokerErrors, rendered once by :mod:`broker.gateway.middleware`.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from aiohttp import web

from broker.audit.outcome import Outcome
from broker.context import CTX
from broker.gateway.body import authenticate, read_json_body
from broker.gateway.discovery import discover
from broker.gateway.forward import json_response, upstream_headers
from broker.gateway.guard import final_guard
from broker.gateway.pipeline import ToolCall, authorize
from broker.gateway.services import audit_decision
from broker.policy.engine import PolicyError
from broker.resources import SERVICES

log = structlog.get_logger("broker.discovery")

GRANT_LIFETIME = 300


async def invoke_tool(request: web.Request) -> web.StreamResponse:
    ctx = request[CTX]
    ctx.route = "invoke"
    services = request.app[SERVICES]
    runtime = services.runtime.current
    principal = await authenticate(request, runtime)
    name = request.match_info["name"]
    compiled = runtime.tools.get(name)
    presented = request.headers.getall("Txn-Token", [])
    call = ToolCall(
        step="invoke",
        name=name,
        arguments=lambda: read_json_body(request, runtime.limits),
        principal=principal,
        tool=compiled.spec if compiled is not None else None,
        txn_token=presented[0] if len(presented) == 1 else None,
        txn_tokens_presented=len(presented),
        client_ip=request.remote,
        clock=time.time,  # the body is read inside authorize: decide at the time it was complete
    )
    authorized = await authorize(call, services, ctx, time.time())
    assert compiled is not None  # authorize refuses a tool it does not know
    headers = upstream_headers(
        request_id=ctx.request_id,
        traceparent=ctx.traceparent,
        extra={"Txn-Token": authorized.txn_token},
    )
    # from here on the call has an outcome (CONTRACT §15), recorded by the middleware with the bytes sent
    outcome = ctx.outcome = Outcome(time.perf_counter())
    answer = await services.forwarder.call(compiled.target, authorized.body, headers)
    outcome.answered(answer.status)
    outcome.finished(time.perf_counter())
    # 10: 5xx → 502; filtered tools' bodies filtered and sealed (CONTRACT §12); others pass unparsed
    body = compiled.filters.filter_answer(
        answer.status, answer.body, subject=principal.claims, actor_id=principal.actor_id
    )
    return json_response(answer.with_body(body), ctx.request_id)


async def list_tools(request: web.Request) -> web.StreamResponse:
    """Discovery: the same visibility decision as invocation, each visible tool with a signed grant."""
    ctx = request[CTX]
    ctx.route = "discovery"
    services = request.app[SERVICES]
    runtime = services.runtime.current
    principal = await authenticate(request, runtime)
    now = int(time.time())
    policies = runtime.policies
    # grants are minted under the policy in force: a revoked version mints none (CONTRACT §17)
    await final_guard(services.store, services.metrics, principal, policy_version=runtime.policy_version)
    env, names = await discover(services, runtime, principal, list(runtime.tools), now)
    visible: list[tuple[str, dict[str, Any]]] = []
    for name in names:
        env.bind_tool(name)
        try:
            constraints = policies.grant_constraints(name, env)
        except PolicyError as exc:  # a constraint that cannot be evaluated hides the tool (fail closed)
            log.warning("grant constraints failed; tool hidden", tool=name, error=str(exc))
            continue
        visible.append((name, constraints))
    signer = services.signer
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
    await audit_decision(services, ctx)
    return web.json_response({"tools": tools}, headers={"Cache-Control": "no-store"})
