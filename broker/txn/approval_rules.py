"""Approvals for step-up (CONTRACT §6), the pure part: the record, its votes and the decision rules.

An approval is requested when policy obligates ``manager_approval`` (one eligible approver), ``dual_approval``
(two DISTINCT eligible approvers) or ``security_review`` (one eligible approver); ``mfa`` is a property of the
caller's own token, never an approval. It is bound to (subject, actor, tool, args_digest) and expires
``approvals.ttl_seconds`` after it was requested, approved or not: :func:`covers` is the one check the token
exchange makes before honouring an ``approval_id``.

The decision rules are pure (:func:`refusal`, :func:`apply_decision`, :func:`covers`; they take ``now``):

1. the approval exists, is ``pending`` and not expired          else ``approval_not_pending`` / ``approval_expired``
2. the approver is not the requesting subject (four eyes)       else ``approval_self``
3. the approver has not decided this approval before            else ``approval_already_decided``
4. the approver is eligible for a still-unsatisfied requirement else ``approval_not_eligible``

Rules 2 and 3, and the count of distinct approvers, compare ``sub`` alone, across every trusted issuer
(:func:`may_be_same_person`). The API's IdP and the approvals page's login IdP (``approvals.ui.issuer``) may be two
issuers for the same people: requiring the same issuer too would let one person approve their own request, or cast
both votes of ``dual_approval``, by voting once through each. So the page's IdP must give a person the same ``sub``
as the API's IdP. Two different people who share a ``sub`` in two IdPs then cannot approve each other's requests and
count as one approver: a refusal, never a bypass. :meth:`Approval.unsatisfied` counts distinct ``sub`` values and
never the requester's own, and :func:`covers` re-checks it, so a record approved otherwise (written before this
rule) covers nothing.

Who may read an approval and whose call it covers stay bound to the person as (issuer, subject) (:func:`same_person`):
``sub`` is unique only within its issuer (OIDC Core §2), so ``alice`` of one configured issuer neither finds nor uses
the approval of ``alice`` of another. Records written before the issuer was stored have none (``None``).

A ``deny`` by an eligible approver ends the approval (``denied``). An ``approve`` counts toward every unsatisfied
requirement the approver is eligible for; the approval is ``approved`` once every requirement has its count.
Who the approver is (a human with their own DPoP-bound token, no agent, with MFA) is the gateway's check
(``broker.gateway.approvals``): these rules only see a subject and its claims.

The records live in the state store: :mod:`broker.txn.approvals`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final, Literal

from broker.errors import AccessDenied, BrokerError

State = Literal["pending", "approved", "denied", "expired"]
Verdict = Literal["approve", "deny"]
#: obligations that are approvals, in the order they are reported; how many distinct approvers each needs
APPROVERS_NEEDED: Final[Mapping[str, int]] = {"manager_approval": 1, "dual_approval": 2, "security_review": 1}
#: (obligation name, approver claims) -> may this approver satisfy it
EligibleFn = Callable[[str, Mapping[str, Any]], bool]


def rfc3339(epoch: float) -> str:
    """Seconds since the epoch as an RFC 3339 UTC timestamp (``2025-01-31T12:00:00Z``)."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def approval_requirements(obligations: Iterable[str]) -> tuple[str, ...]:
    """The approval obligations among ``obligations`` (``mfa`` dropped), in :data:`APPROVERS_NEEDED` order.

    Raises ``ValueError`` for an unknown obligation name (a bug in the caller).
    """
    names = set(obligations) - {"mfa"}
    unknown = names - set(APPROVERS_NEEDED)
    if unknown:
        raise ValueError(f"unknown obligations {sorted(unknown)}")
    return tuple(name for name in APPROVERS_NEEDED if name in names)


def same_person(iss_a: str | None, sub_a: str, iss_b: str | None, sub_b: str) -> bool:
    """(issuer, subject) pairs naming one person, for who may READ an approval; an unknown issuer (``None``: a
    record from before issuers were stored) matches every issuer. Not for four eyes: :func:`may_be_same_person`."""
    return sub_a == sub_b and (iss_a is None or iss_b is None or iss_a == iss_b)


def may_be_same_person(sub_a: str, sub_b: str) -> bool:
    """Whether two subjects may be one human, for four eyes and distinct approvers: the same ``sub`` whatever the
    issuer (the approvals page logs in at another IdP than the API's), so the rules err on refusing (module
    docstring)."""
    return sub_a == sub_b


@dataclass(frozen=True, slots=True)
class Vote:
    """One approver's decision and the requirements it counted toward; ``iss``: the approver's issuer."""

    sub: str
    decision: Verdict
    at: float
    satisfies: tuple[str, ...]
    iss: str | None = None

    def to_record(self) -> dict[str, Any]:
        return {
            "sub": self.sub,
            "iss": self.iss,
            "decision": self.decision,
            "at": self.at,
            "satisfies": list(self.satisfies),
        }


@dataclass(frozen=True, slots=True)
class Approval:
    """An approval request and its votes. ``state`` is the stored state; :meth:`state_at` adds expiry."""

    id: str
    state: Literal["pending", "approved", "denied"]
    required: tuple[str, ...]
    tool: str
    arguments: Mapping[str, Any]
    args_digest: str
    subject: str
    actor: str | None
    reason: str
    created_at: float
    expires_at: float
    policy_version: str
    approvals: tuple[Vote, ...] = ()
    #: the store's version of the record this was read from (0: not stored yet)
    version: int = field(default=0, compare=False)
    #: the quota event this pending approval holds: (counter scope, event member, event time)
    quota: tuple[str, str, float] | None = field(default=None, compare=False)
    #: when the one call it approves was executed (an approval authorises one execution, CONTRACT §12)
    used_at: float | None = None
    #: the issuer of the requester's token (None: a record from before issuers were stored)
    issuer: str | None = None

    @property
    def binding(self) -> tuple[str, str | None, str, str, tuple[str, ...]]:
        """What the approval is bound to: (subject, actor, tool, args_digest, required)."""
        return (self.subject, self.actor, self.tool, self.args_digest, self.required)

    def state_at(self, now: float) -> State:
        return "expired" if now >= self.expires_at else self.state

    def unsatisfied(self) -> tuple[str, ...]:
        """Requirements that still lack approvers, in order. Approvers are counted by distinct ``sub`` (whatever
        the issuer) and the requester's own vote never counts (module docstring)."""
        return tuple(
            name
            for name in self.required
            if len(
                {
                    v.sub
                    for v in self.approvals
                    if v.decision == "approve"
                    and name in v.satisfies
                    and not may_be_same_person(v.sub, self.subject)
                }
            )
            < APPROVERS_NEEDED[name]
        )

    def request_view(self) -> dict[str, Any]:
        """The ``request`` variable of the approver rules' CEL (``approvals.<name>.when``)."""
        return {
            "tool": self.tool,
            "subject": self.subject,
            "actor": self.actor or "",
            "args": dict(self.arguments),
            "required": list(self.required),
        }

    def to_api(self, *, now: float) -> dict[str, Any]:
        """The CONTRACT §3 status body."""
        return {
            "id": self.id,
            "state": self.state_at(now),
            "required": list(self.required),
            "approvals": [
                {"sub": v.sub, "decision": v.decision, "at": rfc3339(v.at)} for v in self.approvals
            ],
            "tool": self.tool,
            "arguments": dict(self.arguments),
            "subject": self.subject,
            "actor": self.actor,
            "expires_at": rfc3339(self.expires_at),
            "used_at": None if self.used_at is None else rfc3339(self.used_at),
        }

    def to_record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "required": list(self.required),
            "tool": self.tool,
            "arguments": dict(self.arguments),
            "args_digest": self.args_digest,
            "subject": self.subject,
            "issuer": self.issuer,
            "actor": self.actor,
            "reason": self.reason,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "policy_version": self.policy_version,
            "approvals": [v.to_record() for v in self.approvals],
            "quota": None if self.quota is None else list(self.quota),
            "used_at": self.used_at,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Approval:
        """Inverse of :meth:`to_record`; ``ValueError`` for a record this module did not write."""
        try:
            votes = tuple(
                Vote(
                    str(v["sub"]),
                    v["decision"],
                    float(v["at"]),
                    tuple(v["satisfies"]),
                    None if v.get("iss") is None else str(v["iss"]),
                )
                for v in record["approvals"]
            )
            approval = cls(
                id=str(record["id"]),
                state=record["state"],
                required=tuple(record["required"]),
                tool=str(record["tool"]),
                arguments=dict(record["arguments"]),
                args_digest=str(record["args_digest"]),
                subject=str(record["subject"]),
                actor=None if record["actor"] is None else str(record["actor"]),
                reason=str(record["reason"]),
                created_at=float(record["created_at"]),
                expires_at=float(record["expires_at"]),
                policy_version=str(record["policy_version"]),
                approvals=votes,
                version=int(record.get("version", 0)),
                quota=_quota_of(record.get("quota")),
                used_at=None if record.get("used_at") is None else float(record["used_at"]),
                issuer=None if record.get("issuer") is None else str(record["issuer"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError("not an approval record") from exc
        if approval.state not in ("pending", "approved", "denied") or any(
            v.decision not in ("approve", "deny") for v in votes
        ):
            raise ValueError("not an approval record")
        return approval


def _quota_of(value: Any) -> tuple[str, str, float] | None:
    if value is None:
        return None
    scope, member, at = value
    if not isinstance(scope, str) or not isinstance(member, str) or isinstance(at, bool):
        raise TypeError("quota is not (scope, member, time)")
    return scope, member, float(at)


# --- the pure rules ---------------------------------------------------------------------------------------


def refusal(
    approval: Approval,
    *,
    approver_sub: str,
    approver_claims: Mapping[str, Any],
    eligible: EligibleFn,
    now: float,
    approver_iss: str | None = None,
) -> BrokerError | None:
    """Why ``approver_sub`` may not decide ``approval`` now (rules 1-4 of the module docstring), or None.

    ``approver_iss`` does not matter here: the requester and earlier voters are compared by ``sub`` across every
    issuer (fail closed); :func:`apply_decision` records it on the vote."""
    state = approval.state_at(now)
    if state == "expired":
        return AccessDenied("this approval has expired", reason="approval_expired")
    if state != "pending":
        return AccessDenied("this approval is no longer pending", reason="approval_not_pending")
    if may_be_same_person(approval.subject, approver_sub):
        return AccessDenied("a requester cannot approve their own request", reason="approval_self")
    if any(may_be_same_person(v.sub, approver_sub) for v in approval.approvals):
        return AccessDenied("you have already decided this approval", reason="approval_already_decided")
    if not any(eligible(name, approver_claims) for name in approval.unsatisfied()):
        return AccessDenied("you are not an approver for this request", reason="approval_not_eligible")
    return None


def apply_decision(
    approval: Approval,
    *,
    approver_sub: str,
    approver_claims: Mapping[str, Any],
    decision: Verdict,
    eligible: EligibleFn,
    now: float,
    approver_iss: str | None = None,
) -> Approval:
    """The approval after this vote; raises the :func:`refusal` if there is one."""
    if decision not in ("approve", "deny"):
        raise ValueError("decision must be 'approve' or 'deny'")
    error = refusal(
        approval,
        approver_sub=approver_sub,
        approver_claims=approver_claims,
        eligible=eligible,
        now=now,
        approver_iss=approver_iss,
    )
    if error is not None:
        raise error
    satisfies = tuple(name for name in approval.unsatisfied() if eligible(name, approver_claims))
    updated = replace(
        approval, approvals=(*approval.approvals, Vote(approver_sub, decision, now, satisfies, approver_iss))
    )
    if decision == "deny":
        return replace(updated, state="denied")
    return replace(updated, state="approved") if not updated.unsatisfied() else updated


def covers(
    approval: Approval,
    *,
    subject: str,
    actor: str | None,
    tool: str,
    args_digest: str,
    required: Iterable[str],
    now: float,
    issuer: str | None = None,
) -> bool:
    """True if ``approval`` lets this exact call through: approved, unexpired, not yet used by an execution, same
    binding — the same person, (issuer, subject), so ``alice`` of another issuer cannot use it — and granted for
    at least the approvals policy requires now (a stricter policy needs a new one). Its votes must still satisfy
    every requirement (:meth:`Approval.unsatisfied`): a record approved by its requester or by one ``sub`` voting
    twice through two issuers (written before the four-eyes rules compared ``sub`` across issuers) covers nothing."""
    return (
        approval.state_at(now) == "approved"
        and not approval.unsatisfied()
        and approval.used_at is None
        and approval.issuer == issuer
        and approval.subject == subject
        and approval.actor == actor
        and approval.tool == tool
        and approval.args_digest == args_digest
        and set(approval_requirements(required)) <= set(approval.required)
    )
