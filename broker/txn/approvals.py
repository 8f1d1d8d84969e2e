"""Approvals for step-up (CONTRACT §6): who may approve what, and the approval records in the state store.

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

A ``deny`` by an eligible approver ends the approval (``denied``). An ``approve`` counts toward every unsatisfied
requirement the approver is eligible for; the approval is ``approved`` once every requirement has its count.
Who the approver is (a human with their own DPoP-bound token, no agent, with MFA) is the gateway's check
(``broker.gateway.approvals``): these rules only see a subject and its claims.

Store layout (keys hashed where a part is untrusted, HOSTILE S08): ``approval:<H(id)>`` the record,
``approval_binding:<H(binding)>`` → the id of the live approval for a binding (create-if-absent with
``compare_and_set_json(key, 0, …)``, so concurrent identical requests share one approval), and
``approval_pending`` a bounded index of pending ids for ``GET /v1/approvals``. Every update of a record is a
compare-and-set on its version, retried on conflict: concurrent decisions never lose a vote.

Per-principal quota (CONTRACT §12 "Shared state has per-principal quotas"): each distinct argument set creates
a record, so one (subject, actor) may hold at most ``max_pending_per_principal`` (default
:data:`MAX_PENDING_PER_PRINCIPAL`) PENDING approvals; a request beyond that is refused with ``429 rate_limited``
(``approval_quota``) and creates nothing, while other principals are unaffected. The count is a sliding-window
counter of the state store (``quota:approvals:<ttl>:<H(subject, actor)>``, window = the approval lifetime):
a new approval reserves one event atomically (:meth:`~broker.state.base.StateStore.reserve_events`: concurrent
requests on any replica see distinct counts, so the cap is exact — no overshoot), an approval that stops being
pending (approved or denied) hands its event back, and an expired one leaves the window by itself. A request
that ends up not creating an approval (an identical one won the race) hands its event back too; if that
release fails, the event counts until the window ends (over-counting: the safe side). A reload that changes
``approvals.ttl_seconds`` starts a new counter (the window is part of its name).
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Final, Literal

import structlog

from broker.canonical import args_digest as digest_of
from broker.errors import AccessDenied, BrokerError, NotFound, PayloadTooLarge, RateLimited, StateUnavailable
from broker.jose import b64url_encode
from broker.state.base import Reservation, StateStore, hash_key_part, json_dumps

__all__ = [
    "APPROVERS_NEEDED",
    "MAX_PENDING_PER_PRINCIPAL",
    "Approval",
    "ApprovalBook",
    "EligibleFn",
    "State",
    "Verdict",
    "Vote",
    "apply_decision",
    "approval_requirements",
    "covers",
    "refusal",
    "rfc3339",
]

log = structlog.get_logger("broker.approvals")

State = Literal["pending", "approved", "denied", "expired"]
Verdict = Literal["approve", "deny"]
#: obligations that are approvals, in the order they are reported; how many distinct approvers each needs
APPROVERS_NEEDED: Final[Mapping[str, int]] = {"manager_approval": 1, "dual_approval": 2, "security_review": 1}
#: (obligation name, approver claims) -> may this approver satisfy it
EligibleFn = Callable[[str, Mapping[str, Any]], bool]

_ID = re.compile(r"[A-Za-z0-9_-]{22}")  # 16 random bytes, base64url (128 bits)
#: decided and expired records stay readable this long after expiry (GET answers "expired", not 404)
RETENTION_SECONDS: Final = 86_400
#: arguments of one approval, as JSON; the record (arguments + votes) must fit the store's 64 KiB cap
MAX_ARGUMENTS_BYTES: Final = 32 * 1024
MAX_CAS_ATTEMPTS: Final = 8
#: ids listed by the pending index; beyond it, new approvals are still valid but not listed
MAX_PENDING_LISTED: Final = 1000
_PENDING_KEY: Final = "approval_pending"
#: pending approvals one (subject, actor) may hold (module docstring, "Per-principal quota")
MAX_PENDING_PER_PRINCIPAL: Final = 100


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


@dataclass(frozen=True, slots=True)
class Vote:
    """One approver's decision and the requirements it counted toward."""

    sub: str
    decision: Verdict
    at: float
    satisfies: tuple[str, ...]

    def to_record(self) -> dict[str, Any]:
        return {"sub": self.sub, "decision": self.decision, "at": self.at, "satisfies": list(self.satisfies)}


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

    @property
    def binding(self) -> tuple[str, str | None, str, str, tuple[str, ...]]:
        """What the approval is bound to: (subject, actor, tool, args_digest, required)."""
        return (self.subject, self.actor, self.tool, self.args_digest, self.required)

    def state_at(self, now: float) -> State:
        return "expired" if now >= self.expires_at else self.state

    def unsatisfied(self) -> tuple[str, ...]:
        """Requirements that still lack approvers, in order."""
        return tuple(
            name
            for name in self.required
            if sum(1 for v in self.approvals if v.decision == "approve" and name in v.satisfies)
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
                Vote(str(v["sub"]), v["decision"], float(v["at"]), tuple(v["satisfies"]))
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
) -> BrokerError | None:
    """Why ``approver_sub`` may not decide ``approval`` now (rules 1-4 of the module docstring), or None."""
    state = approval.state_at(now)
    if state == "expired":
        return AccessDenied("this approval has expired", reason="approval_expired")
    if state != "pending":
        return AccessDenied("this approval is no longer pending", reason="approval_not_pending")
    if approver_sub == approval.subject:
        return AccessDenied("a requester cannot approve their own request", reason="approval_self")
    if any(v.sub == approver_sub for v in approval.approvals):
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
) -> Approval:
    """The approval after this vote; raises the :func:`refusal` if there is one."""
    if decision not in ("approve", "deny"):
        raise ValueError("decision must be 'approve' or 'deny'")
    error = refusal(
        approval, approver_sub=approver_sub, approver_claims=approver_claims, eligible=eligible, now=now
    )
    if error is not None:
        raise error
    satisfies = tuple(name for name in approval.unsatisfied() if eligible(name, approver_claims))
    updated = replace(approval, approvals=(*approval.approvals, Vote(approver_sub, decision, now, satisfies)))
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
) -> bool:
    """True if ``approval`` lets this exact call through: approved, unexpired, not yet used by an execution, same
    binding, and granted for at least the approvals policy requires now (a stricter policy needs a new one)."""
    return (
        approval.state_at(now) == "approved"
        and approval.used_at is None
        and approval.subject == subject
        and approval.actor == actor
        and approval.tool == tool
        and approval.args_digest == args_digest
        and set(approval_requirements(required)) <= set(approval.required)
    )


# --- the store -----------------------------------------------------------------------------------------------


def _record_key(approval_id: str) -> str:
    return f"approval:{hash_key_part(approval_id)}"


def _binding_key(
    subject: str, actor: str | None, tool: str, args_digest: str, required: Iterable[str]
) -> str:
    binding = json_dumps([subject, actor, tool, args_digest, sorted(required)])
    return f"approval_binding:{hash_key_part(binding)}"


def _reservation_of(approval: Approval) -> Reservation | None:
    """The quota event a pending approval holds, as :meth:`StateStore.release_events` takes it back."""
    if approval.quota is None:
        return None
    scope, member, at = approval.quota
    return Reservation(at=at, events=((scope, member),))


def _conflict() -> StateUnavailable:
    return StateUnavailable("the approval is being updated concurrently; retry", reason="approval_conflict")


class ApprovalBook:
    """Approval records in the state store (memory or Redis). Every method fails closed: a store error is
    :class:`StateUnavailable` (503), never a guess."""

    def __init__(
        self,
        store: StateStore,
        *,
        ttl_seconds: int,
        max_pending_per_principal: int = MAX_PENDING_PER_PRINCIPAL,
    ) -> None:
        if not (isinstance(ttl_seconds, int) and ttl_seconds > 0):
            raise ValueError("ttl_seconds must be a positive int")
        if not (isinstance(max_pending_per_principal, int) and max_pending_per_principal > 0):
            raise ValueError("max_pending_per_principal must be a positive int")
        self.store = store
        self.ttl_seconds = ttl_seconds
        self.max_pending_per_principal = max_pending_per_principal

    def _quota_scope(self, subject: str, actor: str | None) -> str:
        return f"quota:approvals:{self.ttl_seconds}:{hash_key_part(json_dumps([subject, actor]))}"

    async def _reserve_pending(self, subject: str, actor: str | None, now: float) -> Reservation:
        """One pending slot of (subject, actor), or ``RateLimited`` (429) when all are taken."""
        scope = self._quota_scope(subject, actor)
        reservation = await self.store.reserve_events([(scope, 1.0, float(self.ttl_seconds))], now)
        ((count, _),) = reservation.seen
        if count >= self.max_pending_per_principal:
            await self._release(reservation)
            raise RateLimited(
                "too many pending approval requests; wait for decisions or for them to expire",
                reason="approval_quota",
            )
        return reservation

    async def _release(self, reservation: Reservation | None) -> None:
        """Hand a quota event back; a store failure leaves it counted until its window ends (the safe side)."""
        if reservation is None:
            return
        try:
            await self.store.release_events(reservation)
        except StateUnavailable:
            log.warning("approval quota event not released; it counts until it expires")

    def _record_ttl(self, approval: Approval, now: float) -> float:
        return max(1.0, approval.expires_at + RETENTION_SECONDS - now)

    async def request(
        self,
        *,
        subject: str,
        actor: str | None,
        tool: str,
        arguments: Mapping[str, Any],
        args_digest: str,
        required: Iterable[str],
        reason: str,
        policy_version: str,
        now: float,
    ) -> tuple[Approval, bool]:
        """The live approval for this binding and requirement set, or a new pending one (then True).

        "Live" = pending or approved and not expired; a denied or expired one is replaced. Raises
        ``ValueError`` when nothing in ``required`` is an approval, :class:`PayloadTooLarge` for arguments
        over :data:`MAX_ARGUMENTS_BYTES`.
        """
        needed = approval_requirements(required)
        if not needed:
            raise ValueError(
                "an approval needs at least one of manager_approval, dual_approval, security_review"
            )
        if len(json_dumps(dict(arguments)).encode("utf-8")) > MAX_ARGUMENTS_BYTES:
            raise PayloadTooLarge(
                "arguments are too large to be approved", reason="approval_arguments_too_large"
            )
        if not math.isfinite(now):
            raise ValueError("now must be finite")
        if digest_of(dict(arguments)) != args_digest:
            raise ValueError("args_digest is not the digest of arguments")
        binding_key = _binding_key(subject, actor, tool, args_digest, needed)
        # The pending slot is reserved when an approval is about to be created, and handed back unless one was.
        reservation: Reservation | None = None
        try:
            for _ in range(MAX_CAS_ATTEMPTS):
                index = await self.store.get_json(binding_key)
                if index is not None:
                    existing = await self.get(str(index.get("id", "")), now)
                    if (
                        existing is not None
                        and existing.state_at(now) in ("pending", "approved")
                        and existing.used_at is None
                        and existing.binding == (subject, actor, tool, args_digest, needed)
                    ):
                        return existing, False
                if reservation is None:
                    reservation = await self._reserve_pending(subject, actor, now)
                ((scope, member),) = reservation.events
                approval = Approval(
                    id=b64url_encode(secrets.token_bytes(16)),
                    state="pending",
                    required=needed,
                    tool=tool,
                    arguments=dict(arguments),
                    args_digest=args_digest,
                    subject=subject,
                    actor=actor,
                    reason=reason,
                    created_at=now,
                    expires_at=now + self.ttl_seconds,
                    policy_version=policy_version,
                    quota=(scope, member, reservation.at),
                )
                ttl = self._record_ttl(approval, now)
                # The record first, then the binding: nobody can find a binding whose record is not written
                # yet. A writer that loses the binding race leaves an unreferenced record nobody knows the id
                # of; it expires with its TTL.
                if not await self.store.compare_and_set_json(
                    _record_key(approval.id), 0, approval.to_record(), ttl
                ):
                    continue  # a 128-bit id collision: draw another
                expected = 0 if index is None else int(index["version"])
                if await self.store.compare_and_set_json(binding_key, expected, {"id": approval.id}, ttl):
                    reservation = None  # the slot now belongs to the approval (released at its decision)
                    await self._update_pending(now, add=approval)
                    return replace(approval, version=1), True
            raise _conflict()
        finally:
            await self._release(reservation)

    #: :func:`covers`, reachable from the book the exchange already holds
    covers = staticmethod(covers)

    async def get(self, approval_id: str, now: float) -> Approval | None:
        """The approval with this id (any state, ``expired`` computed from ``now`` by the reader), or None."""
        if not isinstance(approval_id, str) or not _ID.fullmatch(approval_id):
            return None
        record = await self.store.get_json(_record_key(approval_id))
        if record is None:
            return None
        approval = Approval.from_record(record)
        return approval if approval.id == approval_id else None

    async def decide(
        self,
        approval_id: str,
        *,
        approver_sub: str,
        approver_claims: Mapping[str, Any],
        decision: Verdict,
        eligible: EligibleFn,
        now: float,
    ) -> Approval:
        """Record one approver's vote (rules in the module docstring) and return the updated approval.

        Raises :class:`NotFound` (no such approval), :class:`AccessDenied` with the rule's reason, or
        :class:`StateUnavailable`. Re-reads and re-applies the rules when another vote got in first.
        """
        for _ in range(MAX_CAS_ATTEMPTS):
            approval = await self.get(approval_id, now)
            if approval is None:
                raise NotFound("no such approval", reason="approval_unknown")
            updated = apply_decision(
                approval,
                approver_sub=approver_sub,
                approver_claims=approver_claims,
                decision=decision,
                eligible=eligible,
                now=now,
            )
            ttl = self._record_ttl(updated, now)
            key = _record_key(approval_id)
            if await self.store.compare_and_set_json(key, approval.version, updated.to_record(), ttl):
                if updated.state != "pending":
                    await self._release(_reservation_of(updated))  # no longer pending: frees its slot
                    await self._update_pending(now, remove=approval_id)
                return replace(updated, version=approval.version + 1)
        raise _conflict()

    async def use(self, approval: Approval, now: float) -> bool:
        """Record the one execution ``approval`` authorises (compare-and-set on the version it was read at):
        True for the call that used it, False when another execution got there first or it changed meanwhile
        (then it no longer covers this call). An approval is spent by executing, never by an exchange."""
        updated = replace(approval, used_at=now)
        ttl = self._record_ttl(updated, now)
        return await self.store.compare_and_set_json(
            _record_key(approval.id), approval.version, updated.to_record(), ttl
        )

    async def pending(self, now: float) -> list[Approval]:
        """The listed pending, unexpired approvals (at most :data:`MAX_PENDING_LISTED`), oldest first."""
        index = await self.store.get_json(_PENDING_KEY)
        found: list[Approval] = []
        for entry in (index or {}).get("ids", []):
            if entry["exp"] <= now:
                continue
            approval = await self.get(entry["id"], now)
            if approval is not None and approval.state_at(now) == "pending":
                found.append(approval)
        return found

    async def _update_pending(
        self, now: float, *, add: Approval | None = None, remove: str | None = None
    ) -> None:
        # Best effort: the index only serves listings. A conflict storm leaves it stale (pruned on the next
        # write); a store error still fails closed like every other store call.
        for _ in range(MAX_CAS_ATTEMPTS):
            index = await self.store.get_json(_PENDING_KEY)
            version = 0 if index is None else int(index["version"])
            entries = [e for e in (index or {}).get("ids", []) if e["exp"] > now and e["id"] != remove]
            if add is not None:
                if len(entries) >= MAX_PENDING_LISTED:
                    log.warning("pending approvals index full; approval not listed", approval_id=add.id)
                    return
                entries.append({"id": add.id, "exp": add.expires_at})
            ttl = max([1.0, *(e["exp"] - now for e in entries)])
            if await self.store.compare_and_set_json(_PENDING_KEY, version, {"ids": entries}, ttl):
                return
        log.warning("pending approvals index not updated (conflicts)")
