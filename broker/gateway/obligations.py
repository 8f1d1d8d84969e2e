"""Obligations a decision attaches (CONTRACT §6): MFA on the caller's token, and approvals bound to exactly
(subject, actor, tool, args digest) — found by the id the call names or by that binding, else requested."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from broker.context import RequestContext
from broker.errors import (
    ApprovalRequired,
    InsufficientUserAuthentication,
)
from broker.gateway.guard import CallGuard
from broker.gateway.services import Services
from broker.identity.principal import Principal
from broker.policy.approvers import APPROVAL_OBLIGATIONS, has_mfa
from broker.policy.engine import Decision
from broker.runtime import Runtime
from broker.txn.approval_rules import Approval

if TYPE_CHECKING:  # the approvals service (aiohttp handlers) imports this module
    pass


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


@dataclass(frozen=True)
class ApprovalState:
    """The approval a call needs: the record (bound to subject, actor, tool, args digest), whether it covers the
    call now, which obligations it answers and why they apply."""

    approval: Approval
    covered: bool
    required: tuple[str, ...]
    reasons: str


async def approval_for_call(
    services: Services,
    runtime: Runtime,
    principal: Principal,
    tool: str,
    arguments: dict[str, Any],
    digest: str,
    decision: Decision,
    approval_id: str | None,
    now: float,
    guard: CallGuard,
) -> ApprovalState | None:
    """None if the decision needs no approval; else the approval bound to exactly this call — the one named by
    ``approval_id`` if it covers the call, else the (new or pending, idempotent per binding) one of the book.
    ``guard`` runs before the book is asked (revocations, the proof's claim): a revoked principal or a replayed
    proof requests nothing."""
    required = approvals_needed(decision)
    if not required:
        return None
    service = services.approvals
    reasons = "; ".join(r for r in decision.obligation_reasons if r)  # aligned with obligation_rules
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
                issuer=principal.token.iss,
            )
        )

    if approval_id is not None:
        named = await service.book.get(approval_id, now)
        if named is not None and covers(named):
            return ApprovalState(named, True, required, reasons)
    await guard.before_approval()
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
        issuer=principal.token.iss,
    )
    return ApprovalState(approval, covers(approval), required, reasons)


async def discharge_approvals(
    services: Services,
    runtime: Runtime,
    principal: Principal,
    tool: str,
    arguments: dict[str, Any],
    decision: Decision,
    approval_id: str | None,
    now: float,
    record: RequestContext,
    guard: CallGuard,
) -> Approval | None:
    """Approval obligations: satisfied by a granted, unused approval bound to exactly this (subject, actor,
    tool, arguments), or refused with ``approval_required`` naming the (new or pending) approval. Returns the
    approval that covers the call, if one was needed."""
    assert record.args_digest is not None
    state = await approval_for_call(
        services, runtime, principal, tool, arguments, record.args_digest, decision, approval_id, now, guard
    )
    if state is None:
        return None
    record.approval_id = state.approval.id  # the audit record joins the approval's request and execution
    if state.covered:
        return state.approval
    raise approval_required(state, services.approvals.approval_url(state.approval.id))


async def spend_approval(
    services: Services,
    runtime: Runtime,
    principal: Principal,
    tool: str,
    arguments: dict[str, Any],
    decision: Decision,
    approval: Approval,
    now: float,
    record: RequestContext,
    guard: CallGuard,
) -> None:
    """An approval authorises ONE execution: the executing call records its use atomically. Two calls racing
    for one approval (two txn tokens from two exchanges, parallel MCP calls) get one winner; the other is
    refused with a new approval to ask for — so no approval, and no limit an approval discharges (a security
    review after the velocity limit), covers more than one call."""
    if await services.approvals.book.use(approval, now):
        return
    assert record.args_digest is not None
    # the binding's live approval now (the spent one is not live any more: a new one is requested)
    state = await approval_for_call(
        services, runtime, principal, tool, arguments, record.args_digest, decision, None, now, guard
    )
    assert state is not None  # this call was decided to need an approval
    record.approval_id = state.approval.id
    raise approval_required(state, services.approvals.approval_url(state.approval.id))


def approval_required(state: ApprovalState, url: str) -> ApprovalRequired:
    approval_id = state.approval.id
    return ApprovalRequired(
        state.reasons or "this call needs approval",
        reason=f"approval_required: {', '.join(state.required)}",
        extra={"approval_id": approval_id, "required": list(state.required), "approval_url": url},
        headers={"Location": f"/v1/approvals/{approval_id}"},
    )
