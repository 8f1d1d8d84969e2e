"""The stages shared by discovery, invocation and the token exchange. Each raises a BrokerError to refuse;
the order in which a route runs them is written in that route's module (tools.py, exchange.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
import structlog
from aiohttp import web

from broker.canonical import args_digest, strict_loads
from broker.config.models import Limits
from broker.context import CTX
from broker.errors import (
    AccessDenied,
    ApprovalRequired,
    InsufficientUserAuthentication,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnknownTool,
    UnsupportedMediaType,
)
from broker.gateway.guard import grant_id
from broker.identity.principal import Principal
from broker.policy.approvers import APPROVAL_OBLIGATIONS
from broker.policy.engine import Decision, Env
from broker.resources import METRICS, RUNTIME, SIGNER, STATE
from broker.runtime import CompiledTool, Runtime
from broker.txn.approvals import Approval
from broker.txn.tokens import MintedTxn, mint_txn_token

log = structlog.get_logger("broker.policy")


async def authenticate(request: web.Request, runtime: Runtime, *, require_actor: bool = True) -> Principal:
    """Identity (broker.identity.principal has its own order); the identities land in the request record."""
    principal = await runtime.authenticator.authenticate(
        request, now=time.time(), require_actor=require_actor
    )
    ctx = request[CTX]
    ctx.actor, ctx.subject = principal.actor, principal.subject
    return principal


@dataclass
class Visible:
    tool: CompiledTool
    env: Env
    counters: dict[str, dict[str, Any]]
    now: int


async def policy_env(
    request: web.Request, runtime: Runtime, principal: Principal, names: Sequence[str], now: int
) -> tuple[Env, dict[str, dict[str, Any]]]:
    """One evaluation environment (and the counters in it) for deciding on ``names``: the counters their rules
    read come from the state store once; the Env re-points ``tool`` per name (``Env.bind_tool``)."""
    policies = runtime.policies
    needed = frozenset().union(*(policies.counters_needed(name) for name in names))
    counters = await runtime.counters.fetch(
        request.app[STATE], needed, subject=principal.subject, actor_id=principal.actor_id, now=now
    )
    env = policies.build_env(
        subject=principal.claims,
        actor_id=principal.actor_id,
        tool=next(iter(names), ""),
        args=None,
        counters=counters,
        now=now,
    )
    return env, counters


async def visible_names(
    request: web.Request, runtime: Runtime, principal: Principal, names: Sequence[str], env: Env
) -> list[str]:
    """Discovery: the names policy lets this (subject, actor) see, minus revoked grants (a revoked grant hides
    its tool at once, as invocation refuses it)."""
    seen = []
    for name in names:
        env.bind_tool(name)
        if runtime.policies.visible(name, env):
            seen.append(name)
    store = request.app[STATE]
    revoked = await asyncio.gather(
        *(store.is_revoked({"grant": grant_id(principal.subject, principal.actor_id, n)}) for n in seen)
    )
    return [name for name, hit in zip(seen, revoked, strict=True) if hit is None]


async def visible_tool(request: web.Request, runtime: Runtime, principal: Principal, name: str) -> Visible:
    """The tool, if this (subject, actor) may see it; else exactly what a missing tool answers (404)."""
    ctx = request[CTX]
    tool = runtime.tools.get(name)
    if tool is None:
        raise UnknownTool("no such tool", reason="unknown_tool")
    ctx.tool = tool.name
    now = int(time.time())
    env, counters = await policy_env(request, runtime, principal, [name], now)
    visibility = runtime.policies.visibility(name, env)
    if visibility.outcome != "allow":
        raise UnknownTool("no such tool", reason=f"hidden: {visibility.reason}"[:200])
    return Visible(tool=tool, env=env, counters=counters, now=now)


async def read_json_body(request: web.Request, limits: Limits) -> Any:
    """The request body as strict JSON (HOSTILE P15, P17–P19), bounded before and while reading."""
    if request.headers.get("Content-Encoding", "identity").lower() != "identity":
        raise UnsupportedMediaType("compressed request bodies are not accepted", reason="body_encoded")
    if request.content_type != "application/json" or request.charset not in (None, "utf-8"):
        raise UnsupportedMediaType("send the arguments as application/json (UTF-8)", reason="body_not_json")
    return strict_loads(await read_body(request, limits), max_depth=limits.max_json_depth)


async def read_body(request: web.Request, limits: Limits) -> bytes:
    """The body, bounded in size and in time (a slow-body client cannot hold a handler: HOSTILE P14)."""
    limit = limits.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes", reason="body_too_large")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(runtime_of(request).config.server.request_timeout_seconds):
            # read() returns what has arrived so far (b"" only at the end): loop until the end or the limit
            while chunk := await request.content.read(limit + 1 - size):
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(
                        f"request body is larger than {limit} bytes", reason="body_too_large"
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout("the request body did not arrive in time", reason="body_timeout") from None
    return b"".join(chunks)


def check_arguments(request: web.Request, tool: CompiledTool, arguments: Any) -> dict[str, Any]:
    """A JSON object valid against the tool's input JSON Schema (before policy: CONTRACT §8); the error names
    the failing place, e.g. ``arguments.amount``. Records the digest and auditable fields."""
    if not isinstance(arguments, dict):
        raise InvalidRequest("arguments must be a JSON object", reason="arguments_not_object")
    error = jsonschema.exceptions.best_match(tool.validator.iter_errors(arguments))
    if error is not None:
        where = "arguments" + "".join(
            f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path
        )
        raise InvalidRequest(f"{where}: {error.message}"[:300], reason="arguments_schema")
    ctx = request[CTX]
    ctx.args_digest = args_digest(arguments)
    ctx.audit_args = {k: arguments[k] for k in tool.config.audit_fields if k in arguments} or None
    return arguments


def decide(
    request: web.Request, runtime: Runtime, visible: Visible, principal: Principal, arguments: dict[str, Any]
) -> Decision:
    """The policy decision with arguments; a deny always beats obligations (CONTRACT §8)."""
    name = visible.tool.name
    visible.env.bind_args(arguments)
    decision = runtime.policies.decide(name, visible.env)
    if runtime.shadow is not None:
        _compare_shadow(request, runtime, visible, principal, arguments, decision)
    if decision.outcome == "hidden":
        raise UnknownTool("no such tool", reason=f"hidden: {decision.reason}"[:200])
    if decision.outcome == "deny":
        raise AccessDenied(decision.message, reason=f"{decision.rule}: {decision.reason}"[:300])
    return decision


def _compare_shadow(
    request: web.Request,
    runtime: Runtime,
    visible: Visible,
    principal: Principal,
    arguments: dict[str, Any],
    active: Decision,
) -> None:
    assert runtime.shadow is not None
    name = visible.tool.name
    env = runtime.shadow.build_env(
        subject=principal.claims,
        actor_id=principal.actor_id,
        tool=name,
        args=arguments,
        counters=visible.counters,
        now=visible.now,
    )
    candidate = runtime.shadow.decide(name, env)
    if (candidate.outcome, candidate.obligations) != (active.outcome, active.obligations):
        request.app[METRICS].policy_shadow_diffs.labels(tool=name).inc()
        log.warning(
            "shadow policy disagrees",
            tool=name,
            request_id=request[CTX].request_id,
            active={"outcome": active.outcome, "rule": active.rule, "obligations": list(active.obligations)},
            shadow={
                "outcome": candidate.outcome,
                "rule": candidate.rule,
                "obligations": list(candidate.obligations),
            },
        )


def has_mfa(claims: Any) -> bool:
    """RFC 9470: the token shows MFA by ``acr`` = "mfa" or "mfa" among its ``amr`` values."""
    amr = claims.get("amr")
    return claims.get("acr") == "mfa" or (isinstance(amr, list) and "mfa" in amr)


def require_mfa(decision: Decision, principal: Principal) -> None:
    if "mfa" in decision.obligations and not has_mfa(principal.claims):
        # the reasons are those of the rules that fired (aligned with obligation_rules, not obligations)
        reason = "; ".join(r for r in decision.obligation_reasons if r)
        raise InsufficientUserAuthentication(
            reason or "this call needs multi-factor authentication",
            reason="mfa_required",
            challenge_params={"acr_values": "mfa"},
        )


def approvals_needed(decision: Decision) -> tuple[str, ...]:
    return tuple(o for o in decision.obligations if o in APPROVAL_OBLIGATIONS)


def approval_required(
    approval_id: str, required: tuple[str, ...], public_url: str, reason: str
) -> ApprovalRequired:
    return ApprovalRequired(
        reason or "this call needs approval",
        reason=f"approval_required: {', '.join(required)}",
        extra={
            "approval_id": approval_id,
            "required": list(required),
            "approval_url": f"{public_url}/v1/approvals/{approval_id}",
        },
        headers={"Location": f"/v1/approvals/{approval_id}"},
    )


@dataclass(frozen=True)
class ApprovalState:
    """The approval a call needs: the record (bound to subject, actor, tool, args digest), whether it covers the
    call now, which obligations it answers and why they apply."""

    approval: Approval
    covered: bool
    required: tuple[str, ...]
    reasons: str


async def approval_for_call(
    request: web.Request,
    runtime: Runtime,
    principal: Principal,
    tool: str,
    arguments: dict[str, Any],
    decision: Decision,
    *,
    approval_id: str | None = None,
) -> ApprovalState | None:
    """None if the decision needs no approval; else the approval bound to exactly this call — the one named by
    ``approval_id`` if it covers the call, else the (new or pending, idempotent per binding) one of the book."""
    from broker.gateway.approvals import APPROVALS  # the approvals service imports this module's stages

    required = approvals_needed(decision)
    if not required:
        return None
    service = request.app[APPROVALS]
    now = time.time()
    reasons = "; ".join(r for r in decision.obligation_reasons if r)  # aligned with obligation_rules
    digest = request[CTX].args_digest or args_digest(arguments)
    subject, actor = principal.subject, principal.actor_id

    def covers(approval: Approval) -> bool:
        return bool(
            service.book.covers(
                approval,
                subject=subject,
                actor=actor,
                tool=tool,
                args_digest=digest,
                required=required,
                now=now,
            )
        )

    if approval_id is not None:
        named = await service.book.get(approval_id, now)
        if named is not None and covers(named):
            return ApprovalState(named, True, required, reasons)
    approval, _ = await service.request(
        subject=subject,
        actor=actor,
        tool=tool,
        arguments=arguments,
        args_digest=digest,
        required=required,
        reason=reasons,
        policy_version=runtime.policy_version,
        now=now,
    )
    return ApprovalState(approval, covers(approval), required, reasons)


async def discharge_approvals(
    request: web.Request,
    runtime: Runtime,
    principal: Principal,
    visible: Visible,
    arguments: dict[str, Any],
    decision: Decision,
    *,
    approval_id: str | None,
) -> str | None:
    """Approval obligations: satisfied by a granted approval bound to exactly this (subject, actor, tool,
    arguments), or refused with ``approval_required`` naming the (new or pending) approval. Returns the id of
    the approval that covers the call, if one was needed."""
    state = await approval_for_call(
        request, runtime, principal, visible.tool.name, arguments, decision, approval_id=approval_id
    )
    if state is None:
        return None
    if state.covered:
        return str(state.approval.id)
    raise approval_required(
        state.approval.id, state.required, runtime.config.server.public_url, state.reasons
    )


def mint_for_call(
    request: web.Request,
    runtime: Runtime,
    principal: Principal,
    tool: str,
    arguments: Mapping[str, Any],
    injected: Mapping[str, Any] | None,
    *,
    approval_id: str | None = None,
) -> MintedTxn:
    """The txn token for this call (CONTRACT §5): the exchange's answer, or the one minted at the edge for a call
    that came without one (the backend always gets one). Counted, and recorded in the request's audit record."""
    config = runtime.config
    minted = mint_txn_token(
        request.app[SIGNER],
        issuer=config.server.public_url,
        audience=config.identity.trust_domain,
        subject=principal.subject,
        scope=f"tool:{tool}",
        actor_id=principal.actor_id or "",
        tool=tool,
        arguments=arguments,
        policy_version=runtime.policy_version,
        cnf_jkt=principal.jkt,
        req_ip=request.remote,
        authn="dpop" if principal.jkt else "mtls",
        approval_id=approval_id,
        injected=injected,
        now=time.time(),
    )
    request.app[METRICS].txn_tokens.labels(tool=tool, event="minted").inc()
    request[CTX].txn = minted.txn
    return minted


def runtime_of(request: web.Request) -> Runtime:
    return request.app[RUNTIME].current
