"""``/v1/approvals``: approval status for the requester's agent and approvers, and approvers' decisions.

Stage order of every route, with the reason for each constraint:

    identity     the caller's token and proof; an SVID is optional (approvers have none). First: nothing about
                 an approval is revealed to, or changed by, an unauthenticated caller.
    guard        revocations and the proof's replay claim (one store step), right after identity.
    who          POST: an agent (a certificate, an ``act`` claim, or a SPIFFE ``client_id``) is refused before
                 the body is read — approvals are decided by humans with their own token (CONTRACT §3).
    approval     the record; a caller who may not see it gets exactly the answer for a missing id (404).
    rules        POST: requester / eligibility / double vote / state (``broker.txn.approval_rules.refusal``), before
                 MFA — someone who may not approve at all is told 403, not asked to step up.
    mfa          POST: ``401 insufficient_user_authentication`` with ``acr_values="mfa"`` (RFC 9470).
    vote         compare-and-set in the store (rules re-checked against the latest record).
    audit        every outcome: refusals by the middleware, successes here before the answer is sent.

``GET /v1/approvals`` (an extension, for ``broker approvals list``) lists the pending approvals the calling
human could decide now.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from broker.config.models import Approvals
from broker.context import CTX
from broker.errors import AccessDenied, InsufficientUserAuthentication, InvalidRequest, NotFound
from broker.gateway.body import authenticate, read_json_body
from broker.gateway.guard import final_guard
from broker.gateway.middleware import audit_decision
from broker.identity.principal import Principal
from broker.jose import SigningKey
from broker.observability import Metrics
from broker.policy.approvers import Eligibility, has_mfa
from broker.resources import APPROVALS, METRICS, RUNTIME, STATE
from broker.state.base import StateStore
from broker.txn.approval_rules import Approval, Verdict, refusal, same_person
from broker.txn.approvals import ApprovalBook
from broker.txn.webhooks import WebhookNotifier

__all__ = [
    "APPROVALS",
    "ApprovalService",
    "decidable",
    "decide_approval",
    "decide_as",
    "decision_reason",
    "get_approval",
    "is_agent",
    "list_approvals",
]

_NOT_FOUND = "no such approval"
_NO_STORE = {"Cache-Control": "no-store"}


@dataclass
class ApprovalService:
    """Everything the approval routes and the token exchange need, for one running broker."""

    book: ApprovalBook
    eligibility: Eligibility
    notifier: WebhookNotifier
    metrics: Metrics
    public_url: str

    @classmethod
    def create(
        cls,
        config: Approvals,
        store: StateStore,
        signer: SigningKey,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        public_url: str,
    ) -> ApprovalService:
        """Raises ``EligibilityCompileError`` for approver rules that do not compile."""
        return cls(
            book=ApprovalBook(
                store, ttl_seconds=config.ttl_seconds, max_pending_listed=config.max_pending_listed
            ),
            eligibility=Eligibility.compile(config),
            notifier=WebhookNotifier(
                session,
                signer,
                config.webhooks,
                public_url=public_url,
                on_result=lambda result: metrics.approval_announcements.labels(result=result).inc(),
            ),
            metrics=metrics,
            public_url=public_url.rstrip("/"),
        )

    def reconfigure(self, config: Approvals) -> None:
        """Apply a reloaded ``approvals`` section: compile first (``EligibilityCompileError`` leaves the old
        rules in force), then swap rules, lifetime of new approvals and webhooks. Existing approvals keep
        their expiry; deliveries in flight finish against the old webhook list."""
        eligibility = Eligibility.compile(config)
        self.eligibility = eligibility
        self.book.ttl_seconds = config.ttl_seconds
        self.book.max_pending_listed = config.max_pending_listed
        self.notifier.set_webhooks(config.webhooks)

    def start(self) -> None:
        """Start the webhook worker (call inside the running loop, e.g. from ``cleanup_ctx``)."""
        self.notifier.start()

    async def close(self) -> None:
        await self.notifier.close()

    def approval_url(self, approval_id: str) -> str:
        """CONTRACT §14: the approvals page, where a human decides (``GET /v1/approvals/{id}`` is the API)."""
        return f"{self.public_url}/approvals/{approval_id}"

    async def request(
        self,
        *,
        subject: str,
        actor: str | None,
        tool: str,
        arguments: Mapping[str, Any],
        args_digest: str,
        required: tuple[str, ...] | list[str],
        reason: str,
        policy_version: str,
        now: float,
        issuer: str | None = None,
    ) -> tuple[Approval, bool]:
        """:meth:`ApprovalBook.request`; a new approval is counted (``pending``) and announced to webhooks."""
        approval, created = await self.book.request(
            issuer=issuer,
            subject=subject,
            actor=actor,
            tool=tool,
            arguments=arguments,
            args_digest=args_digest,
            required=required,
            reason=reason,
            policy_version=policy_version,
            now=now,
        )
        if created:
            self.metrics.approvals.labels(state="pending").inc()
            self.notifier.announce(approval)
        return approval, created


def is_agent(principal: Principal) -> bool:
    """An agent, or a token issued to one: an SVID, an ``act`` claim, or a SPIFFE ID as ``client_id``
    (the dual-identity form without ``act``). Such a caller never decides an approval, even without its
    certificate: the human the token names did not present it themselves."""
    token = principal.token
    return (
        principal.actor is not None
        or token.act_sub is not None
        or (token.client_id is not None and token.client_id.startswith("spiffe://"))
    )


async def _identify(request: web.Request) -> tuple[Principal, ApprovalService, float]:
    ctx = request[CTX]
    ctx.route = "approval"  # set first: a refused identity is audited as an approval event too
    app = request.app
    service = app[APPROVALS]
    principal = await authenticate(request, app[RUNTIME].current, require_actor=False)
    await final_guard(app[STATE], app[METRICS], principal)
    return principal, service, time.time()


async def _approval(request: web.Request, service: ApprovalService, now: float) -> Approval:
    approval = await service.book.get(request.match_info["id"], now)
    if approval is None:
        raise NotFound(_NOT_FOUND, reason="approval_unknown")
    ctx = request[CTX]
    ctx.tool, ctx.args_digest, ctx.approval_id = approval.tool, approval.args_digest, approval.id
    return approval


def _may_read(approval: Approval, principal: Principal, service: ApprovalService) -> bool:
    """CONTRACT §3: the requesting subject together with its agent, and the approvers of this approval."""
    if principal.actor is not None:  # the requester through its agent: the binding's (issuer, sub) and agent
        return principal.actor_id == approval.actor and same_person(
            approval.issuer, approval.subject, principal.token.iss, principal.subject
        )
    if is_agent(principal):
        return False
    eligible = service.eligibility.for_approval(approval)
    return any(
        same_person(v.iss, v.sub, principal.token.iss, principal.subject) for v in approval.approvals
    ) or any(eligible(name, principal.claims) for name in approval.required)


async def _success(request: web.Request, reason: str, body: Any) -> web.Response:
    ctx = request[CTX]
    ctx.decision, ctx.reason, ctx.status = "allow", reason, 200
    await audit_decision(request.app, ctx)  # CONTRACT §9: written before the answer leaves
    return web.json_response(body, headers=_NO_STORE)


async def get_approval(request: web.Request) -> web.StreamResponse:
    """``GET /v1/approvals/{id}``: the status body, or ``404 not_found`` to anyone who may not read it."""
    principal, service, now = await _identify(request)
    approval = await _approval(request, service, now)
    if not _may_read(approval, principal, service):
        raise NotFound(_NOT_FOUND, reason="approval_not_visible")
    return await _success(request, f"read:{approval.id}", approval.to_api(now=now))


def verdict(value: object) -> Verdict:
    """An approver's decision as sent (a JSON member or a form field), for both channels."""
    if value == "approve":
        return "approve"
    if value == "deny":
        return "deny"
    raise InvalidRequest('decision must be "approve" or "deny"', reason="approval_decision")


def _verdict(body: Any) -> Verdict:
    if not isinstance(body, dict) or set(body) != {"decision"}:
        raise InvalidRequest('send {"decision": "approve"} or {"decision": "deny"}', reason="approval_body")
    return verdict(body["decision"])


async def decide_approval(request: web.Request) -> web.StreamResponse:
    """``POST /v1/approvals/{id}`` ``{"decision": "approve"|"deny"}`` by an approver → ``200`` new status."""
    principal, service, now = await _identify(request)
    if is_agent(principal):
        raise AccessDenied(
            "approvals are decided by people with their own token, not by agents", reason="approval_by_agent"
        )
    decision = _verdict(await read_json_body(request, request.app[RUNTIME].current.limits))
    approval = await _approval(request, service, now)
    updated = await decide_as(
        service,
        approval,
        approver_iss=principal.token.iss,
        approver_sub=principal.subject,
        approver_claims=principal.claims,
        decision=decision,
        now=now,
    )
    return await _success(request, decision_reason(decision, updated, now), updated.to_api(now=now))


async def decide_as(
    service: ApprovalService,
    approval: Approval,
    *,
    approver_iss: str,
    approver_sub: str,
    approver_claims: Mapping[str, Any],
    decision: Verdict,
    now: float,
) -> Approval:
    """The one approval decision, for ``POST /v1/approvals/{id}`` and the approvals page alike: the rules
    (requester, eligibility, double vote, state), then MFA, then the compare-and-set vote. Raises the refusal."""
    eligible = service.eligibility.for_approval(approval)
    error = refusal(
        approval,
        approver_iss=approver_iss,
        approver_sub=approver_sub,
        approver_claims=approver_claims,
        eligible=eligible,
        now=now,
    )
    if error is not None:
        raise error
    if not has_mfa(approver_claims):
        raise InsufficientUserAuthentication(
            "deciding an approval requires multi-factor authentication",
            reason="approval_mfa_required",
            challenge_params={"acr_values": "mfa"},
        )
    updated = await service.book.decide(
        approval.id,
        approver_iss=approver_iss,
        approver_sub=approver_sub,
        approver_claims=approver_claims,
        decision=decision,
        eligible=eligible,
        now=now,
    )
    service.metrics.approvals.labels(state=updated.state_at(now)).inc()
    return updated


def decision_reason(decision: Verdict, updated: Approval, now: float) -> str:
    """The audit ``reason`` of a recorded vote (``approve:<id>:<state>``), the same on every channel."""
    return f"{decision}:{updated.id}:{updated.state_at(now)}"


async def decidable(
    service: ApprovalService,
    approver_iss: str,
    approver_sub: str,
    approver_claims: Mapping[str, Any],
    now: float,
) -> list[Approval]:
    """The pending approvals (``approver_iss``, ``approver_sub``) could decide now (:func:`refusal` finds nothing
    against them)."""
    return [
        approval
        for approval in await service.book.pending(now)
        if refusal(
            approval,
            approver_iss=approver_iss,
            approver_sub=approver_sub,
            approver_claims=approver_claims,
            eligible=service.eligibility.for_approval(approval),
            now=now,
        )
        is None
    ]


async def list_approvals(request: web.Request) -> web.StreamResponse:
    """``GET /v1/approvals``: ``{"approvals": [status, …]}`` the calling human could decide now."""
    principal, service, now = await _identify(request)
    if is_agent(principal):
        raise AccessDenied("only approvers can list approvals", reason="approval_by_agent")
    listed = [
        a.to_api(now=now)
        for a in await decidable(service, principal.token.iss, principal.subject, principal.claims, now)
    ]
    return await _success(request, f"list:{len(listed)}", {"approvals": listed})
