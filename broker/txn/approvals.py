"""Approval records in the state store (CONTRACT §6); the record and the decision rules are
:mod:`broker.txn.approval_rules`.

Store layout (keys hashed where a part is untrusted, HOSTILE S08): ``approval:<H(id)>`` the record,
``approval_binding:<H(binding)>`` → the id of the live approval for a binding and a copy of its record as created
(``{"id", "record"}``; create-if-absent with ``compare_and_set_json(key, 0, …)``, so concurrent identical requests
share one approval), and ``approval_pending`` a bounded index of pending ids for ``GET /v1/approvals`` and the
approvals page. Every update of a record is a compare-and-set on its version, retried on conflict: concurrent
decisions never lose a vote.

Every pending approval is listed: there is no approval that approvers cannot find. The index is shared by every
principal and holds at most ``max_pending_listed`` (``approvals.max_pending_listed``; default and ceiling
:data:`MAX_PENDING_LISTED`, so the index always fits one store record) live ids. A new approval is written in three
compare-and-sets, in this order:

1. its place in the index, before anything else: when the index is full the request is refused with
   ``429 rate_limited`` (``approval_pending_full``) and nothing is recorded (no record, no binding, its quota event
   handed back); a conflict storm on the index is ``503 state_unavailable`` (``approval_conflict``);
2. the binding: the one request that writes it has won, the others (identical requests that lost the race) write
   no record at all, give their place back and answer with the winner's approval;
3. the record, from the copy in the binding. A request that finds a binding whose record is missing (its writer is
   between 2 and 3, or failed there) writes the record from that copy itself: create-if-absent, the same record
   whoever writes it, and the request whose write created it answers "new" (it is announced once).

So a pending record exists only for an approval that won its binding after taking its place: approvers never see
a record they could decide to no effect, and there is never an approval that is valid but not listed. An id listed
for an approval that was not created (a place not given back) points at no record: :meth:`ApprovalBook.pending`
skips it and it counts toward the cap until its expiry (over-counting: the safe side). When the reply to a write is
lost (a store timeout, or the request cancelled because its client went away), its outcome is unknown: a place in
doubt is given back if the store allows it (best effort); a binding in doubt keeps its place and quota event — it
may have been written, and then the approval exists (the next identical request completes its record).

Per-principal quota (CONTRACT §12 "Shared state has per-principal quotas"): each distinct argument set creates
a record, so one (subject, actor) may hold at most ``max_pending_per_principal`` (default
:data:`MAX_PENDING_PER_PRINCIPAL`) PENDING approvals; a request beyond that is refused with ``429 rate_limited``
(``approval_quota``) and creates nothing, while other principals are unaffected. The count is a sliding-window
counter of the state store (``quota:approvals:<ttl>:<H(subject, actor)>``, window = the approval lifetime):
a new approval reserves one event atomically (:meth:`~broker.state.base.StateStore.reserve_events`: concurrent
requests on any replica see distinct counts, so the cap is exact — no overshoot), an approval that stops being
pending (approved or denied) hands its event back, and an expired one leaves the window by itself. A request
that ends up not creating an approval (an identical one won the race, the index refused it) hands its event back
too. An event is handed back only after its index place surely is free, so every listed id counts against its
principal until it expires and no principal holds more places in the shared index than its quota: when giving the
place back fails, the release fails, or a write's outcome is unknown, the event counts until the window ends
(over-counting: the safe side). A reload that changes ``approvals.ttl_seconds`` starts a new counter (the window
is part of its name).
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any, Final

import structlog

from broker.canonical import args_digest as digest_of
from broker.errors import NotFound, PayloadTooLarge, RateLimited, StateUnavailable
from broker.jose import b64url_encode
from broker.state.base import Reservation, StateStore, hash_key_part, json_dumps
from broker.txn.approval_rules import (
    Approval,
    EligibleFn,
    Verdict,
    apply_decision,
    approval_requirements,
    covers,
)

log = structlog.get_logger("broker.approvals")

_ID = re.compile(r"[A-Za-z0-9_-]{22}")  # 16 random bytes, base64url (128 bits)
#: decided and expired records stay readable this long after expiry (GET answers "expired", not 404)
RETENTION_SECONDS: Final = 86_400
#: arguments of one approval, as JSON; the record (arguments + votes) must fit the store's 64 KiB cap
MAX_ARGUMENTS_BYTES: Final = 32 * 1024
MAX_CAS_ATTEMPTS: Final = 8
#: attempts at the pending index (one record for every principal), with jittered exponential backoff between them
#: (at most about 0.6 s in all): concurrent requests on every replica contend for it
MAX_INDEX_ATTEMPTS: Final = 16
RETRY_BASE_SECONDS: Final = 0.001
RETRY_CAP_SECONDS: Final = 0.05
#: live ids the pending index holds, all principals together; beyond it new approvals are refused (module docstring).
#: Default and ceiling of ``approvals.max_pending_listed``: the index is one JSON record under the store's
#: MAX_RECORD_BYTES (64 KiB), an entry ``{"id":…,"exp":…}`` takes at most 57 bytes (22-character id, expiry in epoch
#: seconds: up to 18 characters), so 1,149 would fit; 1,000 take at most ~57 KB (a unit test fills the index).
MAX_PENDING_LISTED: Final = 1000
_PENDING_KEY: Final = "approval_pending"
#: pending approvals one (subject, actor) may hold (module docstring, "Per-principal quota")
MAX_PENDING_PER_PRINCIPAL: Final = 100

# --- the store -----------------------------------------------------------------------------------------------


def _record_key(approval_id: str) -> str:
    return f"approval:{hash_key_part(approval_id)}"


def _binding_key(
    issuer: str | None, subject: str, actor: str | None, tool: str, args_digest: str, required: Iterable[str]
) -> str:
    binding = json_dumps([issuer, subject, actor, tool, args_digest, sorted(required)])
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
        max_pending_listed: int = MAX_PENDING_LISTED,
    ) -> None:
        if not (isinstance(ttl_seconds, int) and ttl_seconds > 0):
            raise ValueError("ttl_seconds must be a positive int")
        if not (isinstance(max_pending_per_principal, int) and max_pending_per_principal > 0):
            raise ValueError("max_pending_per_principal must be a positive int")
        if not (isinstance(max_pending_listed, int) and 0 < max_pending_listed <= MAX_PENDING_LISTED):
            raise ValueError("max_pending_listed must be an int in [1, MAX_PENDING_LISTED]")
        self.store = store
        self.ttl_seconds = ttl_seconds
        self.max_pending_per_principal = max_pending_per_principal
        self.max_pending_listed = max_pending_listed

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

    async def _give_back(self, listed: str | None, reservation: Reservation | None, now: float) -> None:
        """Give back what a request took for an approval it did not create: its index place, then its quota event —
        the event only once the place surely is free (module docstring: a listed id counts against its principal)."""
        if listed is None or await self._unlist(listed, now):
            await self._release(reservation)

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
        issuer: str | None = None,
    ) -> tuple[Approval, bool]:
        """The live approval for this binding and requirement set, or a new pending one (then True: this call
        wrote its record, so it is announced once).

        "Live" = pending or approved and not expired; a denied or expired one is replaced. Raises
        ``ValueError`` when nothing in ``required`` is an approval, :class:`PayloadTooLarge` for arguments
        over :data:`MAX_ARGUMENTS_BYTES`, :class:`RateLimited` when the principal's quota (``approval_quota``)
        or the pending index (``approval_pending_full``) is full — then nothing is recorded.
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
        binding_key = _binding_key(issuer, subject, actor, tool, args_digest, needed)
        # The pending slot is reserved when an approval is about to be created, and so is its place in the pending
        # index (``listed``: the id that is, or may be, listed for an approval not created yet); both are given back
        # unless the approval was created — or may have been (``in_doubt``: the binding write's outcome is unknown).
        reservation: Reservation | None = None
        listed: str | None = None
        in_doubt = False
        try:
            for _ in range(MAX_CAS_ATTEMPTS):
                bound = await self.store.get_json(binding_key)
                if bound is not None:
                    existing, completed = await self._bound_approval(bound, now)
                    if (
                        existing is not None
                        and existing.state_at(now) in ("pending", "approved")
                        and existing.used_at is None
                        and existing.binding == (subject, actor, tool, args_digest, needed)
                        and existing.issuer == issuer
                    ):
                        return existing, completed
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
                    issuer=issuer,
                )
                # 1. Listed before anything is written: a full index refuses the request with nothing recorded.
                # From here the id may be listed (a lost reply): `finally` tries to give the place back.
                listed = approval.id
                try:
                    written = await self._update_pending(now, add=approval)
                except RateLimited:
                    listed = None  # refused before writing
                    raise
                if not written:
                    listed = None  # every attempt lost to another writer: nothing written
                    raise _conflict()
                # 2. The binding, carrying the record to write: whoever wins it has created the approval.
                ttl = self._record_ttl(approval, now)
                record = approval.to_record()
                expected = 0 if bound is None else int(bound["version"])
                # until the store answers: an error or a cancellation leaves the binding's outcome unknown
                in_doubt = True
                won = await self.store.compare_and_set_json(
                    binding_key, expected, {"id": approval.id, "record": record}, ttl
                )
                in_doubt = False
                if not won:  # an identical request got in first: this one is not created, read the winner's
                    await self._give_back(listed, reservation, now)
                    reservation, listed = None, None
                    continue
                # the slot and the listing now belong to the approval (given back at its decision)
                reservation, listed = None, None
                # 3. The record. False: an identical request found the binding first and wrote this same record
                # from its copy (ids are 128 random bits: never another approval's); that request announces it.
                created = await self.store.compare_and_set_json(_record_key(approval.id), 0, record, ttl)
                return replace(approval, version=1), created
            raise _conflict()
        finally:
            if not in_doubt:  # in doubt the approval may exist, listed and counted: keep both (the safe side)
                await self._give_back(listed, reservation, now)

    async def _bound_approval(self, bound: Mapping[str, Any], now: float) -> tuple[Approval | None, bool]:
        """The approval a binding names, and whether this call wrote its record. The record is written after the
        binding (module docstring): when it is missing and the binding's copy is still pending, the copy is written
        here (create-if-absent: the same record whoever writes it). A binding without a copy (written before copies
        were kept) names its record alone."""
        approval_id = str(bound.get("id", ""))
        existing = await self.get(approval_id, now)
        copy = bound.get("record")
        if existing is not None or not isinstance(copy, dict):
            return existing, False
        created = Approval.from_record(copy)
        if created.id != approval_id or created.state_at(now) != "pending":
            return None, False  # expired before its record was written: replaced like any expired approval
        ttl = self._record_ttl(created, now)
        completed = await self.store.compare_and_set_json(_record_key(approval_id), 0, copy, ttl)
        return await self.get(approval_id, now), completed

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
        approver_iss: str | None = None,
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
                approver_iss=approver_iss,
            )
            ttl = self._record_ttl(updated, now)
            key = _record_key(approval_id)
            if await self.store.compare_and_set_json(key, approval.version, updated.to_record(), ttl):
                if updated.state != "pending":  # no longer pending: frees its place, then its slot
                    await self._give_back(approval_id, _reservation_of(updated), now)
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
        """The listed pending, unexpired approvals (at most ``max_pending_listed``), oldest first."""
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
    ) -> bool:
        """List ``add`` and/or unlist ``remove`` in one compare-and-set; expired ids are pruned on the way.

        True once written; False after :data:`MAX_INDEX_ATTEMPTS` conflicts (nothing written). A full index is
        :class:`RateLimited` (``approval_pending_full``, nothing written) when listing ``add``. A store error or a
        cancellation propagates: the outcome of a write in flight is unknown then.
        """
        for attempt in range(MAX_INDEX_ATTEMPTS):
            if attempt:  # another request or decision got in first: back off a little, with jitter
                await asyncio.sleep(
                    random.uniform(0, min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2**attempt))  # noqa: S311
                )
            index = await self.store.get_json(_PENDING_KEY)
            version = 0 if index is None else int(index["version"])
            entries = [e for e in (index or {}).get("ids", []) if e["exp"] > now and e["id"] != remove]
            if add is not None:
                if len(entries) >= self.max_pending_listed:
                    log.warning("pending approvals index full; approval request refused", listed=len(entries))
                    raise RateLimited(
                        "too many approval requests are waiting for a decision; retry later",
                        reason="approval_pending_full",
                    )
                entries.append({"id": add.id, "exp": add.expires_at})
            ttl = max([1.0, *(e["exp"] - now for e in entries)])
            if await self.store.compare_and_set_json(_PENDING_KEY, version, {"ids": entries}, ttl):
                return True
        return False

    async def _unlist(self, approval_id: str, now: float) -> bool:
        """Give an index place back: True once it surely is free. A store error or a conflict storm leaves it listed
        until its expiry (logged, False): this runs while another outcome (an answer or an error) is on its way."""
        try:
            if await self._update_pending(now, remove=approval_id):
                return True
        except StateUnavailable:
            pass
        log.warning("pending approvals index place not given back; it counts until it expires")
        return False
