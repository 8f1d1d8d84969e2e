"""The one authorization pipeline. REST invocation, the token exchange and MCP ``tools/call`` all run
:func:`authorize`; the transports only translate their wire format in and out (CONTRACT §12).

Identity runs before it, once per request and for every route (:mod:`broker.identity.principal` has its own
order, with reasons): first, so an unauthenticated peer learns nothing. Then, for one call of one tool:

 1 visibility   the tool exists and policy lets this (subject, actor) see it — else ``unknown_tool``, exactly
                like a missing tool, and before the arguments are read so a schema error cannot reveal it; then
                the token's own intent (RFC 9396 ``authorization_details``) lists it — else ``access_denied``
                naming it (CONTRACT §17: the agent knows its own token, so nothing is revealed).
 2 arguments    a JSON object valid against the tool's input schema(s): policy only sees well-typed values;
                then within one of the token's intent entries for the tool (``access_denied`` naming it).
 3 counters     a call that executes (invocation, MCP) reserves its place in every counter it feeds, in one
                atomic store step, and decides on the counts *before* it — so concurrent calls each see a
                distinct count and a limit of N admits exactly N (CONTRACT §12). Refused later: released.
                The exchange executes nothing: it reads the counters and reserves none.
 4 policy       deny rules first (a deny beats any obligation); shadow policies beside it, never deciding.
 5 txn token    a presented token is verified and bound to tool, subject, actor, DPoP key and the exact
                arguments — after policy, so a deny answers like a deny whatever token came with it.
 6 obligations  MFA on the caller's token, then approvals bound to exactly (subject, actor, tool, args digest):
                named by the txn token or the exchange's ``approval_id``, or found by that binding. A call whose
                obligations grew since its exchange (counters moved) needs them met now. Asking the book files
                an approval (record, quota, webhooks, approvers' list): the guard of stage 8 runs first, minus
                the txn token's consumption — a revoked principal files nothing, and that refusal burns its proof.
 7 injection    server-side arguments from the principal override the agent's (a presented token must have
                promised the same values, else ``txn_token_mismatch`` before anything is consumed).
 8 guard        revocations (incl. the token's policy version), DPoP replay and txn single use in ONE atomic
                store step — last, so a refused call never burns a proof or a token (HOSTILE S07); a call that
                ran it at stage 6 and goes through (an approval found by its binding) does not claim twice.
 9 mint         the exchange's txn token, or the edge token of a call that came without one.
10 audit        the allow record is written before anything leaves the broker (``audit_unavailable`` else).

Every stage raises a :class:`~broker.errors.BrokerError` to refuse; each transport renders it once (HTTP JSON
with its status, or a JSON-RPC error with its code). Stages take values — the principal, the arguments, the
services record — never the request, so the table of decisions is tested without sockets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from broker.canonical import canonicalize
from broker.context import RequestContext
from broker.errors import (
    AccessDenied,
    BrokerError,
    InvalidRequest,
    InvalidTxnToken,
    StateUnavailable,
    TxnTokenMismatch,
    UnknownTool,
)
from broker.gateway.discovery import policy_env
from broker.gateway.guard import CallGuard
from broker.gateway.obligations import discharge_approvals, require_mfa, spend_approval
from broker.gateway.services import Services, audit_decision
from broker.identity.principal import Principal
from broker.jose import b64url_encode
from broker.policy.engine import Decision, Env
from broker.runtime import Runtime, ToolSpec
from broker.txn.tokens import TxnClaims, check_invocation, mint_txn_token, txn_replay_key, verify_txn_token

log = structlog.get_logger("broker.policy")

Step = Literal["exchange", "invoke", "mcp"]
#: how long past its expiry a consumed txn stays recorded (covers clock skew between replicas)
TXN_LEEWAY = 5


@dataclass(frozen=True)
class ToolCall:
    """One call of one tool, as a transport hands it to :func:`authorize`."""

    step: Step
    name: str
    #: reads the arguments at stage 2 — after visibility, so that reading them (a body that is not JSON, a
    #: schema error) cannot reveal a hidden tool. :func:`given` wraps arguments a transport already holds.
    arguments: Callable[[], Awaitable[Any]]
    principal: Principal
    #: the tool as this transport resolved it (None: no such tool here → unknown_tool)
    tool: ToolSpec | None
    #: a presented ``Txn-Token`` (invocation), and how many were sent (exactly one is accepted)
    txn_token: str | None = None
    txn_tokens_presented: int = 0
    #: the exchange's ``approval_id``
    approval_id: str | None = None
    #: the client's address, recorded in minted tokens (``rctx.req_ip``)
    client_ip: str | None = None
    #: why the transport found no tool (audit only; the caller sees unknown_tool either way)
    missing_reason: str = "unknown_tool"
    #: a transport whose arguments are still arriving when it calls :func:`authorize` (REST reads the body at
    #: stage 2, up to ``request_timeout_seconds`` later) passes its clock: from stage 2 on the call is decided at
    #: the time its arguments were complete — policy ``now``, counters, txn-token and approval expiry, the
    #: minted token — so a trickled body cannot outlive a token or back-date a counter event
    clock: Callable[[], float] | None = None


@dataclass(frozen=True)
class Authorized:
    """A call the pipeline let through, audited: what to forward and with which token."""

    tool: ToolSpec
    #: the agent's arguments (what was decided on, digested and locked)
    arguments: dict[str, Any]
    #: what the upstream receives: the arguments after server-side injection, and their RFC 8785 bytes
    forwarded: dict[str, Any]
    body: bytes
    txn_token: str
    txn: str
    approval_id: str | None
    decision: Decision


def given(arguments: Any) -> Callable[[], Awaitable[Any]]:
    """Arguments a transport has already parsed (the exchange's ``request_details``, an MCP message)."""

    async def read() -> Any:
        return arguments

    return read


def _schema_problem(tool: ToolSpec, arguments: Any) -> None:
    if not isinstance(arguments, dict):
        raise InvalidRequest("arguments must be a JSON object", reason="arguments_not_object")
    for schema in tool.schemas:
        problem = schema.error(arguments)
        if problem is not None:
            raise InvalidRequest(
                problem, reason="arguments_schema", rpc_message=f"Invalid arguments: {problem}"
            )


def unknown_tool(name: str, reason: str) -> UnknownTool:
    """Identical for a missing, unconfigured, hidden, drifted or revoked tool: only ``reason`` (audit) differs."""
    return UnknownTool("no such tool", reason=reason[:200], rpc_message=f"Unknown tool: {name}")


async def authorize(call: ToolCall, services: Services, record: RequestContext, now: float) -> Authorized:
    """Stages 1–10 of the module docstring. Raises a BrokerError to refuse; fills ``record`` (the request's
    audit record) as it goes and writes the allow record last. ``now``: when the call started (visibility);
    with ``call.clock`` the later stages take the time its arguments were complete."""
    runtime: Runtime = services.runtime.current
    principal = call.principal
    tool = call.tool
    record.tool = call.name
    if tool is None:  # 1
        raise unknown_tool(call.name, call.missing_reason)
    env, counters = await policy_env(services, runtime, principal, [tool.name], now)
    visibility = runtime.policies.visibility(tool.name, env)
    if visibility.outcome != "allow":
        raise unknown_tool(tool.name, f"hidden: {visibility.reason}")
    intent = principal.intent
    if intent is not None and not intent.visible(tool.name):  # the token's own intent does not list it (§17)
        raise AccessDenied(
            "not in the token's authorization_details",
            reason="intent: not in the token's authorization_details",
        )

    arguments = await call.arguments()  # 2
    if call.clock is not None:  # the arguments are complete now, not when the call started (ToolCall.clock)
        read_at = call.clock()
        if int(read_at) != int(now):  # policy ``now`` is whole seconds
            env.bind_now(int(read_at))
        now = read_at
    # the token was verified when the headers came; the call is decided now, after its arguments arrived
    principal.token.check_time(now)
    _schema_problem(tool, arguments)
    canonical = canonicalize(arguments)
    record.args_digest = b64url_encode(hashlib.sha256(canonical).digest())  # CONTRACT §5 args_digest
    record.audit_args = {k: arguments[k] for k in tool.audit_fields if k in arguments} or None
    if intent is not None:  # before counters: a call outside the token's intent reserves and consumes nothing
        outside = intent.permits(tool.name, arguments)
        if outside is not None:
            raise AccessDenied(
                f"outside the token's intent: {outside}"[:300], reason=f"intent: {outside}"[:300]
            )

    reserved = None
    fed = runtime.counters.feeds(tool.name) if call.step != "exchange" else frozenset()
    if fed:  # 3
        with services.tracer.span("state.counters"):
            counts, reserved = await runtime.counters.reserve(
                services.store,
                tool.name,
                arguments,
                read=fed & runtime.policies.counters_needed(tool.name),
                subject=principal.subject,
                actor_id=principal.actor_id,
                now=now,
            )
        if counts:  # the rules read what this call reserved: decide on the reserved counts
            counters = {**counters, **counts}
            env.bind_counters(counters)
    try:
        return await _decide_and_seal(
            call, services, runtime, record, env, counters, arguments, canonical, now
        )
    except BaseException:
        if reserved is not None:
            await _release(services, runtime, reserved)
        raise


async def _decide_and_seal(
    call: ToolCall,
    services: Services,
    runtime: Runtime,
    record: RequestContext,
    env: Env,
    counters: dict[str, dict[str, Any]],
    arguments: dict[str, Any],
    canonical: bytes,
    now: float,
) -> Authorized:
    principal = call.principal
    tool = call.tool
    assert tool is not None
    with services.tracer.span("policy"):  # 4
        decision = decide(services, runtime, env, principal, tool.name, arguments, counters, now, record)

    presented = None  # 5
    if call.step == "invoke":
        presented = presented_txn_token(services, runtime, call, tool, arguments, now, record.args_digest)

    txn_claim = None
    if presented is not None:
        txn_claim = (presented.txn, txn_replay_key(presented.txn), max(1.0, presented.exp - now + TXN_LEEWAY))
    guard = CallGuard(
        services.store,
        services.metrics,
        principal,
        tool.name,
        txn_claim,
        # the version the token was (or is about to be) minted under: a revoked one refuses (CONTRACT §17)
        presented.policy_version if presented is not None else runtime.policy_version,
    )

    require_mfa(decision, principal)  # 6
    approval_id = presented.approval_id if presented is not None else call.approval_id
    approval = await discharge_approvals(
        services, runtime, principal, tool.name, arguments, decision, approval_id, now, record, guard
    )
    granted = approval.id if approval is not None else None

    forwarded = (
        tool.filters.inject(arguments, subject=principal.claims, actor_id=principal.actor_id)
        if tool.filters
        else dict(arguments)
    )  # 7
    injected_names = [name for name, _ in tool.filters.injections] if tool.filters else []
    injected = {name: forwarded[name] for name in injected_names}
    body = canonicalize(forwarded) if injected_names else canonical
    if presented is not None and canonicalize(presented.forwarded_arguments()) != body:
        # the backend verifies the body against the token: refuse here, before the token is consumed
        raise TxnTokenMismatch(
            "server-side arguments changed since the exchange; exchange again", reason="txn_injected_mismatch"
        )

    if presented is not None:  # 8
        record.txn = presented.txn
    with services.tracer.span("state.guard"):  # revocations, DPoP replay and txn consume: one store step
        await guard.final()
    if approval is not None and call.step != "exchange":  # an approval is spent by the one call it executes
        await spend_approval(
            services, runtime, principal, tool.name, arguments, decision, approval, now, record, guard
        )

    metrics = services.metrics  # 9
    if presented is not None:
        metrics.child(metrics.txn_tokens, tool.name, "consumed").inc()
        token, txn = call.txn_token or "", presented.txn
    else:
        minted = mint_txn_token(
            services.signer,
            issuer=runtime.config.server.public_url,
            audience=runtime.config.identity.trust_domain,
            subject=principal.subject,
            scope=f"tool:{tool.name}",
            actor_id=principal.actor_id or "",
            tool=tool.name,
            arguments=arguments,
            policy_version=runtime.policy_version,
            cnf_jkt=principal.jkt,
            req_ip=call.client_ip,
            authn="dpop" if principal.jkt else "mtls",
            approval_id=granted,
            injected=injected or None,
            now=now,
            args_digest=record.args_digest,  # stage 2's, of these arguments
        )
        metrics.child(metrics.txn_tokens, tool.name, "minted").inc()
        token, txn = minted.token, minted.txn
        record.txn = txn
        if call.step == "exchange":  # it comes back for its invocation, usually to this process
            signed_by = services.signer.verification_keys(now).get(services.signer.kid)
            if signed_by is not None:
                services.minted.remember(token, signed_by)

    record.decision = "allow"  # 10
    await audit_decision(services, record)
    return Authorized(
        tool=tool,
        arguments=arguments,
        forwarded=forwarded,
        body=body,
        txn_token=token,
        txn=txn,
        approval_id=granted,
        decision=decision,
    )


async def _release(services: Services, runtime: Runtime, reservation: Any) -> None:
    try:
        await runtime.counters.release(services.store, reservation)
    except StateUnavailable:
        # the call is refused anyway; a reservation left behind over-counts until its window passes (safe side)
        log.warning("counter reservation not released", exc_info=True)


def decide(
    services: Services,
    runtime: Runtime,
    env: Env,
    principal: Principal,
    name: str,
    arguments: dict[str, Any],
    counters: dict[str, dict[str, Any]],
    now: float,
    record: RequestContext,
) -> Decision:
    """The policy decision with arguments; a deny always beats obligations (CONTRACT §8)."""
    env.bind_tool(name)
    env.bind_args(arguments)
    decision = runtime.policies.decide(name, env)
    if runtime.shadow is not None:
        _compare_shadow(services, runtime, principal, name, arguments, counters, now, decision, record)
    if decision.outcome == "hidden":
        raise unknown_tool(name, f"hidden: {decision.reason}")
    if decision.outcome == "deny":
        raise AccessDenied(
            decision.message,
            reason=decision.reason[:300],  # "<rule id>: <why>" already
            rpc_data={"rule": decision.rule, "constraint": decision.message},
        )
    return decision


def _compare_shadow(
    services: Services,
    runtime: Runtime,
    principal: Principal,
    name: str,
    arguments: dict[str, Any],
    counters: dict[str, dict[str, Any]],
    now: float,
    active: Decision,
    record: RequestContext,
) -> None:
    assert runtime.shadow is not None
    env = runtime.shadow.build_env(
        subject=principal.claims,
        actor_id=principal.actor_id,
        tool=name,
        args=arguments,
        counters=counters,
        now=int(now),
    )
    candidate = runtime.shadow.decide(name, env)
    if (candidate.outcome, candidate.obligations) != (active.outcome, active.obligations):
        services.metrics.policy_shadow_diffs.labels(tool=name).inc()
        log.warning(
            "shadow policy disagrees",
            tool=name,
            request_id=record.request_id,
            active={"outcome": active.outcome, "rule": active.rule, "obligations": list(active.obligations)},
            shadow={
                "outcome": candidate.outcome,
                "rule": candidate.rule,
                "obligations": list(candidate.obligations),
            },
        )


def presented_txn_token(
    services: Services,
    runtime: Runtime,
    call: ToolCall,
    tool: ToolSpec,
    arguments: dict[str, Any],
    now: float,
    args_digest: str | None = None,
) -> TxnClaims | None:
    """The agent's Txn-Token, verified and bound to this call; required for ``txn_token: required`` tools.
    ``args_digest``: the digest of ``arguments`` when already computed (stage 2), else computed here."""
    metrics = services.metrics
    principal = call.principal
    if call.txn_tokens_presented > 1:
        metrics.txn_tokens.labels(tool=tool.name, event="rejected").inc()
        raise InvalidTxnToken("send exactly one Txn-Token header", reason="txn_multiple")
    if call.txn_token is None:
        if tool.txn_token == "required":
            metrics.txn_tokens.labels(tool=tool.name, event="rejected").inc()
            raise InvalidTxnToken(
                "this tool needs a transaction token (POST /v1/token)", reason="txn_missing"
            )
        return None
    config = runtime.config
    try:
        claims = verify_txn_token(
            call.txn_token,
            keys=services.signer.verification_keys(now),
            issuer=config.server.public_url,
            audience=config.identity.trust_domain,
            now=now,
            max_bytes=config.server.limits.max_token_bytes,
            signed_here=services.minted.vouches,
        )
        check_invocation(
            claims,
            tool=tool.name,
            arguments=arguments,
            subject=principal.subject,
            actor_id=principal.actor_id,
            jkt=principal.jkt,
            args_digest=args_digest,
        )
    except BrokerError:
        metrics.txn_tokens.labels(tool=tool.name, event="rejected").inc()
        raise
    return claims
